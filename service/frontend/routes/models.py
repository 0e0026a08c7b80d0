"""GET /v1/models: what is served, on which provider (as the engine reports it), with which batching."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from service.frontend.routes.dependencies import Frontend, get_frontend
from service.frontend.schemas import NOT_READY, BatchingOut, InputSize, ModelInfo, ModelList

router = APIRouter(tags=["models"])


def model_info(frontend: Frontend) -> ModelInfo:
    manifest, settings, info = frontend.manifest, frontend.settings, frontend.engine.model_info
    layout = frontend.engine.ring.layout
    height, width, channels = layout.pixel_shape
    return ModelInfo(
        name=manifest.name,
        labels=manifest.labels,
        input_size=InputSize(channels=channels, height=height, width=width),
        preprocessing=manifest.preprocessing,
        pooling=manifest.pooling,
        prefix_tokens=list(manifest.prefix_tokens),
        head=manifest.head,
        embedding=manifest.embedding,
        variant=manifest.variant,
        variant_gate=manifest.verification.get("variant_gate"),
        provider=info.provider,
        requested_providers=info.requested_providers,
        outputs={name: list(shape) for name, shape in info.rows["plain"]},
        batching=BatchingOut(
            max_batch_size=settings.max_batch_size,
            max_wait_ms=settings.max_wait_ms,
            max_queue_images=settings.max_queue_images,
            frontend_processes=layout.partitions,
            session_workers=info.session_workers,
            intra_op_threads=info.intra_op_threads,
        ),
        onnx_sha256=manifest.onnx_sha256,
        source_sha256=manifest.source.sha256,
    )


@router.get("/v1/models", response_model=ModelList, summary="The served model", responses=NOT_READY)
async def list_models(frontend: Annotated[Frontend, Depends(get_frontend)]) -> ModelList:
    return ModelList(models=[model_info(frontend)])
