"""The one core call both protocols use: admission, decode into this front-end's slots, hand them
to the engine, await their rows while the client stays, give them back; all of it, the body's
reading included, within the request's deadline. The slots' rules are the pool's (admission.py),
the engine's side of them the link's (engine_link.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np

from service.errors import (
    BodyTooSlow,
    ClientDisconnected,
    DeadlineExceeded,
    Draining,
    InvalidParameter,
    NotReady,
    ServiceError,
)
from service.frontend.admission import Admission, SlotPool
from service.frontend.body import BodyClock
from service.frontend.decode import Decoder
from service.frontend.decode_pool import DecodePool
from service.frontend.engine_link import EngineInfo, EngineLink, StallReport, Submission
from service.frontend.spans import annotate
from service.frontend.uploads import Upload
from service.lifecycle import Lifecycle
from service.metrics import FrontendMetrics
from service.settings import Settings
from service.shm_ring import Graph, Ring


@dataclass(frozen=True)
class Answer:
    """The engine's answer to one request: each image's output rows (copied out of the ring)."""

    rows: list[dict[str, np.ndarray]]
    pixels: list[np.ndarray] | None  # what the model saw, for explain's heat map
    preprocess_s: float  # the slowest image's decode
    queue_wait_s: float  # the longest wait in the engine's queue
    inference_s: float  # the longest batch these images ran in


class EngineClient:
    def __init__(
        self,
        ring: Ring,
        partition: int,
        address: str,
        settings: Settings,
        decoder: Decoder,
        lifecycle: Lifecycle,
        metrics: FrontendMetrics,
        on_stall: StallReport,
    ) -> None:
        self.ring = ring
        self.settings = settings
        self.decoder = decoder
        self.lifecycle = lifecycle
        self.metrics = metrics
        self.slots = SlotPool(ring, partition, settings, metrics)
        self.link = EngineLink(address, partition, self.slots, lifecycle, metrics, settings.engine_stall_s, on_stall)
        self._decode_pool = DecodePool(settings.resolved_preprocess_threads(ring.layout.partitions))

    @property
    def info(self) -> EngineInfo | None:
        """What the engine said of itself; None until it first welcomed this front-end."""
        return self.link.info

    @property
    def model_info(self) -> EngineInfo:
        """The engine's welcome; routes run only after the lifespan received it."""
        assert self.link.info is not None
        return self.link.info

    @property
    def connected(self) -> bool:
        return self.link.connected

    async def start(self, timeout_s: float) -> EngineInfo:
        """Connect (and keep reconnecting) to the engine; returns once it has welcomed us."""
        return await self.link.start(timeout_s)

    async def drain(self, grace_s: float) -> bool:
        """Refuse new work, answer what waits for an engine that will not come back, and wait for
        the rest; False if grace_s passed with requests still in flight. Those still waiting for
        their rows then are answered 503 at once, before the process goes, rather than cut off."""
        self.lifecycle.begin_drain()
        self.link.fail_if_no_engine_comes()
        if await self.lifecycle.wait_idle(grace_s):
            return True
        message = "the drain grace passed before this request's images were classified; retry on another replica"
        self.link.fail_waiting(Draining(message, retry_after=self.lifecycle.retry_after_s))
        return False

    async def close(self) -> None:
        await self.link.close()
        self._decode_pool.shutdown()

    # --- admission -------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def admitted(self, declared_bytes: int | None, deadline: float) -> AsyncIterator[Admission]:
        """Count the request for the drain and refuse it now if it cannot be served: 503 while
        draining or without an engine, 429 when this front-end has no room for the images its
        body is likely to hold. Checked before the body is read, so a full server answers without
        reading uploads it would refuse, and a burst of large uploads is refused at once.

        The deadline covers everything inside, the body's reading too: a client that stalls
        mid-body holds its reserved slots until then, or until it falls behind the minimum body
        rate once its grace has passed (408), and no longer; its connection closes."""
        with self.lifecycle.track():
            if not self.connected:
                raise NotReady(
                    "the engine is not running (it is starting or restarting)", retry_after=self.settings.retry_after_s
                )
            settings = self.settings
            clock = BodyClock(deadline, settings.min_body_rate_bytes_s, settings.body_rate_grace_s)
            admission = self.slots.reserve(declared_bytes, clock)
            try:
                async with clock.timeout:
                    yield admission
            except TimeoutError:
                if admission.reading and clock.rate_ran_out():
                    self.metrics.rejections.labels(reason="body_too_slow").inc()
                    raise BodyTooSlow(
                        f"the body arrived slower than {clock.min_rate:g} bytes/s once {clock.grace_s:g} s had passed"
                    ) from None
                self.metrics.rejections.labels(reason="deadline").inc()
                if admission.reading:
                    raise DeadlineExceeded(
                        "the request's deadline passed before its body arrived", body_unread=True
                    ) from None
                raise DeadlineExceeded("the request's deadline passed before its images were classified") from None
            except ClientDisconnected:
                if admission.reading:  # the body's reader raised it; run() counts those it raises itself
                    self._count_client_left()
                raise
            finally:
                for slot in admission.slots:
                    self.slots.free(slot)

    def hold(self, admission: Admission, images: int, bytes_read: int) -> None:
        """Keep a slot for each image a streamed body now looks to hold; 429 once they do not fit
        (SlotPool.hold)."""
        self.slots.hold(admission, images, bytes_read)

    # --- the core call ---------------------------------------------------------------------

    async def run(
        self,
        admission: Admission,
        inputs: Sequence[Upload | np.ndarray],
        *,
        explain: bool = False,
        gone: asyncio.Future[None] | None = None,
    ) -> Answer:
        """Each input's output rows, in order, for the body `admission` admitted (within its
        deadline, which `admitted` keeps). Uploads are decoded here; float32 (C, H, W) arrays
        are already-normalised rows (the OIP FP32 input). Typed errors: the first bad upload
        (naming its part), 429 when more images came than were admitted and there is no room,
        499 when the client left (`gone`: resolved when its connection ends), noticed while its
        images decode too: those not yet started are never decoded."""
        admission.body_read()
        graph = Graph.EXPLAIN if explain else Graph.PLAIN
        if self.info is not None and not self.info.has(graph):
            raise InvalidParameter(
                "explain=true needs the explain graph (model_explain.onnx), which a model without a [class] "
                "token, or one exported with --no-explain, does not have"
            )
        uploads = sum(isinstance(item, Upload) for item in inputs)
        images, tensors = (iter(held) for held in self.slots.settle(admission, uploads, len(inputs) - uploads))
        slots = [next(images) if isinstance(item, Upload) else next(tensors) for item in inputs]
        submission = Submission(graph, admission.deadline, slots)
        try:
            decode_s = await self._fill(inputs, slots, gone)
            self.link.submit(submission)
            await self._wait(submission, gone)
            answer = self._read(submission, decode_s, with_pixels=explain)
        finally:
            self.link.give_back(submission)
        self.metrics.images.inc(len(slots))
        annotate(answer)
        return answer

    async def _fill(
        self, inputs: Sequence[Upload | np.ndarray], slots: list[int], gone: asyncio.Future[None] | None
    ) -> float:
        """Write every input into its slot; the slowest decode's seconds. Every decode finishes
        before this returns or raises: a slot is never freed while a thread still writes it."""
        if len(inputs) == 1 and isinstance(inputs[0], Upload) and self.decoder.is_quick(inputs[0].data):
            # A request's one small JPEG is decoded on the loop, busy or not: waking a decode thread
            # and then the loop costs about what the decode does, and a front-end has a core of its
            # own (default model, five alternating rounds: 1,091 against 960 requests/s at 16
            # connections, 1,215 against 1,133 at 64, p99 lower at both). A turn of the loop is held
            # up by at most its requests' quick decodes; several images go to the threads.
            return self._decode(inputs[0], slots[0])
        uploads = []
        for item, slot in zip(inputs, slots, strict=True):
            if isinstance(item, Upload):
                uploads.append((item, slot))
            else:
                self.ring.tensors[self.ring.tensor_index(slot)] = item
        # A body of many large uploads decodes for a second or more: stop once nobody will read it.
        outcomes = await self._decode_pool.starmap(self._decode, uploads, stop=gone)
        if gone is not None and gone.done():
            self._count_client_left()
            raise ClientDisconnected("the client closed the connection while its images were decoding")
        seconds = []
        for outcome in outcomes:
            if isinstance(outcome, Exception):
                raise outcome  # the first bad upload, in the request's order
            assert outcome is not None  # skipped only once the client left, which raised above
            seconds.append(outcome)
        return max(seconds, default=0.0)

    def _decode(self, upload: Upload, slot: int) -> float:
        started = time.perf_counter()
        try:
            self.decoder.decode_into(upload.data, self.ring.pixels[slot])
        except ServiceError as exc:
            exc.part = upload.name
            raise
        elapsed = time.perf_counter() - started
        self.metrics.preprocess_seconds.observe(elapsed)
        return elapsed

    async def _wait(self, submission: Submission, gone: asyncio.Future[None] | None) -> None:
        leave = partial(self._client_left, submission)
        if gone is not None:
            gone.add_done_callback(leave)  # on a connection already closed: called at the next turn
        try:
            await submission.outcome
        finally:
            if gone is not None:
                gone.remove_done_callback(leave)

    def _client_left(self, submission: Submission, _: object = None) -> None:
        if not submission.outcome.done():
            self._count_client_left()
            submission.fail(ClientDisconnected("the client closed the connection before its answer"))

    def _count_client_left(self) -> None:
        self.metrics.rejections.labels(reason="client_disconnected").inc()

    def _read(self, submission: Submission, decode_s: float, with_pixels: bool) -> Answer:
        assert self.info is not None
        spans = self.info.spans[submission.graph.name.lower()]
        rows = []
        for slot in submission.slots:
            row = self.ring.outputs[slot]
            rows.append({name: row[start:stop].reshape(shape).copy() for name, start, stop, shape in spans})
        pixels = [self.ring.pixels[slot].copy() for slot in submission.slots] if with_pixels else None
        done = list(submission.done.values())
        return Answer(
            rows,
            pixels,
            decode_s,
            max(record.queue_wait_s for record in done),
            max(record.inference_s for record in done),
        )
