"""POST /classify: the request's images, top-k labels for each."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request, Response

from service.access import require_api_key
from service.classifier import Classifier
from service.errors import BadRequest, InvalidParameter
from service.lifecycle import Lifecycle
from service.routes.dependencies import get_classifier, get_lifecycle, get_settings
from service.schemas import ERROR_RESPONSES, AttentionOut, ClassifyResponse, ImageResultOut, PredictionOut
from service.settings import Settings
from service.uploads import read_uploads

router = APIRouter(tags=["classify"], dependencies=[Depends(require_api_key)])

_BINARY = {"schema": {"type": "string", "format": "binary"}}
REQUEST_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {"file": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                "required": ["file"],
            }
        },
        "image/jpeg": _BINARY,
        "image/png": _BINARY,
        "image/webp": _BINARY,
        "application/octet-stream": _BINARY,
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {"images": {"type": "array", "items": {"type": "string", "format": "byte"}}},
                "required": ["images"],
            },
        },
    },
}


async def _wait_for_disconnect(request: Request) -> None:
    # Once the body is read, the next ASGI message is the client leaving (or never comes).
    while (await request.receive())["type"] != "http.disconnect":
        pass


@router.post(
    "/classify",
    response_model=ClassifyResponse,
    response_model_exclude_none=True,
    responses=ERROR_RESPONSES,  # type: ignore[arg-type]
    openapi_extra={"requestBody": REQUEST_BODY},
    summary="Classify one or more images",
    description="Send images as repeatable multipart `file` parts, as a raw image body, or as JSON base64. "
    "Returns the top-k labels per image with softmax scores. Timing headers: X-Preprocess-Time-Ms, "
    "X-Queue-Time-Ms, X-Inference-Time-Ms. With explain=true each result also carries where the [class] token "
    "looked: attention grids over the patches and a heat-map PNG.",
)
async def classify(
    request: Request,
    response: Response,
    classifier: Annotated[Classifier, Depends(get_classifier)],
    lifecycle: Annotated[Lifecycle, Depends(get_lifecycle)],
    settings: Annotated[Settings, Depends(get_settings)],
    top_k: Annotated[int | None, Query(ge=1, description="labels per image (default VIT_DEFAULT_TOP_K)")] = None,
    explain: Annotated[bool, Query(description="also return the [class] token's attention maps")] = False,
    x_request_timeout: Annotated[
        float | None, Header(gt=0, description="seconds this client will wait; capped by VIT_REQUEST_TIMEOUT_S")
    ] = None,
) -> ClassifyResponse:
    num_classes = classifier.manifest.num_classes
    k = top_k or min(settings.default_top_k, num_classes)
    if k > num_classes:
        raise InvalidParameter(f"top_k must be between 1 and {num_classes}, the number of classes")
    loop = asyncio.get_running_loop()
    timeout = min(x_request_timeout or settings.request_timeout_s, settings.request_timeout_s)
    deadline = loop.time() + timeout
    with lifecycle.track():
        classifier.check_room(explain)
        uploads = await read_uploads(
            request, max_bytes=settings.max_body_bytes, max_images=settings.max_images_per_request
        )
        work = asyncio.ensure_future(classifier.classify(uploads, k, deadline, explain))
        gone = asyncio.ensure_future(_wait_for_disconnect(request))
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        gone.cancel()
        if not work.done():  # the client left: drop its images before they reach a batch
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
            classifier.metrics.rejections.labels(reason="client_disconnected").inc()
            raise BadRequest("client disconnected")
        results, timings = work.result()
    response.headers["X-Preprocess-Time-Ms"] = f"{timings.preprocess_s * 1000:.2f}"
    response.headers["X-Queue-Time-Ms"] = f"{timings.queue_wait_s * 1000:.2f}"
    response.headers["X-Inference-Time-Ms"] = f"{timings.inference_s * 1000:.2f}"
    return ClassifyResponse(
        model=classifier.manifest.name,
        results=[
            ImageResultOut(
                filename=r.filename,
                predictions=[PredictionOut(label=p.label, class_id=p.class_id, score=p.score) for p in r.predictions],
                attention=AttentionOut(**vars(r.attention)) if r.attention else None,
            )
            for r in results
        ],
    )
