"""Dynamic micro-batching: callers append images and await; one owner task forms the batches.

Admission is bounded in images (429 beyond it) and reserved before decoding, so an overloaded
server refuses at once instead of decoding work it cannot queue. A batch is formed only when a session
worker is free, so while all workers are busy the queue grows into the next, larger batch.
Items whose caller left or whose deadline passed are dropped before inference and counted.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from service.errors import DeadlineExceeded, Draining, InferenceFailed, Overloaded
from service.metrics import Metrics

logger = logging.getLogger(__name__)

RunBatch = Callable[[list[np.ndarray]], list[np.ndarray]]


@dataclass(frozen=True)
class ImageResult:
    outputs: list[np.ndarray]  # this image's row of every graph output; logits first
    queue_wait_s: float  # from admission to the start of its batch
    inference_s: float  # wall time of the batch it ran in
    batch_size: int


@dataclass
class _Item:
    pixels: np.ndarray
    deadline: float  # event-loop time
    enqueued: float
    future: asyncio.Future[ImageResult] = field(repr=False)


class Batcher:
    def __init__(
        self,
        run_batch: RunBatch,
        executor: Executor,
        *,
        workers: int,
        max_batch_size: int,
        max_wait_s: float,
        max_queue_images: int,
        retry_after_s: int,
        metrics: Metrics,
    ) -> None:
        self._run_batch = run_batch
        self._executor = executor
        self._max_batch_size = max_batch_size
        self._max_wait_s = max_wait_s
        self._max_queue_images = max_queue_images
        self._retry_after_s = retry_after_s
        self._metrics = metrics
        self._queue: collections.deque[_Item] = collections.deque()
        self._has_items = asyncio.Event()
        self._free_workers = asyncio.Semaphore(workers)
        self._running: set[asyncio.Task[None]] = set()
        self._progress = asyncio.Event()  # set whenever work starts, finishes or is dropped
        self._owner: asyncio.Task[None] | None = None
        self._accepting = False
        self._admitted = 0  # images of requests between admission and their answer

    @property
    def admitted_images(self) -> int:
        return self._admitted

    def start(self) -> None:
        self._accepting = True
        self._owner = asyncio.get_running_loop().create_task(self._form_batches(), name="batcher-owner")

    def check_room(self, count: int = 1) -> None:
        """Refuse now (503 draining, 429 full) unless `count` more images could be admitted.

        Called with 1 before a request's body is read, so a full server answers without
        reading or parsing uploads it would refuse anyway."""
        if not self._accepting:
            self._metrics.rejections.labels(reason="draining").inc()
            raise Draining("the server is shutting down", retry_after=self._retry_after_s)
        if self._admitted + count > self._max_queue_images:
            self._metrics.rejections.labels(reason="overloaded").inc()
            raise Overloaded(
                f"{self._admitted} of {self._max_queue_images} images already admitted; retry later",
                retry_after=self._retry_after_s,
            )

    @contextmanager
    def admission(self, count: int) -> Iterator[None]:
        """Hold room for `count` images for the life of a request, or refuse now (503 / 429)."""
        self.check_room(count)
        self._admitted += count
        try:
            yield
        finally:
            self._admitted -= count

    async def submit(self, images: list[np.ndarray], deadline: float) -> list[ImageResult]:
        """Queue admitted images and wait for their results in order; 504 when the deadline passes."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        items = [_Item(pixels, deadline, now, loop.create_future()) for pixels in images]
        self._queue.extend(items)
        self._metrics.queue_depth.set(len(self._queue))
        self._has_items.set()
        try:
            async with asyncio.timeout_at(deadline):
                return list(await asyncio.gather(*(item.future for item in items)))
        except TimeoutError:
            self._metrics.rejections.labels(reason="deadline").inc()
            raise DeadlineExceeded("the request's deadline passed before its images were classified") from None
        finally:
            # If this caller failed, timed out or was cancelled (client gone), its other images
            # are cancelled here and skipped by the owner instead of being run for nobody.
            for item in items:
                item.future.cancel()

    async def _form_batches(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._free_workers.acquire()
            batch = [await self._next_live_item()]
            window_closes = loop.time() + self._max_wait_s
            while len(batch) < self._max_batch_size:
                if not self._queue:
                    self._has_items.clear()
                    remaining = window_closes - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        async with asyncio.timeout(remaining):
                            await self._has_items.wait()
                    except TimeoutError:
                        break
                item = self._pop_live()
                if item is not None:
                    batch.append(item)
            self._metrics.queue_depth.set(len(self._queue))
            task = loop.create_task(self._execute(batch))
            self._running.add(task)
            task.add_done_callback(self._finished)
            self._progress.set()

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._progress.set()

    async def _next_live_item(self) -> _Item:
        while True:
            while not self._queue:
                self._has_items.clear()
                await self._has_items.wait()
            item = self._pop_live()
            if item is not None:
                return item

    def _pop_live(self) -> _Item | None:
        """The next item worth running, or None if the one popped was dropped."""
        item = self._queue.popleft()
        self._progress.set()
        if item.future.done():  # its caller already gave up (disconnect, or a sibling failed)
            self._metrics.rejections.labels(reason="cancelled").inc()
            return None
        if asyncio.get_running_loop().time() >= item.deadline:
            self._metrics.rejections.labels(reason="deadline").inc()
            item.future.set_exception(DeadlineExceeded("the request's deadline passed while it was queued"))
            return None
        return item

    async def _execute(self, batch: list[_Item]) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            outputs = await loop.run_in_executor(self._executor, self._run_batch, [item.pixels for item in batch])
        except Exception as exc:  # a failed batch fails its own members only, and says so
            logger.exception("inference failed for a batch of %d images", len(batch))
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(InferenceFailed(f"inference failed: {type(exc).__name__}: {exc}"))
            return
        finally:
            self._free_workers.release()
        elapsed = loop.time() - started
        self._metrics.batch_size.observe(len(batch))
        self._metrics.inference_seconds.observe(elapsed)
        for index, item in enumerate(batch):
            self._metrics.queue_wait_seconds.observe(started - item.enqueued)
            if not item.future.done():
                rows = [output[index] for output in outputs]
                item.future.set_result(ImageResult(rows, started - item.enqueued, elapsed, len(batch)))

    async def drain(self) -> None:
        """Stop admitting, let everything queued and running finish, then stop the owner."""
        self._accepting = False
        while self._queue or self._running:
            self._progress.clear()
            await self._progress.wait()
        if self._owner is not None:
            self._owner.cancel()
            await asyncio.gather(self._owner, return_exceptions=True)
