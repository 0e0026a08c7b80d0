"""Open Inference Protocol v2 (KServe / Triton REST): metadata, and inference through the same core call."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from model_export.manifest import EMBEDDING_NAME, Manifest
from service.errors import BadRequest, ModelNotFound
from service.frontend import params
from service.frontend.access import check_api_key
from service.frontend.body import declared_length, read_body, read_json_body
from service.frontend.http_protocol import connection_closed
from service.frontend.oip import (
    EMBEDDING_OUTPUT,
    HEADER_LENGTH,
    IMAGE_INPUT,
    PROBABILITIES_OUTPUT,
    TENSOR_INPUT,
    encode_infer_response,
    parse_infer_request,
)
from service.frontend.results import embeddings, probabilities
from service.frontend.routes.dependencies import Frontend, get_frontend
from service.frontend.schemas import ERROR_RESPONSES, MODEL_NOT_FOUND
from service.frontend.uploads import Upload

router = APIRouter(prefix="/v2", tags=["open inference protocol v2"])
SERVER_NAME = "vit-serve"


def _check_name(name: str, manifest: Manifest) -> None:
    if name != manifest.name:
        raise ModelNotFound(f"unknown model {name!r}; this server serves {manifest.name!r}")


@router.get("", summary="Server metadata")
async def server_metadata(request: Request) -> dict[str, object]:
    return {"name": SERVER_NAME, "version": request.app.version, "extensions": ["binary_tensor_data", "classification"]}


@router.get("/models/{name}", summary="Model metadata", responses=MODEL_NOT_FOUND)
async def model_metadata(name: str, frontend: Annotated[Frontend, Depends(get_frontend)]) -> dict[str, object]:
    manifest, engine = frontend.manifest, frontend.engine
    _check_name(name, manifest)
    height, width, channels = engine.ring.layout.pixel_shape
    return {
        "name": manifest.name,
        "versions": ["1"],
        "platform": "onnxruntime_onnx",
        "inputs": [
            {"name": IMAGE_INPUT, "datatype": "BYTES", "shape": [-1]},
            {"name": TENSOR_INPUT, "datatype": "FP32", "shape": [-1, channels, height, width]},
        ],
        "outputs": [
            {"name": PROBABILITIES_OUTPUT, "datatype": "FP32", "shape": [-1, manifest.num_classes]},
            {"name": EMBEDDING_OUTPUT, "datatype": "FP32", "shape": [-1, *engine.model_info.row_shape(EMBEDDING_NAME)]},
        ],
    }


@router.get(
    "/models/{name}/ready",
    summary="Model readiness (200 ready, 503 not)",
    responses={**MODEL_NOT_FOUND, 503: {"description": "not ready"}},
)
async def model_ready(name: str, frontend: Annotated[Frontend, Depends(get_frontend)]) -> JSONResponse:
    _check_name(name, frontend.manifest)
    ready = frontend.lifecycle.not_ready_reason() is None
    return JSONResponse({"name": name, "ready": ready}, status_code=200 if ready else 503)


@router.post(
    "/models/{name}/infer",
    responses={**ERROR_RESPONSES, **MODEL_NOT_FOUND},
    summary="Inference: encoded images (BYTES) or preprocessed tensors (FP32)",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"type": "object", "required": ["inputs"]}}},
        },
        "parameters": [params.REQUEST_TIMEOUT],
    },
)
async def infer(name: str, request: Request) -> Response:
    frontend: Frontend = request.app.state.frontend
    check_api_key(request)
    manifest, engine, limits = frontend.manifest, frontend.engine, frontend.limits
    _check_name(name, manifest)
    deadline = params.deadline(request, frontend.settings)
    height, width, channels = engine.ring.layout.pixel_shape
    async with engine.admitted(declared_length(request), deadline) as admission:
        json_length = request.headers.get(HEADER_LENGTH)
        # With the binary extension only the JSON header's commas count, once the body is whole.
        body = await (
            read_body(request, limits.max_bytes, admission.clock)
            if json_length is not None
            else read_json_body(request, limits, "the inference request", admission.clock)
        )
        if not body:
            raise BadRequest("empty inference request")
        parsed = parse_infer_request(body, json_length, limits, (channels, height, width))
        inputs = (
            list(parsed.tensor)
            if parsed.tensor is not None
            else [Upload(f"{IMAGE_INPUT}[{i}]", data) for i, data in enumerate(parsed.images)]
        )
        answer = await engine.run(admission, inputs, gone=connection_closed(request.scope))
    values = {PROBABILITIES_OUTPUT: probabilities(answer.rows), EMBEDDING_OUTPUT: embeddings(answer.rows, False)}
    content, header_length = encode_infer_response(parsed, manifest.name, values, manifest.labels)
    headers = {HEADER_LENGTH: str(header_length)} if header_length is not None else None
    media_type = "application/octet-stream" if header_length is not None else "application/json"
    return Response(content, media_type=media_type, headers=headers)
