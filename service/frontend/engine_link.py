"""A front-end's connection to the engine: what it welcomed us with, the slots handed to it (a
SUBMIT per turn of the event loop), the DONE records that answer them, and what losing it means.

A slot is in exactly one place: free in the pool, being written here (decode), or in the engine
(from SUBMIT until its DONE). A request that gives up (deadline, disconnect, error) leaves its
slots in the engine as orphans, freed when their DONE arrives. If the engine dies, nothing touches
the slots any more: orphans are freed at once, and the images of requests still waiting are sent
again to the next engine (once; a request whose images outlive two engines fails).

An engine that is alive but stuck (a GPU that hangs in a kernel, a deadlock) would hold its images
for ever and its connection open, so it is watched: a healthy engine answers every image by its
deadline, at the latest when the batch it runs in ends, since a queued image is answered as soon
as it expires or is cancelled. An orphan still in the engine `VIT_ENGINE_STALL_S` past its
request's deadline is in a batch that has run that long, or in an engine that reads nothing: the
supervisor is told, and kills the engine, which then restarts as after any death.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

from service.errors import DeadlineExceeded, InferenceFailed, NotReadyDraining, ServiceError
from service.frontend.admission import SlotPool
from service.lifecycle import Lifecycle
from service.metrics import FrontendMetrics
from service.shm_ring import (
    Done,
    Graph,
    Kind,
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
WATCH_S = 1.0  # between looks for images the engine holds past their deadline and VIT_ENGINE_STALL_S


@dataclass(frozen=True)
class EngineInfo:
    """What the engine said of itself when it welcomed this front-end."""

    pid: int
    provider: str
    requested_providers: list[str]
    session_workers: int
    intra_op_threads: int
    rows: dict[str, list[tuple[str, tuple[int, ...]]]]  # graph -> each output's name and per-image shape

    @classmethod
    def from_json(cls, data: bytes) -> EngineInfo:
        raw = json.loads(data)
        rows = {graph: [(name, tuple(shape)) for name, shape in outputs] for graph, outputs in raw["rows"].items()}
        workers, threads = raw["session_workers"], raw["intra_op_threads"]
        return cls(raw["pid"], raw["provider"], raw["requested_providers"], workers, threads, rows)

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


@dataclass(eq=False)
class Submission:
    """One request's inputs on their way through the engine: its slots, and each one's DONE."""

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


# Told of an engine that holds images past their deadline and the stall allowance: its pid, how
# many images, and how long past its deadline the oldest is.
StallReport = Callable[[int, int, float], None]


class EngineLink:
    def __init__(
        self,
        address: str,
        partition: int,
        slots: SlotPool,
        lifecycle: Lifecycle,
        metrics: FrontendMetrics,
        stall_s: float,
        on_stall: StallReport,
    ) -> None:
        self.address = address
        self.partition = partition
        self.slots = slots
        self.lifecycle = lifecycle
        self.metrics = metrics
        self.stall_s = stall_s
        self.on_stall = on_stall
        self._in_engine: dict[int, Submission | None] = {}  # None: an orphan, freed on its DONE
        self._orphan_deadlines: dict[int, float] = {}  # of the orphans in _in_engine, for the watch
        self._watch_handle: asyncio.TimerHandle | None = None
        # Handed to the engine (in _in_engine too), not yet sent; and orphans the engine has, not yet
        # cancelled there. While either holds anything a flush is on its way: scheduled this turn,
        # or waiting for the engine's socket to drain.
        self._outbox: dict[int, Submission] = {}
        self._cancels: list[int] = []
        self._waiting: set[Submission] = set()
        self._sock: socket.socket | None = None
        self._connection: asyncio.Task[None] | None = None
        self._welcomed = asyncio.Event()
        self.info: EngineInfo | None = None

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

    async def close(self) -> None:
        if self._connection is not None:
            self._connection.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._connection
        if self._sock is not None:
            self._sock.close()

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
            if self.stall_s:
                self._watch_later(self.info.pid)
            try:
                await lost
            finally:
                if self._watch_handle is not None:
                    self._watch_handle.cancel()
                    self._watch_handle = None
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

    def _watch_later(self, engine_pid: int) -> None:
        self._watch_handle = asyncio.get_running_loop().call_later(WATCH_S, self._watch, engine_pid)

    def _watch(self, engine_pid: int) -> None:
        """Tell the supervisor, once, if this engine holds an orphan past its deadline and the stall
        allowance; else look again in a while."""
        now = time.monotonic()
        overdue = [deadline for deadline in self._orphan_deadlines.values() if now - deadline > self.stall_s]
        if not overdue:
            self._watch_later(engine_pid)
            return
        self._watch_handle = None
        self.on_stall(engine_pid, len(overdue), now - min(overdue))

    def _on_done(self, record: Done) -> None:
        submission = self._in_engine.pop(record.slot)
        if submission is None:
            del self._orphan_deadlines[record.slot]
            self.slots.free(record.slot)
            return
        submission.done[record.slot] = record
        if record.status == Status.FAILED:
            submission.fail(InferenceFailed("inference failed for a batch holding this request's images"))
        elif record.status == Status.EXPIRED:
            submission.fail(DeadlineExceeded("the request's deadline passed while its images were queued"))
        else:
            self.metrics.queue_wait_seconds.observe(record.queue_wait_s)
            if len(submission.done) == len(submission.slots) and not submission.outcome.done():
                submission.outcome.set_result(None)

    def _engine_lost(self) -> None:
        """Nothing touches the slots now: orphans are free; waiting requests keep theirs for the next engine."""
        logger.warning("lost the engine: %d image(s) were in it", len(self._in_engine))
        # The outbox's slots are all in _in_engine, given back below like those the engine had.
        self._outbox.clear()
        self._cancels.clear()
        self._orphan_deadlines.clear()
        for slot, submission in list(self._in_engine.items()):
            del self._in_engine[slot]
            if submission is None:
                self.slots.free(slot)
            else:
                submission.unsent.add(slot)
        for submission in self._waiting:
            if submission.unsent:
                submission.engines_lost += 1
                if submission.engines_lost > 1:
                    submission.fail(InferenceFailed("the engine stopped twice while this request's images were in it"))
        self.fail_if_no_engine_comes()

    def fail_if_no_engine_comes(self) -> None:
        """While the server drains no engine comes back: without one, what waits for it is answered now."""
        if self.lifecycle.draining and not self.connected:
            self.fail_waiting(self._no_engine())

    def _no_engine(self) -> NotReadyDraining:
        return NotReadyDraining("the engine stopped while the server drains", retry_after=self.lifecycle.retry_after_s)

    def fail_waiting(self, error: ServiceError) -> None:
        """Answer every request still waiting for its rows with `error` now."""
        for submission in self._waiting:
            submission.fail(error)

    def _resubmit(self) -> None:
        for submission in self._waiting:
            if submission.unsent and not submission.outcome.done():
                self._send(submission, sorted(submission.unsent))

    def submit(self, submission: Submission) -> None:
        """Hand the request's slots to the engine, or keep them for the next one while there is none."""
        self._waiting.add(submission)
        if self.connected:
            self._send(submission, submission.slots)
        else:
            submission.unsent.update(submission.slots)
            self.fail_if_no_engine_comes()  # its body was still arriving when a draining server's engine went

    def _send(self, submission: Submission, slots: list[int]) -> None:
        """Hand these slots to the engine. They leave in one SUBMIT with every other slot handed
        over in this turn of the event loop: one send here and one wake-up of the engine's reader
        for all of them, instead of one per request."""
        submission.unsent.difference_update(slots)
        self._flush_soon()
        for slot in slots:
            self._in_engine[slot] = submission
            self._outbox[slot] = submission

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
            slots = [slot for slot, submission in self._outbox.items() if submission.graph == graph][:SUBMIT_RECORDS]
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
                submission = self._in_engine.pop(slot)
                if submission is None:  # its request gave up meanwhile
                    del self._orphan_deadlines[slot]
                    self.slots.free(slot)
                else:
                    submission.unsent.add(slot)
        return True

    def give_back(self, submission: Submission) -> None:
        """Free what is ours; what is still in the engine becomes an orphan, cancelled there."""
        self._waiting.discard(submission)
        if submission.outcome.done() and not submission.outcome.cancelled():
            submission.outcome.exception()  # seen: a failure that lost the race to a timeout is no news
        orphans = []
        for slot in submission.slots:
            if self._outbox.pop(slot, None) is not None:  # never sent: the engine knows nothing of it
                del self._in_engine[slot]
                self.slots.free(slot)
            elif slot in self._in_engine:
                self._in_engine[slot] = None
                self._orphan_deadlines[slot] = submission.deadline
                orphans.append(slot)
            else:
                self.slots.free(slot)
        if orphans:
            self._flush_soon()
            self._cancels += orphans
