"""What the routes get per request: the front-end's state, built once by create_app; no module-level globals.

Async: FastAPI runs plain `def` dependencies in a thread pool, a hand-off per request that this
attribute read does not need. The inference routes read `request.app.state.frontend` directly
(see params.py for why)."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

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
