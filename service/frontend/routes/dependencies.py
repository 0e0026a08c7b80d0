"""Per-request access to what the lifespan built, and the request's deadline; no module-level globals.

All async: FastAPI runs plain `def` dependencies in a thread pool, a hand-off per request
that these attribute reads do not need."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import Depends, Header, Request

from model_export.manifest import Manifest
from service.frontend.body import BodyLimits
from service.frontend.engine_client import EngineClient
from service.lifecycle import Lifecycle
from service.settings import Settings


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


async def get_lifecycle(request: Request) -> Lifecycle:
    return request.app.state.lifecycle  # type: ignore[no-any-return]


async def get_engine(request: Request) -> EngineClient:
    return request.app.state.engine  # type: ignore[no-any-return]


async def get_manifest(request: Request) -> Manifest:
    return request.app.state.manifest  # type: ignore[no-any-return]


async def get_limits(request: Request) -> BodyLimits:
    return request.app.state.limits  # type: ignore[no-any-return]


async def request_deadline(
    settings: Annotated[Settings, Depends(get_settings)],
    x_request_timeout: Annotated[
        float | None, Header(gt=0, description="seconds this client will wait; capped by VIT_REQUEST_TIMEOUT_S")
    ] = None,
) -> float:
    """time.monotonic() by which the answer is due (the engine, in another process, reads the same clock)."""
    return time.monotonic() + min(x_request_timeout or settings.request_timeout_s, settings.request_timeout_s)


async def wait_for_disconnect(request: Request) -> None:
    """Returns when the client leaves: once the body is read, the next ASGI message says so (or never comes)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
