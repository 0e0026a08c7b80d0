"""Per-request access to what the lifespan built; nothing here is a module-level global.

All async: FastAPI runs plain `def` dependencies in a thread pool, a hand-off per request
that these attribute reads do not need."""

from __future__ import annotations

from fastapi import Request

from service.classifier import Classifier
from service.errors import NotReady
from service.lifecycle import Lifecycle
from service.metrics import Metrics
from service.settings import Settings


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


async def get_lifecycle(request: Request) -> Lifecycle:
    return request.app.state.lifecycle  # type: ignore[no-any-return]


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics  # type: ignore[no-any-return]


async def get_classifier(request: Request) -> Classifier:
    classifier: Classifier | None = getattr(request.app.state, "classifier", None)
    if classifier is None:
        raise NotReady("the model is not loaded yet", retry_after=request.app.state.settings.retry_after_s)
    return classifier
