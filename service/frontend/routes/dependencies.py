"""What the routes get per request: the front-end's state (built once by create_app) and the
request's deadline; no module-level globals.

Async: FastAPI runs plain `def` dependencies in a thread pool, a hand-off per request that these
attribute reads do not need. One state object instead of one dependency per attribute: each
dependency costs FastAPI a resolution on every request."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, Request

from model_export.manifest import Manifest
from service.frontend.body import BodyLimits
from service.frontend.engine_client import EngineClient
from service.lifecycle import Lifecycle
from service.metrics import FrontendMetrics
from service.settings import Settings


@dataclass(frozen=True)
class Frontend:
    settings: Settings
    manifest: Manifest
    engine: EngineClient  # the core call, this front-end's slots and what the engine said of itself
    limits: BodyLimits
    metrics: FrontendMetrics

    @property
    def lifecycle(self) -> Lifecycle:
        return self.engine.lifecycle


async def get_frontend(request: Request) -> Frontend:
    return request.app.state.frontend


async def request_deadline(
    frontend: Annotated[Frontend, Depends(get_frontend)],
    x_request_timeout: Annotated[
        float | None, Header(gt=0, description="seconds this client will wait; capped by VIT_REQUEST_TIMEOUT_S")
    ] = None,
) -> float:
    """time.monotonic() by which the answer is due (the engine, in another process, reads the same clock)."""
    limit = frontend.settings.request_timeout_s
    return time.monotonic() + min(x_request_timeout or limit, limit)


async def wait_for_disconnect(request: Request) -> None:
    """Returns when the client leaves: once the body is read, the next ASGI message says so (or never comes)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
