"""Response bodies, as the OpenAPI document shows them."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from model_export.manifest import Preprocessing


class PredictionOut(BaseModel):
    """One label, shaped like the Hugging Face image-classification pipeline's {label, score}."""

    label: str = Field(examples=["Ankle boot"])
    class_id: int = Field(examples=[9])
    score: float = Field(ge=0, le=1, description="softmax probability", examples=[0.97])


class AttentionOut(BaseModel):
    """Where the [class] token looked, over the patch grid (rows x cols); each grid sums to 1."""

    rollout: list[list[float]] = Field(description="attention rollout through every block (heads averaged)")
    last_layer: list[list[float]] = Field(description="the class token's attention in the last block, heads averaged")
    heatmap_png: str = Field(description="base64 PNG at the model's input size: the rollout over the image it saw")
    token_shares: dict[str, float] = Field(
        description="the class token's last-layer attention (heads averaged) per kind of token: class, "
        "distillation, register, patches; sums to 1",
        examples=[{"class": 0.04, "register": 0.41, "patches": 0.55}],
    )


class ImageResultOut(BaseModel):
    filename: str = Field(description="the upload's filename, or its position", examples=["boot.png"])
    predictions: list[PredictionOut] = Field(description="top-k, highest score first")
    attention: AttentionOut | None = Field(None, description="only with explain=true")


class ClassifyResponse(BaseModel):
    model: str = Field(examples=["fashion-mnist-vit"])
    results: list[ImageResultOut] = Field(description="one entry per image, in upload order")


class EmbeddingOut(BaseModel):
    filename: str = Field(description="the upload's filename, or its position", examples=["boot.png"])
    embedding: list[float] = Field(description="the final [class]-token vector, after the final norm")


class EmbedResponse(BaseModel):
    model: str = Field(examples=["fashion-mnist-vit"])
    dimension: int = Field(examples=[64])
    normalized: bool = Field(description="whether each vector was scaled to unit L2 norm")
    results: list[EmbeddingOut] = Field(description="one entry per image, in upload order")


class ErrorResponse(BaseModel):
    error: str = Field(examples=["image is 20000x20000 = 400000000 pixels; the limit is 40000000"])
    error_type: str = Field(examples=["image_too_large"])
    part: str | None = Field(None, description="which image of the request failed", examples=["photo.jpg"])


class HealthResponse(BaseModel):
    status: str = Field(examples=["ready"])
    reason: str | None = Field(None, description="why the server is not ready")
    provider: str | None = Field(None, examples=["CPUExecutionProvider"])


class InputSize(BaseModel):
    channels: int
    height: int
    width: int


class BatchingOut(BaseModel):
    max_batch_size: int
    max_wait_ms: float
    max_queue_images: int = Field(description="images admitted at once over every front-end")
    frontend_processes: int = Field(description="HTTP/decode processes feeding the one engine")
    session_workers: int = Field(description="onnxruntime sessions the engine runs side by side")
    intra_op_threads: int


class ModelInfo(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    name: str
    labels: list[str]
    input_size: InputSize
    preprocessing: Preprocessing
    pooling: str
    prefix_tokens: list[str] = Field(description="the kind of each token before the patches, in order")
    head: str = Field(description="what the classifier reads: token, avg, distilled or token+patch_mean")
    embedding: str = Field(description="what POST /embed returns, in words")
    variant: str = Field(description="fp32, int8 or fp16, +fused-attention when the graph uses the fused operator")
    variant_gate: dict[str, object] | None = Field(
        None, description="a reduced-precision variant's measured accuracy gate"
    )
    provider: str = Field(description="the execution provider the engine's session reports, not the one asked for")
    requested_providers: list[str]
    outputs: dict[str, list[int]] = Field(description="each graph output per image: name -> shape")
    batching: BatchingOut
    onnx_sha256: str | None
    source_sha256: str | None


class ModelList(BaseModel):
    models: list[ModelInfo]


ERROR_RESPONSES: dict[int | str, dict[str, object]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        400: "no image, empty body, malformed multipart/JSON/base64",
        401: "API keys are configured and none valid was given",
        408: "the request's headers, or its body, arrived too slowly (VIT_HEADER_TIMEOUT_S, VIT_MIN_BODY_RATE_BYTES_S)",
        413: "body, image pixels or image count over the limit",
        415: "unsupported Content-Type or image format",
        422: "corrupt or truncated image; invalid parameter",
        429: "queue full: retry after Retry-After seconds",
        500: "inference failed for a batch holding the images, or another fault of the server's own",
        503: "not ready, or draining",
        504: "the request's deadline passed",
    }.items()
}

MODEL_NOT_FOUND: dict[int | str, dict[str, object]] = {
    404: {"model": ErrorResponse, "description": "no model of that name is served here"}
}
NOT_READY: dict[int | str, dict[str, object]] = {
    503: {"model": ErrorResponse, "description": "the model is not loaded yet, or the server is draining"}
}
