"""`create_app(settings)`: the FastAPI app; its lifespan loads, checks and warms the model."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from model_export.manifest import EXPLAIN_OUTPUT_NAMES
from service.access import require_api_key
from service.classifier import Classifier
from service.errors import install_error_handlers
from service.lifecycle import Lifecycle
from service.metrics import Metrics
from service.middleware import RequestContextMiddleware
from service.routes import classify, demo, health, models, v2
from service.runtime import OnnxBackend, load_manifest
from service.settings import Settings, get_settings

logger = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    metrics = Metrics()
    lifecycle = Lifecycle()
    metrics.in_flight.set_function(lambda: lifecycle.in_flight)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Start-up order: load -> check providers -> warm up -> start the batcher -> ready.
        manifest = await asyncio.to_thread(load_manifest, settings.model_dir)
        plain = settings.model_dir / manifest.onnx_file
        backend = await asyncio.to_thread(OnnxBackend, plain, manifest, settings, manifest.output_names[:1])
        explain_backend = None
        if manifest.explain_onnx_file:
            # One session: explain requests are the exception, and must not take cores from the rest.
            explain = settings.model_dir / manifest.explain_onnx_file
            explain_backend = await asyncio.to_thread(
                OnnxBackend, explain, manifest, settings, EXPLAIN_OUTPUT_NAMES, workers=1
            )
        classifier = Classifier(manifest, backend, settings, metrics, explain_backend)
        await classifier.start()
        app.state.classifier = classifier
        metrics.model_info.labels(model=manifest.name, provider=backend.provider, variant=manifest.variant).set(1)
        lifecycle.started = True
        logger.info("ready: %s on %s", manifest.name, backend.provider)
        try:
            yield
        finally:
            lifecycle.begin_drain()
            if not await lifecycle.wait_idle(settings.drain_grace_s):
                logger.warning(
                    "drain grace of %.1f s passed with %d requests in flight",
                    settings.drain_grace_s,
                    lifecycle.in_flight,
                )
            await classifier.stop()
            logger.info("stopped")

    app = FastAPI(
        title="ViT classification service",
        summary="Image classification with a Vision Transformer on onnxruntime, with dynamic micro-batching.",
        version="0.1.0",
        lifespan=lifespan,
        root_path=settings.root_path,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.lifecycle = lifecycle
    install_error_handlers(app)
    app.include_router(classify.router)
    app.include_router(models.router)
    app.include_router(health.router)
    app.include_router(v2.router)
    app.include_router(demo.router)

    metrics_guard = [Depends(require_api_key)] if settings.metrics_require_key else []

    @app.get("/metrics", include_in_schema=False, dependencies=metrics_guard)
    async def prometheus(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    if settings.cors_origin_list:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origin_list,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type", "X-Request-ID", "X-Request-Timeout"],
            expose_headers=["X-Request-ID", "X-Queue-Time-Ms", "X-Inference-Time-Ms", "X-Preprocess-Time-Ms"],
        )
    app.add_middleware(RequestContextMiddleware, metrics=metrics)
    return app
