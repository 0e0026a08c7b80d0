"""The one core call both protocols use: admission, decode into this front-end's slots, hand them
to the engine, await their rows while the client stays, give them back; all of it, the body's
reading included, within the request's deadline.

A slot is in exactly one place: free here, being written here (decode), or in the engine (from
SUBMIT until its DONE). A request that gives up (deadline, disconnect, error) leaves its slots in
the engine as orphans, freed when their DONE arrives. If the engine dies, nothing touches the
slots any more: orphans are freed at once, and the images of requests still waiting are sent
again to the next engine (once; a request whose images outlive two engines fails).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import socket
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property, partial

import numpy as np

from service.errors import (
    ClientDisconnected,
    DeadlineExceeded,
    InferenceFailed,
    InvalidParameter,
    NotReady,
    Overloaded,
    ServiceError,
)
from service.frontend.decode import Decoder
from service.frontend.decode_pool import DecodePool
from service.frontend.uploads import Upload
from service.lifecycle import Lifecycle
from service.metrics import FrontendMetrics
from service.settings import Settings
from service.shm_ring import (
    Done,
    Graph,
    Kind,
    Ring,
    Status,
    cancel,
    hello,
    kind_of,
    parse_done,
    parse_welcome,
    submit,
)

logger = logging.getLogger(__name__)
MAX_MESSAGE = 1 << 16
SUBMIT_RECORDS = 4096  # per message: 12 bytes each keeps a SUBMIT within the engine's MAX_MESSAGE
RECONNECT_S = 0.05  # between attempts while the engine restarts
BYTES_PER_IMAGE_WEIGHT = 0.2  # of each new body in the moving average: a few requests to follow a change
# The learnt bytes per image is a quotient itself: a body N times that size divides back to N plus
# float noise (for about 4% of sizes), which must not round up to N + 1 images.
QUOTIENT_NOISE = 1e-9


@dataclass(frozen=True)
class EngineInfo:
    """What the engine said of itself when it welcomed this front-end."""

    provider: str
    requested_providers: list[str]
    session_workers: int
    intra_op_threads: int
    rows: dict[str, list[tuple[str, tuple[int, ...]]]]  # graph -> each output's name and per-image shape

    @classmethod
    def from_json(cls, data: bytes) -> EngineInfo:
        raw = json.loads(data)
        rows = {graph: [(name, tuple(shape)) for name, shape in outputs] for graph, outputs in raw["rows"].items()}
        return cls(raw["provider"], raw["requested_providers"], raw["session_workers"], raw["intra_op_threads"], rows)

    def has(self, graph: Graph) -> bool:
        return graph.name.lower() in self.rows

    @cached_property
    def spans(self) -> dict[str, list[tuple[str, int, int, tuple[int, ...]]]]:
        """Per graph, where each output lies in a slot's row: (name, start, stop, per-image shape)."""
        spans: dict[str, list[tuple[str, int, int, tuple[int, ...]]]] = {}
        for graph, outputs in self.rows.items():
            spans[graph], start = [], 0
            for name, shape in outputs:
                stop = start + math.prod(shape)
                spans[graph].append((name, start, stop, shape))
                start = stop
        return spans

    def row_shape(self, output: str, graph: Graph = Graph.PLAIN) -> tuple[int, ...]:
        return dict(self.rows[graph.name.lower()])[output]


@dataclass(frozen=True)
class Answer:
    """The engine's answer to one request: each image's output rows (copied out of the ring)."""

    rows: list[dict[str, np.ndarray]]
    pixels: list[np.ndarray] | None  # what the model saw, for explain's heat map
    preprocess_s: float  # the slowest image's decode
    queue_wait_s: float  # the longest wait in the engine's queue
    inference_s: float  # the longest batch these images ran in


@dataclass(eq=False)
class Admission:
    """What an admitted request holds while its body is read: the image slots its size suggests."""

    declared_bytes: int | None  # the body's Content-Length, when it has one
    deadline: float  # time.monotonic()
    slots: list[int]
    reading: bool = True  # until the core call takes the body's inputs


