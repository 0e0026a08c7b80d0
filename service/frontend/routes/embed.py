"""POST /embed: each image's embedding, the final [class]-token vector, from the same graph run as the logits."""

from __future__ import annotations

import json
from functools import partial

from fastapi import APIRouter, Request, Response

from service.frontend import params
from service.frontend.access import check_api_key
from service.frontend.body import declared_length
from service.frontend.http_protocol import connection_closed
from service.frontend.results import embeddings
from service.frontend.routes.classify import timing_headers
from service.frontend.routes.dependencies import Frontend
from service.frontend.schemas import ERROR_RESPONSES, EmbedResponse
from service.frontend.uploads import OPENAPI_REQUEST_BODY, read_uploads

router = APIRouter(tags=["embed"])


@router.post(
    "/embed",
    response_model=EmbedResponse,
    responses=ERROR_RESPONSES,
    openapi_extra={"requestBody": OPENAPI_REQUEST_BODY, "parameters": [params.NORMALIZE, params.REQUEST_TIMEOUT]},
    summary="Embed one or more images",
    description="The same inputs, limits and batching as /classify. Returns each image's final [class]-token "
    "vector (after the final norm, before the head): the image's digest, for search, deduplication and "
    "clustering. normalize=true scales each to unit L2 norm, so that dot products are cosine similarities.",
)
async def embed(request: Request) -> Response:
    frontend: Frontend = request.app.state.frontend
    check_api_key(request)
    normalize = params.flag(request, "normalize")
    deadline = params.deadline(request, frontend.settings)
    engine = frontend.engine
    async with engine.admitted(declared_length(request), deadline) as admission:
        uploads = await read_uploads(request, frontend.limits, partial(engine.hold, admission), admission.clock)
        answer = await engine.run(admission, uploads, gone=connection_closed(request.scope))
    vectors = embeddings(answer.rows, normalize)
    results = [{"filename": u.name, "embedding": v.tolist()} for u, v in zip(uploads, vectors, strict=True)]
    body = {
        "model": frontend.manifest.name,
        "dimension": int(vectors.shape[1]),
        "normalized": normalize,
        "results": results,
    }
    return Response(json.dumps(body).encode(), media_type="application/json", headers=timing_headers(answer))
