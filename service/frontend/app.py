"""`create_app(...)`: one front-end's ASGI app, FastAPI with the inference routes taken ahead of it;
its lifespan connects to the engine and drains."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp

from model_export.manifest import Manifest
from service import __version__
from service.boot import settle_heap
from service.errors import install_error_handlers
from service.frontend import loop_lag
from service.frontend.access import require_api_key
from service.frontend.body import BodyLimits
from service.frontend.cors import Cors
from service.frontend.engine_client import EngineClient
from service.frontend.engine_link import EngineInfo
from service.frontend.hot_routes import HotRoutes, inference_routes
from service.frontend.middleware import RequestContextMiddleware
from service.frontend.routes import classify, demo, embed, health, models, v2
from service.frontend.routes.dependencies import Frontend
from service.metrics import FrontendMetrics, render
from service.settings import Settings

logger = logging.getLogger(__name__)

# How long a new front-end waits for the engine's welcome: the engine may still be warming up a
# large model, or finishing the batches of the front-end this one replaces.
ENGINE_WAIT_S = 600.0


def create_app(
    settings: Settings,
    manifest: Manifest,
    engine: EngineClient,
    metrics: FrontendMetrics,
    metrics_dir: str,
    on_ready: Callable[[EngineInfo], None],
) -> RequestContextMiddleware:
    lifecycle = engine.lifecycle

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        info = await engine.start(ENGINE_WAIT_S)
        if hot_routes.defer_to_telemetry():
            logger.info("OpenTelemetry is on: the inference routes go through FastAPI's stack, which traces them")
        metrics.model_info.labels(model=manifest.name, provider=info.provider, variant=manifest.variant).set(1)
        settle_heap()
        lag = asyncio.create_task(loop_lag.watch(metrics.loop_lag_seconds.observe), name="loop-lag")
        on_ready(info)
        logger.info("ready: %s on %s", manifest.name, info.provider)
        try:
            yield
        finally:
            if not await engine.drain(settings.drain_grace_s):
                logger.warning(
                    "drain grace of %.1f s passed with %d requests in flight",
                    settings.drain_grace_s,
                    lifecycle.in_flight,
                )
            await engine.close()
            lag.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await lag
            logger.info("stopped")

    app = FastAPI(
        title="ViT classification service",
        summary="Image classification with a Vision Transformer on onnxruntime, with dynamic micro-batching.",
        version=__version__,
        lifespan=lifespan,
        root_path=settings.root_path,
    )
    height, width, channels = engine.ring.layout.pixel_shape
    limits = BodyLimits.from_settings(settings, values_per_image=height * width * channels)
    app.state.frontend = Frontend(settings, manifest, engine, limits, metrics)
    install_error_handlers(app)
    for module in (classify, embed, models, health, v2, demo):
        app.include_router(module.router)

    metrics_guard = [Depends(require_api_key)] if settings.metrics_require_key else []

    @app.get("/metrics", include_in_schema=False, dependencies=metrics_guard)
    async def prometheus() -> Response:
        return Response(render(metrics_dir), media_type=CONTENT_TYPE_LATEST)

    hot_routes = HotRoutes(app, inference_routes([classify.router, embed.router, v2.router]))
    served: ASGIApp = hot_routes
    if settings.cors_origin_list:
        served = Cors(
            served,
            allow_origins=settings.cors_origin_list,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type", "X-Request-ID", "X-Request-Timeout"],
            expose_headers=["X-Request-ID", "X-Queue-Time-Ms", "X-Inference-Time-Ms", "X-Preprocess-Time-Ms"],
        )
    return RequestContextMiddleware(served, metrics)