@dataclass(eq=False)
class _Request:
    graph: Graph
    deadline: float  # time.monotonic()
    slots: list[int]
    unsent: set[int] = field(default_factory=set)  # waiting for an engine to send them to
    done: dict[int, Done] = field(default_factory=dict)
    outcome: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    engines_lost: int = 0

    def fail(self, error: ServiceError) -> None:
        if not self.outcome.done():
            self.outcome.set_exception(error)


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
    ) -> None:
        self.ring = ring
        self.partition = partition
        self.address = address
        self.settings = settings
        self.decoder = decoder
        self.lifecycle = lifecycle
        self.metrics = metrics
        layout = ring.layout
        # Stacks: the slot freed last is reused first, so a light load keeps touching the same pages.
        self._free_images = list(reversed(layout.image_slot_ids(partition)))
        self._free_tensors = list(reversed(layout.tensor_slot_ids(partition)))
        self._bytes_per_image: float | None = None  # of the bodies read so far, a moving average
        self._in_engine: dict[int, _Request | None] = {}  # None: an orphan, freed on its DONE
        # Handed to the engine (in _in_engine too), not yet sent; and orphans the engine has, not yet
        # cancelled there. While either holds anything a flush is on its way: scheduled this turn,
        # or waiting for the engine's socket to drain.
        self._outbox: dict[int, _Request] = {}
        self._cancels: list[int] = []
        self._requests: set[_Request] = set()
        self._decode_pool = DecodePool(settings.resolved_preprocess_threads(layout.partitions))
        self._sock: socket.socket | None = None
        self._connection: asyncio.Task[None] | None = None
        self._welcomed = asyncio.Event()
        self.info: EngineInfo | None = None

    @property
    def model_info(self) -> EngineInfo:
        """The engine's welcome; routes run only after the lifespan received it."""
        assert self.info is not None
        return self.info

    # --- the connection --------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self.lifecycle.engine_connected

    async def start(self, timeout_s: float) -> EngineInfo:
        """Connect (and keep reconnecting) to the engine; returns once it has welcomed us."""
        self._connection = asyncio.get_running_loop().create_task(self._stay_connected(), name="engine-connection")
        async with asyncio.timeout(timeout_s):
            await self._welcomed.wait()
        assert self.info is not None
        return self.info

    async def _stay_connected(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, self.address)
                await loop.sock_sendall(sock, hello(self.partition))
                message = await loop.sock_recv(sock, MAX_MESSAGE)
                if not message or kind_of(message) != Kind.WELCOME:
                    raise ConnectionError("the engine closed the connection before welcoming us")
            except OSError:
                sock.close()
                await asyncio.sleep(RECONNECT_S)
                continue
            self.info = EngineInfo.from_json(parse_welcome(message))
            self._sock = sock
            lost = loop.create_future()
            loop.add_reader(sock.fileno(), self._on_readable, sock, lost)
            self.lifecycle.started = self.lifecycle.engine_connected = True
            self._resubmit()
            self._welcomed.set()
            logger.info("connected to the engine (%s)", self.info.provider)
            await lost
            loop.remove_reader(sock.fileno())
            loop.remove_writer(sock.fileno())
            sock.close()
            self._sock = None
            self.lifecycle.engine_connected = False
            self._engine_lost()

    def _on_readable(self, sock: socket.socket, lost: asyncio.Future[None]) -> None:
        while True:
            try:
                message = sock.recv(MAX_MESSAGE)
            except BlockingIOError:
                return
            except OSError:
                message = b""
            if not message:
                if not lost.done():
                    lost.set_result(None)
                return
            for record in parse_done(message):
                self._on_done(record)

    def _on_done(self, record: Done) -> None:
        request = self._in_engine.pop(record.slot)
        if request is None:
            self._free(record.slot)
            return
        request.done[record.slot] = record
        if record.status == Status.FAILED:
            request.fail(InferenceFailed("inference failed for a batch holding this request's images"))
        elif record.status == Status.EXPIRED:
            request.fail(DeadlineExceeded("the request's deadline passed while its images were queued"))
        else:
            self.metrics.queue_wait_seconds.observe(record.queue_wait_s)
            if len(request.done) == len(request.slots) and not request.outcome.done():
                request.outcome.set_result(None)

    def _engine_lost(self) -> None:
        """Nothing touches the slots now: orphans are free; waiting requests keep theirs for the next engine."""
        logger.warning("lost the engine: %d image(s) were in it", len(self._in_engine))
        # The outbox's slots are all in _in_engine, given back below like those the engine had.
        self._outbox.clear()
        self._cancels.clear()
        for slot, request in list(self._in_engine.items()):
            del self._in_engine[slot]
            if request is None:
                self._free(slot)
            else:
                request.unsent.add(slot)
        for request in self._requests:
            if request.unsent:
                request.engines_lost += 1
                if request.engines_lost > 1:
                    request.fail(InferenceFailed("the engine stopped twice while this request's images were in it"))
        if self.lifecycle.draining:
            self._fail_waiting()

    async def drain(self, grace_s: float) -> bool:
        """Refuse new work, answer what waits for an engine that will not come back, and wait for
        the rest; False if grace_s passed with requests still in flight."""
        self.lifecycle.begin_drain()
        self._fail_waiting()
        return await self.lifecycle.wait_idle(grace_s)

    def _fail_waiting(self) -> None:
        """While draining no engine comes back: whatever still waits for one is answered now."""
        if not self.connected:
            for request in self._requests:
                request.fail(NotReady("the engine stopped while the server drains"))

    def _resubmit(self) -> None:
        for request in self._requests:
            if request.unsent and not request.outcome.done():
                self._send(request, sorted(request.unsent))

    def _send(self, request: _Request, slots: list[int]) -> None:
        """Hand these slots to the engine. They leave in one SUBMIT with every other slot handed
        over in this turn of the event loop: one send here and one wake-up of the engine's reader
        for all of them, instead of one per request."""
        request.unsent.difference_update(slots)
        self._flush_soon()
        for slot in slots:
            self._in_engine[slot] = request
            self._outbox[slot] = request

    def _flush_soon(self) -> None:
        """At the end of this turn, unless a flush is on its way already."""
        if not self._outbox and not self._cancels:
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        """Send the cancels in a CANCEL, then the outbox, a SUBMIT per graph. What the socket cannot
        take yet (the engine's reader is behind) waits for it to drain: a SUBMIT is in the engine's
        hands already, and a request must not wait on an engine that was never told; a dropped
        CANCEL would run images that nobody waits for."""
        while self._cancels:
            try:
                if not self._try_send(cancel(self._cancels[:SUBMIT_RECORDS])):
                    self._wait_for_drain()
                    return
            except OSError:  # the engine is going: losing it frees the orphans
                pass
            del self._cancels[:SUBMIT_RECORDS]
        while self._outbox:
            graph = next(iter(self._outbox.values())).graph
            slots = [slot for slot, request in self._outbox.items() if request.graph == graph][:SUBMIT_RECORDS]
            if not self._submit(graph, [(slot, self._outbox[slot].deadline) for slot in slots]):
                self._wait_for_drain()
                return
            for slot in slots:
                del self._outbox[slot]

    def _wait_for_drain(self) -> None:
        assert self._sock is not None
        asyncio.get_running_loop().add_writer(self._sock.fileno(), self._drained)

    def _drained(self) -> None:
        assert self._sock is not None
        asyncio.get_running_loop().remove_writer(self._sock.fileno())
        self._flush()

    def _try_send(self, message: bytes) -> bool:
        """False if the socket is full; any other OSError means the engine is going."""
        assert self._sock is not None  # a lost engine empties the outbox and the cancels
        try:
            self._sock.send(message)
        except BlockingIOError:
            return False
        return True

    def _submit(self, graph: Graph, records: list[tuple[int, float]]) -> bool:
        """False if the socket is full; True once sent, or once given back because the engine is going."""
        try:
            return self._try_send(submit(graph, records))
        except OSError:  # the engine is going; the reader sees it and these slots wait for the next one
            for slot, _ in records:
                request = self._in_engine.pop(slot)
                if request is None:  # its request gave up meanwhile
                    self._free(slot)
                else:
                    request.unsent.add(slot)
        return True

    async def close(self) -> None:
        if self._connection is not None:
            self._connection.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._connection
        if self._sock is not None:
            self._sock.close()
        self._decode_pool.shutdown()

    # --- admission -------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def admitted(self, declared_bytes: int | None, deadline: float) -> AsyncIterator[Admission]:
        """Count the request for the drain and refuse it now if it cannot be served: 503 while
        draining or without an engine, 429 when this front-end has no room for the images its
        body is likely to hold. Checked before the body is read, so a full server answers without
        reading uploads it would refuse, and a burst of large uploads is refused at once.

        The deadline covers everything inside, the body's reading too: a client that stalls
        mid-body holds its reserved slots until then and no longer (504, and its connection
        closes)."""
        with self.lifecycle.track():
            self._check_ready()
            admission = Admission(
                declared_bytes, deadline, self._take(self._free_images, self._expected(declared_bytes))
            )
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    yield admission
            except TimeoutError:
                self.metrics.rejections.labels(reason="deadline").inc()
                if admission.reading:
                    raise DeadlineExceeded(
                        "the request's deadline passed before its body arrived", body_unread=True
                    ) from None
                raise DeadlineExceeded("the request's deadline passed before its images were classified") from None
            finally:
                for slot in admission.slots:
                    self._free(slot)

    def _expected(self, declared_bytes: int | None) -> int:
        """The images a body of this size holds, judged by the bodies this front-end has read. At
        least its share of a full body (max_body_bytes / max_images_per_request each), so the bytes
        read at once stay bounded before anything is learnt; one without a Content-Length."""
        if declared_bytes is None:
            return 1
        settings = self.settings
        expected = math.ceil(declared_bytes * settings.max_images_per_request / settings.max_body_bytes)
        if self._bytes_per_image is not None:
            expected = max(expected, math.ceil(declared_bytes / self._bytes_per_image - QUOTIENT_NOISE))
        return max(1, min(settings.max_images_per_request, expected))

    def hold(self, admission: Admission, images: int, bytes_read: int) -> None:
        """As a streamed body's images arrive, keep a slot for each image the body now looks to
        hold (its Content-Length at the bytes per image read so far): 429 as soon as they do not fit,
        without reading the rest. Before anything is learnt every body is admitted as one image,
        so this is what keeps a cold burst of large bodies from being read whole to be refused."""
        # Its Content-Length, when the images read so far have bytes to judge the rest by.
        declared = admission.declared_bytes if bytes_read else None
        expected = images
        if declared is not None:
            # Rounded down: what was read never includes the body's closing boundary, so a body of N
            # like images reads as a little over N; rounding up would keep a slot too many.
            expected = max(images, min(self.settings.max_images_per_request, declared * images // bytes_read))
        missing = expected - len(admission.slots)
        if missing <= 0:
            return
        try:
            admission.slots += self._take(self._free_images, missing)
        except Overloaded:
            # Taught as the whole body would teach it once read (its size over its images), so that
            # the admissions that follow refuse such bodies at once, and admit them when they fit.
            self._learn(declared, expected)
            raise

    def _learn(self, declared_bytes: int | None, images: int) -> None:
        # A sample of no bytes would make the size zero, and the next body is divided by it.
        if not declared_bytes or not images:
            return
        sample = declared_bytes / images
        previous = self._bytes_per_image
        self._bytes_per_image = sample if previous is None else previous + BYTES_PER_IMAGE_WEIGHT * (sample - previous)

    def _check_ready(self) -> None:
        if not self.connected:
            raise NotReady("the engine is not running (it is starting or restarting)", retry_after=self._retry)

    @property
    def _retry(self) -> int:
        return self.settings.retry_after_s

    def _image_room(self) -> int:
        """Images this front-end may still admit: what the queue has left over every front-end."""
        held_by_all = int(self.ring.admitted.sum())
        return min(len(self._free_images), self.settings.max_queue_images - held_by_all)

    def _refuse_full(self, count: int, free: list[int]) -> None:
        self.metrics.rejections.labels(reason="overloaded").inc()
        if free is self._free_tensors:
            limit = f"{self.ring.layout.tensor_slots} FP32 tensors on this front-end"
        else:
            limit = f"{self.settings.max_queue_images} images admitted over every front-end"
        raise Overloaded(f"no room for {count} more ({limit} at most); retry later", retry_after=self._retry)

    def _take(self, free: list[int], count: int) -> list[int]:
        """`count` slots from a free stack, or 429 and none."""
        if count > (self._image_room() if free is self._free_images else len(free)):
            self._refuse_full(count, free)
        slots = [free.pop() for _ in range(count)]
        self._publish_held()
        self.metrics.images_in_flight.inc(count)
        return slots

    def _settle(self, admission: Admission, images: int, tensors: int) -> tuple[list[int], list[int]]:
        """The request's slots, now that its body is read: the admission's image slots trimmed or
        topped up to the images it holds, and its tensor slots. No readiness check: an admitted
        request waits for an engine (within its deadline) even if this one died meanwhile."""
        held = admission.slots
        for slot in held[images:]:
            self._free(slot)
        admission.slots = held[:images]
        admission.slots += self._take(self._free_images, images - len(admission.slots))
        tensor_slots = self._take(self._free_tensors, tensors)
        image_slots, admission.slots = admission.slots, []
        return image_slots, tensor_slots

    def _free(self, slot: int) -> None:
        (self._free_tensors if self.ring.layout.is_tensor(slot) else self._free_images).append(slot)
        self._publish_held()
        self.metrics.images_in_flight.dec()

    def _publish_held(self) -> None:
        # The one count of this process that the other front-ends read (in _image_room).
        self.ring.admitted[self.partition] = self.ring.layout.image_slots - len(self._free_images)

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
        499 when the client left (`gone`: resolved when its connection ends)."""
        admission.reading = False
        graph = Graph.EXPLAIN if explain else Graph.PLAIN
        if self.info is not None and not self.info.has(graph):
            raise InvalidParameter(
                "explain=true needs the explain graph (model_explain.onnx), which a model without a [class] "
                "token, or one exported with --no-explain, does not have"
            )
        uploads = sum(isinstance(item, Upload) for item in inputs)
        if uploads == len(inputs):  # bodies of encoded images only: what admission estimates
            self._learn(admission.declared_bytes, uploads)
        images, tensors = (iter(held) for held in self._settle(admission, uploads, len(inputs) - uploads))
        slots = [next(images) if isinstance(item, Upload) else next(tensors) for item in inputs]
        request = _Request(graph, admission.deadline, slots)
        try:
            decode_s = await self._fill(inputs, slots)
            self._requests.add(request)
            if self.connected:
                self._send(request, slots)
            else:
                request.unsent.update(slots)
            await self._wait(request, gone)
            answer = self._read(request, decode_s, with_pixels=explain)
        finally:
            self._requests.discard(request)
            self._give_back(request)
        self.metrics.images.inc(len(slots))
        return answer

    async def _fill(self, inputs: Sequence[Upload | np.ndarray], slots: list[int]) -> float:
        """Write every input into its slot; the slowest decode's seconds. Every decode finishes
        before this returns or raises: a slot is never freed while a thread still writes it."""
        if (
            len(inputs) == 1
            and isinstance(inputs[0], Upload)
            and self.lifecycle.in_flight == 1
            and self.decoder.is_quick(inputs[0].data)
        ):
            # The only request in this front-end: a small decode on the loop holds nobody up, and
            # costs less than waking a decode thread and then the loop (median answer 2.94 against
            # 3.74 ms at one connection, default model). Under load the threads keep the loop free.
            return self._decode(inputs[0], slots[0])
        jobs = []
        for item, slot in zip(inputs, slots, strict=True):
            if isinstance(item, Upload):
                jobs.append(self._decode_pool.submit(self._decode, item, slot))
            else:
                self.ring.tensors[self.ring.tensor_index(slot)] = item
        everything = asyncio.gather(*jobs, return_exceptions=True)
        try:
            outcomes = await asyncio.shield(everything)
        except asyncio.CancelledError:
            await everything
            raise
        seconds = []
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
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

    async def _wait(self, request: _Request, gone: asyncio.Future[None] | None) -> None:
        leave = partial(self._client_left, request)
        if gone is not None:
            gone.add_done_callback(leave)  # on a connection already closed: called at the next turn
        try:
            await request.outcome
        finally:
            if gone is not None:
                gone.remove_done_callback(leave)

    def _client_left(self, request: _Request, _: object = None) -> None:
        if not request.outcome.done():
            self.metrics.rejections.labels(reason="client_disconnected").inc()
            request.fail(ClientDisconnected("the client closed the connection before its answer"))

    def _read(self, request: _Request, decode_s: float, with_pixels: bool) -> Answer:
        assert self.info is not None
        spans = self.info.spans[request.graph.name.lower()]
        rows = []
        for slot in request.slots:
            row = self.ring.outputs[slot]
            rows.append({name: row[start:stop].reshape(shape).copy() for name, start, stop, shape in spans})
        pixels = [self.ring.pixels[slot].copy() for slot in request.slots] if with_pixels else None
        done = list(request.done.values())
        return Answer(
            rows,
            pixels,
            decode_s,
            max(record.queue_wait_s for record in done),
            max(record.inference_s for record in done),
        )

    def _give_back(self, request: _Request) -> None:
        """Free what is ours; what is still in the engine becomes an orphan, cancelled there."""
        if request.outcome.done() and not request.outcome.cancelled():
            request.outcome.exception()  # seen: a failure that lost the race to a timeout is no news
        orphans = []
        for slot in request.slots:
            if self._outbox.pop(slot, None) is not None:  # never sent: the engine knows nothing of it
                del self._in_engine[slot]
                self._free(slot)
            elif slot in self._in_engine:
                self._in_engine[slot] = None
                orphans.append(slot)
            else:
                self._free(slot)
        if orphans:
            self._flush_soon()
            self._cancels += orphans
