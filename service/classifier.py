"""The image path in one place: uploads -> decode/resize -> batcher -> onnxruntime -> top-k."""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from model_export.manifest import Manifest
from service.batcher import Batcher, ImageResult
from service.errors import InvalidParameter, ServiceError
from service.explain import heatmap_png
from service.frontend.decode import Decoder
from service.metrics import Metrics
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
class Attention:
    """Where the [class] token looked: grids over the patches, each summing to 1."""

    rollout: list[list[float]]
    last_layer: list[list[float]]
    heatmap_png: str  # base64 PNG of the rollout over the model's view of the image


@dataclass(frozen=True)
class Classification:
    filename: str
    predictions: list[Prediction]
    attention: Attention | None = None


@dataclass(frozen=True)
class Timings:
    preprocess_s: float  # slowest image's decode and resize
    queue_wait_s: float  # longest wait before an image's batch ran
    inference_s: float  # longest batch this request's images ran in


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)  # type: ignore[no-any-return]


def top_k(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and softmax probabilities of the k largest logits, highest first."""
    probabilities = softmax(logits)
    order = np.argsort(-probabilities, kind="stable")[:k]
    return order, probabilities[order]


class Classifier:
    def __init__(
        self,
        manifest: Manifest,
        backend: OnnxBackend,
        settings: Settings,
        metrics: Metrics,
        explain_backend: OnnxBackend | None = None,
    ) -> None:
        self.manifest = manifest
        self.backend = backend
        self.explain_backend = explain_backend
        self.settings = settings
        self.metrics = metrics
        self.decoder = Decoder(manifest.preprocessing, settings.max_image_pixels)
        self._decode_pool = ThreadPoolExecutor(settings.resolved_preprocess_threads(), thread_name_prefix="decode")
        self._pools: list[ThreadPoolExecutor] = []
        self.batcher = self._batcher_for(backend)
        self.explain_batcher = self._batcher_for(explain_backend) if explain_backend else None

    def _batcher_for(self, backend: OnnxBackend) -> Batcher:
        pool = ThreadPoolExecutor(backend.workers, thread_name_prefix=f"inference-{backend.onnx_path.stem}")
        self._pools.append(pool)
        height, width, channels = self.decoder.shape

        def run_batch(images: list[np.ndarray]) -> list[np.ndarray]:
            # uint8 images go in as pixels, float32 tensors (OIP FP32) as already-normalised rows;
            # the graph answers the pixel rows first, so put the rows back in arrival order.
            pixels = [i for i, image in enumerate(images) if image.dtype == np.uint8]
            tensors = [i for i, image in enumerate(images) if image.dtype != np.uint8]
            outputs = backend.predict(
                np.stack([images[i] for i in pixels]) if pixels else np.empty((0, height, width, channels), np.uint8),
                np.stack([images[i] for i in tensors])
                if tensors
                else np.empty((0, channels, height, width), np.float32),
            )
            order = np.argsort(pixels + tensors)
            return [output[order] for output in outputs]

        return Batcher(
            run_batch,
            pool,
            workers=backend.workers,
            max_batch_size=self.settings.max_batch_size,
            max_wait_s=self.settings.max_wait_ms / 1000.0,
            max_queue_images=self.settings.max_queue_images,
            retry_after_s=self.settings.retry_after_s,
            metrics=self.metrics,
        )

    def _pairs(self) -> list[tuple[OnnxBackend, Batcher]]:
        pairs = [(self.backend, self.batcher)]
        if self.explain_backend is not None and self.explain_batcher is not None:
            pairs.append((self.explain_backend, self.explain_batcher))
        return pairs

    async def start(self) -> None:
        """Warm every session at every batch size the batchers may form, then open the queues."""
        sizes = warm_up_batch_sizes(self.settings.max_batch_size)
        for backend, batcher in self._pairs():
            started = time.perf_counter()
            await asyncio.to_thread(backend.warm_up, sizes, self.decoder.shape)
            logger.info(
                "%s warmed up at batch sizes %s in %.2f s", backend.onnx_path.name, sizes, time.perf_counter() - started
            )
            batcher.start()

    async def stop(self) -> None:
        for _, batcher in self._pairs():
            await batcher.drain()
        self._decode_pool.shutdown(wait=True)
        for pool in self._pools:
            pool.shutdown(wait=True)

    def _decode(self, upload: Upload) -> tuple[np.ndarray, float]:
        started = time.perf_counter()
        try:
            pixels = self.decoder.decode(upload.data)
        except ServiceError as exc:
            exc.part = upload.name
            raise
        elapsed = time.perf_counter() - started
        self.metrics.preprocess_seconds.observe(elapsed)
        return pixels, elapsed

    def _attention(self, pixels: np.ndarray, result: ImageResult) -> Attention:
        _, _, last_layer, rollout = result.outputs
        png = base64.b64encode(heatmap_png(pixels, rollout)).decode("ascii")
        return Attention(rollout=rollout.tolist(), last_layer=last_layer.tolist(), heatmap_png=png)

    def _batcher(self, explain: bool) -> Batcher:
        batcher = self.explain_batcher if explain else self.batcher
        if batcher is None:
            raise InvalidParameter("explain=true needs model_explain.onnx: export the model without --no-explain")
        return batcher

    def check_room(self, explain: bool = False) -> None:
        """429/503 before the body is read, when not even one more image could be admitted."""
        self._batcher(explain).check_room()

    async def _run(
        self, uploads: list[Upload], deadline: float, explain: bool
    ) -> tuple[list[tuple[np.ndarray, float]], list[ImageResult], list[Attention | None]]:
        batcher = self._batcher(explain)
        loop = asyncio.get_running_loop()
        with batcher.admission(len(uploads)):
            decoded = await asyncio.gather(*(loop.run_in_executor(self._decode_pool, self._decode, u) for u in uploads))
            results = await batcher.submit([pixels for pixels, _ in decoded], deadline)
            attention: list[Attention | None] = [None] * len(uploads)
            if explain:
                maps = [
                    loop.run_in_executor(self._decode_pool, self._attention, p, r)
                    for (p, _), r in zip(decoded, results, strict=True)
                ]
                attention = list(await asyncio.gather(*maps))
        self.metrics.images.inc(len(uploads))
        return decoded, results, attention

    async def classify(
        self, uploads: list[Upload], k: int, deadline: float, explain: bool = False
    ) -> tuple[list[Classification], Timings]:
        """Classify every upload or raise the first typed error (naming its part)."""
        decoded, results, attention = await self._run(uploads, deadline, explain)
        labels = self.manifest.labels
        classifications = []
        for upload, result, maps in zip(uploads, results, attention, strict=True):
            indices, scores = top_k(result.outputs[0], k)
            predictions = [Prediction(labels[i], int(i), float(s)) for i, s in zip(indices, scores, strict=True)]
            classifications.append(Classification(upload.name, predictions, maps))
        timings = Timings(
            preprocess_s=max(elapsed for _, elapsed in decoded),
            queue_wait_s=max(r.queue_wait_s for r in results),
            inference_s=max(r.inference_s for r in results),
        )
        return classifications, timings

    async def probabilities(self, uploads: list[Upload], deadline: float) -> np.ndarray:
        """Softmax over every class, (N, num_classes), for encoded images."""
        _, results, _ = await self._run(uploads, deadline, explain=False)
        return softmax(np.stack([r.outputs[0] for r in results]))

    async def probabilities_of_tensor(self, batch: np.ndarray, deadline: float) -> np.ndarray:
        """Softmax over every class for an already preprocessed float32 (N, C, H, W) batch."""
        with self.batcher.admission(len(batch)):
            results = await self.batcher.submit(list(batch), deadline)
        self.metrics.images.inc(len(batch))
        return softmax(np.stack([r.outputs[0] for r in results]))
