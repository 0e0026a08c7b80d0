"""Open Inference Protocol v2 (KServe / Triton REST): metadata and inference over the same batcher."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from service.access import require_api_key
from service.classifier import Classifier
from service.errors import BadRequest, ModelNotFound, TooManyImages
from service.lifecycle import Lifecycle
from service.oip import (
    HEADER_LENGTH,
    IMAGE_INPUT,
    PROBABILITIES_OUTPUT,
    TENSOR_INPUT,
    encode_infer_response,
    parse_infer_request,
)
from service.routes.dependencies import get_classifier, get_lifecycle, get_settings
from service.schemas import ERROR_RESPONSES, MODEL_NOT_FOUND, NOT_READY
from service.settings import Settings
from service.uploads import Upload, read_body

router = APIRouter(prefix="/v2", tags=["open inference protocol v2"])
SERVER_NAME = "vit-serve"


def _model(name: str, classifier: Classifier) -> Classifier:
    if name != classifier.manifest.name:
        raise ModelNotFound(f"unknown model {name!r}; this server serves {classifier.manifest.name!r}")
    return classifier


@router.get("", summary="Server metadata")
async def server_metadata(request: Request) -> dict[str, object]:
    return {"name": SERVER_NAME, "version": request.app.version, "extensions": ["binary_tensor_data", "classification"]}


@router.get("/models/{name}", summary="Model metadata", responses={**MODEL_NOT_FOUND, **NOT_READY})  # type: ignore[dict-item]
async def model_metadata(name: str, classifier: Annotated[Classifier, Depends(get_classifier)]) -> dict[str, object]:
    model = _model(name, classifier)
    height, width, channels = model.decoder.shape
    return {
        "name": model.manifest.name,
        "versions": ["1"],
        "platform": "onnxruntime_onnx",
        "inputs": [
            {"name": IMAGE_INPUT, "datatype": "BYTES", "shape": [-1]},
            {"name": TENSOR_INPUT, "datatype": "FP32", "shape": [-1, channels, height, width]},
        ],
        "outputs": [{"name": PROBABILITIES_OUTPUT, "datatype": "FP32", "shape": [-1, model.manifest.num_classes]}],
    }


@router.get(
    "/models/{name}/ready",
    summary="Model readiness (200 ready, 503 not)",
    responses={**MODEL_NOT_FOUND, 503: {"description": "not ready"}},  # type: ignore[dict-item]
)
async def model_ready(
    name: str, request: Request, lifecycle: Annotated[Lifecycle, Depends(get_lifecycle)]
) -> JSONResponse:
    classifier = getattr(request.app.state, "classifier", None)
    if classifier is not None:
        _model(name, classifier)
    ready = classifier is not None and lifecycle.not_ready_reason() is None
    return JSONResponse({"name": name, "ready": ready}, status_code=200 if ready else 503)


@router.post(
    "/models/{name}/infer",
    dependencies=[Depends(require_api_key)],
    responses={**ERROR_RESPONSES, **MODEL_NOT_FOUND},  # type: ignore[dict-item]
    summary="Inference: encoded images (BYTES) or preprocessed tensors (FP32)",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"type": "object", "required": ["inputs"]}}},
        }
    },
)
async def infer(
    name: str,
    request: Request,
    classifier: Annotated[Classifier, Depends(get_classifier)],
    lifecycle: Annotated[Lifecycle, Depends(get_lifecycle)],
    settings: Annotated[Settings, Depends(get_settings)],
) -> Response:
    model = _model(name, classifier)
    deadline = asyncio.get_running_loop().time() + settings.request_timeout_s
    with lifecycle.track():
        model.check_room()
        body = await read_body(request, settings.max_body_bytes)
        if not body:
            raise BadRequest("empty inference request")
        parsed = parse_infer_request(body, request.headers.get(HEADER_LENGTH))
        if parsed.tensor is not None:
            height, width, channels = model.decoder.shape
            expected = (channels, height, width)
            if parsed.tensor.shape[1:] != expected:
                raise BadRequest(f"{TENSOR_INPUT!r} must be [N, {', '.join(map(str, expected))}]")
            if len(parsed.tensor) > settings.max_images_per_request:
                raise TooManyImages(f"at most {settings.max_images_per_request} images per request")
            probabilities = await model.probabilities_of_tensor(parsed.tensor, deadline)
        else:
            uploads = [Upload(f"{IMAGE_INPUT}[{i}]", data) for i, data in enumerate(parsed.images)]
            if len(uploads) > settings.max_images_per_request:
                raise TooManyImages(f"at most {settings.max_images_per_request} images per request")
            probabilities = await model.probabilities(uploads, deadline)
    content, header_length = encode_infer_response(parsed, model.manifest.name, probabilities, model.manifest.labels)
    headers = {HEADER_LENGTH: str(header_length)} if header_length is not None else None
    media_type = "application/octet-stream" if header_length is not None else "application/json"
    return Response(content, media_type=media_type, headers=headers)
