"""GET /v1/models: what is served, on which provider, with which batching."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from service.classifier import Classifier
from service.routes.dependencies import get_classifier
from service.schemas import NOT_READY, BatchingOut, InputSize, ModelInfo, ModelList

router = APIRouter(tags=["models"])


def model_info(classifier: Classifier) -> ModelInfo:
    manifest, settings, backend = classifier.manifest, classifier.settings, classifier.backend
    height, width, channels = classifier.decoder.shape
    return ModelInfo(
        name=manifest.name,
        labels=manifest.labels,
        input_size=InputSize(channels=channels, height=height, width=width),
        preprocessing=manifest.preprocessing,
        pooling=manifest.pooling,
        variant=manifest.variant,
        variant_gate=manifest.verification.get("variant_gate"),  # type: ignore[arg-type]
        provider=backend.provider,
        requested_providers=backend.providers.requested,
        batching=BatchingOut(
            max_batch_size=settings.max_batch_size,
            max_wait_ms=settings.max_wait_ms,
            max_queue_images=settings.max_queue_images,
            session_workers=backend.workers,
            intra_op_threads=settings.intra_op_threads,
        ),
        onnx_sha256=manifest.onnx_sha256,
        source_sha256=manifest.source.sha256,
    )


@router.get("/v1/models", response_model=ModelList, summary="The served model", responses=NOT_READY)  # type: ignore[arg-type]
async def list_models(classifier: Annotated[Classifier, Depends(get_classifier)]) -> ModelList:
    return ModelList(models=[model_info(classifier)])
