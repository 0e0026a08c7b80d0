"""POST /classify: the request's images, top-k labels for each."""

from __future__ import annotations

import json
from functools import partial

from fastapi import APIRouter, Request, Response

from service.frontend import params
from service.frontend.access import check_api_key
from service.frontend.body import declared_length
from service.frontend.engine_client import Answer
from service.frontend.http_protocol import connection_closed
from service.frontend.results import attention, predictions
from service.frontend.routes.dependencies import Frontend
from service.frontend.schemas import ERROR_RESPONSES, ClassifyResponse
from service.frontend.uploads import OPENAPI_REQUEST_BODY, read_uploads

router = APIRouter(tags=["classify"])


def timing_headers(answer: Answer) -> dict[str, str]:
    return {
        "X-Preprocess-Time-Ms": f"{answer.preprocess_s * 1000:.2f}",
        "X-Queue-Time-Ms": f"{answer.queue_wait_s * 1000:.2f}",
        "X-Inference-Time-Ms": f"{answer.inference_s * 1000:.2f}",
    }


@router.post(
    "/classify",
    response_model=ClassifyResponse,
    response_model_exclude_none=True,
    responses=ERROR_RESPONSES,
    openapi_extra={
        "requestBody": OPENAPI_REQUEST_BODY,
        "parameters": [params.TOP_K, params.EXPLAIN, params.REQUEST_TIMEOUT],
    },
    summary="Classify one or more images",
    description="Send images as repeatable multipart `file` parts, as a raw image body, or as JSON base64. "
    "Returns the top-k labels per image with softmax scores. Timing headers: X-Preprocess-Time-Ms, "
    "X-Queue-Time-Ms, X-Inference-Time-Ms. With explain=true each result also carries where the [class] token "
    "looked: attention grids over the patches, a heat-map PNG, and the attention's share per kind of token.",
)
async def classify(request: Request) -> Response:
    frontend: Frontend = request.app.state.frontend
    check_api_key(request)
    manifest, engine = frontend.manifest, frontend.engine
    k = params.top_k(request, manifest.num_classes, frontend.settings.default_top_k)
    explain = params.flag(request, "explain")
    deadline = params.deadline(request, frontend.settings)
    async with engine.admitted(declared_length(request), deadline) as admission:
        uploads = await read_uploads(request, frontend.limits, partial(engine.hold, admission), admission.clock)
        answer = await engine.run(admission, uploads, explain=explain, gone=connection_closed(request.scope))
    results = []
    top = predictions(answer.rows, manifest.labels, k)
    for index, (upload, rows, predicted) in enumerate(zip(uploads, answer.rows, top, strict=True)):
        result: dict[str, object] = {"filename": upload.name, "predictions": predicted}
        if answer.pixels is not None:
            result["attention"] = vars(attention(rows, answer.pixels[index], manifest.prefix_tokens))
        results.append(result)
    # Built by hand, not through the response model: this is the hot path, and the shape is fixed here.
    body = json.dumps({"model": manifest.name, "results": results}).encode()
    return Response(body, media_type="application/json", headers=timing_headers(answer))
