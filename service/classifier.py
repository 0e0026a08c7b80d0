"""The image path in one place: uploads -> decode/resize -> batcher -> onnxruntime -> top-k."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from model_export.manifest import Manifest
from service.batcher import Batcher
from service.errors import ServiceError
from service.metrics import Metrics
from service.preprocess import ImagePreprocessor
from service.runtime import OnnxBackend, warm_up_batch_sizes
from service.settings import Settings
from service.uploads import Upload

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    label: str
    class_id: int
    score: float


@dataclass(frozen=True)
class Classification:
    filename: str
    predictions: list[Prediction]


@dataclass(frozen=True)
class Timings:
    preprocess_s: float  # slowest image's decode and resize
    queue_wait_s: float  # longest wait before an image's batch ran
    inference_s: float  # longest batch this request's images ran in


def top_k(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and softmax probabilities of the k largest logits, highest first."""
    shifted = np.exp(logits - logits.max())
    probabilities = shifted / shifted.sum()
    order = np.argsort(-probabilities, kind="stable")[:k]
    return order, probabilities[order]


class Classifier:
    def __init__(self, manifest: Manifest, backend: OnnxBackend, settings: Settings, metrics: Metrics) -> None:
        self.manifest = manifest
        self.backend = backend
        self.settings = settings
        self.metrics = metrics
        self.preprocessor = ImagePreprocessor(manifest.preprocessing, settings.max_image_pixels)
        self._decode_pool = ThreadPoolExecutor(settings.resolved_preprocess_threads(), thread_name_prefix="decode")
        self._inference_pool = ThreadPoolExecutor(backend.workers, thread_name_prefix="inference")
        self._buffers = threading.local()
        self.batcher = Batcher(
            self._run_batch,
            self._inference_pool,
            workers=backend.workers,
            max_batch_size=settings.max_batch_size,
            max_wait_s=settings.max_wait_ms / 1000.0,
            max_queue_images=settings.max_queue_images,
            retry_after_s=settings.retry_after_s,
            metrics=metrics,
        )

    async def start(self) -> None:
        """Warm every session at every batch size the batcher may form, then open the queue."""
        sizes = warm_up_batch_sizes(self.settings.max_batch_size)
        started = time.perf_counter()
        await asyncio.to_thread(self.backend.warm_up, sizes, self.preprocessor.input_shape)
        logger.info("warm-up at batch sizes %s took %.2f s", sizes, time.perf_counter() - started)
        self.batcher.start()

    async def stop(self) -> None:
        await self.batcher.drain()
        self._decode_pool.shutdown(wait=True)
        self._inference_pool.shutdown(wait=True)

    def _run_batch(self, images: list[np.ndarray]) -> np.ndarray:
        # Each inference thread reuses one float32 buffer: normalisation writes straight into it.
        buffer = getattr(self._buffers, "batch", None)
        if buffer is None:
            shape = (self.settings.max_batch_size, *self.preprocessor.input_shape)
            buffer = self._buffers.batch = np.empty(shape, dtype=np.float32)
        batch = buffer[: len(images)]
        self.preprocessor.normalize_into(images, batch)
        return self.backend.predict(batch)

    def _decode(self, upload: Upload) -> tuple[np.ndarray, float]:
        started = time.perf_counter()
        try:
            pixels = self.preprocessor(upload.data)
        except ServiceError as exc:
            exc.part = upload.name
            raise
        elapsed = time.perf_counter() - started
        self.metrics.preprocess_seconds.observe(elapsed)
        return pixels, elapsed

    async def classify(self, uploads: list[Upload], k: int, deadline: float) -> tuple[list[Classification], Timings]:
        """Classify every upload or raise the first typed error (naming its part)."""
        loop = asyncio.get_running_loop()
        with self.batcher.admission(len(uploads)):
            decoded = await asyncio.gather(*(loop.run_in_executor(self._decode_pool, self._decode, u) for u in uploads))
            results = await self.batcher.submit([pixels for pixels, _ in decoded], deadline)
        self.metrics.images.inc(len(uploads))
        labels = self.manifest.labels
        classifications = []
        for upload, result in zip(uploads, results, strict=True):
            indices, scores = top_k(result.logits, k)
            predictions = [Prediction(labels[i], int(i), float(s)) for i, s in zip(indices, scores, strict=True)]
            classifications.append(Classification(upload.name, predictions))
        timings = Timings(
            preprocess_s=max(elapsed for _, elapsed in decoded),
            queue_wait_s=max(r.queue_wait_s for r in results),
            inference_s=max(r.inference_s for r in results),
        )
        return classifications, timings
