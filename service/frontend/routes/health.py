"""Kubernetes probes and their Open Inference Protocol (v2) twins."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from service.frontend.routes.dependencies import Frontend, get_frontend
from service.frontend.schemas import HealthResponse

router = APIRouter(tags=["health"])
_NOT_READY: dict[int | str, dict[str, object]] = {
    503: {"model": HealthResponse, "description": "not ready (starting or draining), with the reason"}
}


def _provider(frontend: Frontend) -> str | None:
    """The provider the engine's session runs on, as it last reported it; None before it ever did."""
    info = frontend.engine.info
    return info.provider if info is not None else None


@router.get("/livez", response_model=HealthResponse, summary="Liveness: the process answers")
@router.get("/v2/health/live", response_model=HealthResponse, summary="Open Inference Protocol liveness")
async def live() -> HealthResponse:
    return HealthResponse(status="alive")


@router.get("/startupz", response_model=HealthResponse, responses=_NOT_READY, summary="Startup: model loaded and warm")
async def startup(frontend: Annotated[Frontend, Depends(get_frontend)]) -> JSONResponse:
    lifecycle = frontend.lifecycle
    if not lifecycle.started:
        body = HealthResponse(status="starting", reason=lifecycle.not_ready_reason())
        return JSONResponse(body.model_dump(), status_code=503)
    return JSONResponse(HealthResponse(status="started", provider=_provider(frontend)).model_dump())


@router.get("/readyz", response_model=HealthResponse, responses=_NOT_READY, summary="Readiness: send traffic here")
@router.get("/v2/health/ready", response_model=HealthResponse, responses=_NOT_READY, summary="OIP readiness")
async def ready(frontend: Annotated[Frontend, Depends(get_frontend)]) -> JSONResponse:
    reason = frontend.lifecycle.not_ready_reason()
    provider = _provider(frontend)
    if reason is not None:
        return JSONResponse(HealthResponse(status="not ready", reason=reason, provider=provider).model_dump(), 503)
    return JSONResponse(HealthResponse(status="ready", provider=provider).model_dump())
