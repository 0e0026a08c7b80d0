"""The engine process: the model's sessions and one queue per graph, fed by every front-end.

Threads: one accepts front-ends on an abstract Unix socket; one per front-end reads its SUBMIT
and CANCEL messages into the queues; one per session takes a batch when it is free, gathers the
slots' pixels, runs the graph, writes every output row back into the slots and answers DONE.
Python holds the GIL only for that bookkeeping: onnxruntime releases it while it computes.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from model_export.manifest import Manifest
from service.boot import Boot, read_boot, report, settle_heap, signals_to_pipe
from service.engine.batcher import Batcher, Item
from service.engine.runtime import OnnxBackend, row_size, warm_up_batch_sizes
from service.errors import StartupError
from service.logs import configure_logging
from service.metrics import EngineMetrics
from service.settings import Settings
from service.shm_ring import (
    Done,
    Graph,
    Kind,
    Ring,
    Status,
    done,
    parse_cancel,
    parse_hello,
    parse_submit,
    welcome,
)

logger = logging.getLogger(__name__)
MAX_MESSAGE = 1 << 16
SEND_BUFFER = 1 << 20  # room for many DONE messages, so a busy front-end never stalls a session


@dataclass(eq=False)
class FrontEnd:
    """One connected front-end and the images it has in the engine (queued or running)."""

    partition: int
    sock: socket.socket
    in_engine: int = 0
    alive: bool = True
    send_lock: threading.Lock = field(default_factory=threading.Lock)

    def send(self, message: bytes) -> None:
        if not self.alive:
            return
        try:
            with self.send_lock:
                self.sock.send(message)
        except OSError:  # it died; its reader thread cleans up
            self.alive = False


@dataclass
class GraphRunner:
    """One graph's backend, its queue, and where its output rows go in a slot."""

    graph: Graph
    backend: OnnxBackend
    batcher: Batcher
    rows: list[tuple[str, tuple[int, ...]]]


class Engine:
    def __init__(
        self,
        settings: Settings,
        manifest: Manifest,
        ring: Ring,
        runners: dict[Graph, GraphRunner],
        metrics: EngineMetrics,
    ) -> None:
        self.settings = settings
        self.manifest = manifest
        self.ring = ring
        self.layout = ring.layout
        self.runners = runners
        self.metrics = metrics
        self._lock = threading.Condition()  # guards every FrontEnd's in_engine, and _partitions
        self._partitions: dict[int, FrontEnd] = {}
        self._draining = False

    def info(self) -> dict[str, object]:
        plain = self.runners[Graph.PLAIN].backend
        return {
            "pid": os.getpid(),
            "provider": plain.provider,
            "requested_providers": plain.providers.requested,
            "session_workers": plain.workers,
            "intra_op_threads": self.settings.intra_op_threads,
            "rows": {graph.name.lower(): runner.rows for graph, runner in self.runners.items()},
        }

    # --- front-ends ------------------------------------------------------------------------

    def accept(self, listener: socket.socket) -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except OSError:  # the listener was closed: the engine is stopping
                return
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
            threading.Thread(target=self._serve, args=(sock,), daemon=True, name="frontend-reader").start()

    def _serve(self, sock: socket.socket) -> None:
        # The socket's abstract name is visible to, and connectable by, every process in this network
        # namespace: only the supervisor and what it started (the front-ends), as this user, are served.
        uid, pid = _peer(sock)
        if uid != os.geteuid() or pid == 0 or os.getppid() not in (pid, _parent_of(pid)):
            logger.warning("refused a connection from pid %d, uid %d: not a front-end of this server", pid, uid)
            sock.close()
            return
        partition = parse_hello(sock.recv(MAX_MESSAGE))
        if partition is None or partition >= self.layout.partitions:
            sock.close()
            return
        frontend = FrontEnd(partition, sock)
        self._adopt(frontend)
        frontend.send(welcome(json.dumps(self.info()).encode()))
        try:
            while message := sock.recv(MAX_MESSAGE):
                if message[0] == Kind.SUBMIT:
                    self._submit(frontend, *parse_submit(message))
                elif message[0] == Kind.CANCEL:
                    self._cancel(frontend, set(parse_cancel(message)))
        except OSError:
            pass
        finally:
            self._release(frontend)

    def _adopt(self, frontend: FrontEnd) -> None:
        """Take over a partition once its previous front-end's images have all left the engine:
        until then a running batch may still write into those slots."""
        with self._lock:
            previous = self._partitions.get(frontend.partition)
            while previous is not None and previous.in_engine > 0:
                self._lock.wait()
            self._partitions[frontend.partition] = frontend
        logger.info("front-end %d connected", frontend.partition)

    def _release(self, frontend: FrontEnd) -> None:
        """The front-end is gone: what it still has queued is dropped, never run (its slots are
        reclaimed here); what is running finishes and is answered to nobody."""
        frontend.alive = False
        dropped = 0
        for runner in self.runners.values():
            dropped += len(runner.batcher.remove(lambda item: item.owner is not frontend))
        with self._lock:
            frontend.in_engine -= dropped
            self._lock.notify_all()
        frontend.sock.close()
        if dropped:
            self.metrics.rejections.labels(reason="cancelled").inc(dropped)
        logger.info("front-end %d disconnected; %d queued image(s) dropped", frontend.partition, dropped)

    def _submit(self, frontend: FrontEnd, graph: Graph, slots: list[tuple[int, float]]) -> None:
        runner = self.runners.get(graph)
        images, tensors = (
            self.layout.image_slot_ids(frontend.partition),
            self.layout.tensor_slot_ids(frontend.partition),
        )
        if runner is None or not all(slot in images or slot in tensors for slot, _ in slots):
            # A front-end that breaks the contract is a bug: refuse loudly rather than touch others' slots.
            logger.error("front-end %d sent an invalid SUBMIT (graph %s, slots %s)", frontend.partition, graph, slots)
            frontend.sock.shutdown(socket.SHUT_RDWR)
            return
        with self._lock:
            frontend.in_engine += len(slots)
        now = time.monotonic()
        runner.batcher.put([Item(frontend, slot, deadline, slot in tensors, now) for slot, deadline in slots])

    def _cancel(self, frontend: FrontEnd, slots: set[int]) -> None:
        removed = []
        for runner in self.runners.values():
            removed += runner.batcher.remove(lambda item: item.owner is not frontend or item.slot not in slots)
        if removed:
            self.metrics.rejections.labels(reason="cancelled").inc(len(removed))
            self._answer(removed, Status.CANCELLED)

    def _answer(self, items: list[Item], status: Status, inference_s: float = 0.0, started: float = 0.0) -> None:
        """DONE for each item, one message per front-end; their slots go back to their owners."""
        by_owner: dict[FrontEnd, list[Done]] = defaultdict(list)
        for item in items:
            wait = max(0.0, started - item.enqueued) if started else 0.0
            by_owner[item.owner].append(Done(item.slot, status, len(items), wait, inference_s))  # type: ignore[index]
        for owner, records in by_owner.items():
            owner.send(done(records))
        with self._lock:
            for owner, records in by_owner.items():
                owner.in_engine -= len(records)
            self._lock.notify_all()

    # --- batches ---------------------------------------------------------------------------

    def work(self, runner: GraphRunner) -> None:
        """One session worker: take a batch when free, run it, answer it; until the queue closes."""
        height, width, channels = self.layout.pixel_shape
        size = self.settings.max_batch_size
        pixels = np.empty((size, height, width, channels), dtype=np.uint8)
        tensors = np.empty((size, channels, height, width), dtype=np.float32)
        while (taken := runner.batcher.take()) is not None:
            batch, expired = taken
            if expired:
                self.metrics.rejections.labels(reason="deadline").inc(len(expired))
                self._answer(expired, Status.EXPIRED)
            if batch:
                self._run(runner, batch, pixels, tensors)

    def _run(self, runner: GraphRunner, batch: list[Item], pixels: np.ndarray, tensors: np.ndarray) -> None:
        # Image rows first, then tensor rows, as the graph answers them.
        images = [item for item in batch if not item.tensor]
        rows = [item for item in batch if item.tensor]
        ordered = images + rows
        started = time.monotonic()
        try:
            self.ring.gather_pixels([item.slot for item in images], pixels)
            for index, item in enumerate(rows):
                tensors[index] = self.ring.tensors[self.ring.tensor_index(item.slot)]
            gathered = time.monotonic()
            outputs = runner.backend.predict(pixels[: len(images)], tensors[: len(rows)])
            ran = time.monotonic()
            slots = np.fromiter((item.slot for item in ordered), dtype=np.intp, count=len(ordered))
            start = 0
            for output in outputs:  # each output into its columns of every slot's row, in one copy
                columns = output.reshape(len(ordered), -1)
                self.ring.outputs[slots, start : start + columns.shape[1]] = columns
                start += columns.shape[1]
        except Exception:  # a failed batch fails its own members only, and says so
            logger.exception("inference failed for a batch of %d images", len(batch))
            self._answer(ordered, Status.FAILED)
            return
        self.metrics.batch_size.observe(len(batch))
        self.metrics.gather_seconds.observe(gathered - started)
        self.metrics.inference_seconds.observe(ran - gathered)
        self._answer(ordered, Status.OK, ran - gathered, started)

    # --- stopping --------------------------------------------------------------------------

    def drain(self, grace_s: float) -> None:
        """Wait until every front-end has gone (they drain first), or the grace has passed."""
        deadline = time.monotonic() + grace_s
        with self._lock:
            self._draining = True
            while any(f.alive for f in self._partitions.values()) and time.monotonic() < deadline:
                self._lock.wait(0.1)
        for runner in self.runners.values():
            runner.batcher.close()


def _peer(sock: socket.socket) -> tuple[int, int]:
    """The uid and pid of the process that connected (SO_PEERCRED); pid 0 if it is outside this
    process's pid namespace."""
    pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return uid, pid


def _parent_of(pid: int) -> int | None:
    """From /proc; None if the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:  # the name, in parentheses, may hold anything
            return int(stat.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _load(settings: Settings, manifest: Manifest, ring: Ring, metrics: EngineMetrics) -> dict[Graph, GraphRunner]:
    """Load each graph, check its provider, warm every session at every batch size it may run."""
    folder = settings.model_dir
    graphs: dict[Graph, tuple[Path, int | None]] = {Graph.PLAIN: (folder / manifest.onnx_file, None)}
    if manifest.explain_onnx_file:
        # One session: explain requests are the exception, and must not take cores from the rest.
        graphs[Graph.EXPLAIN] = (folder / manifest.explain_onnx_file, 1)
    sizes = warm_up_batch_sizes(settings.max_batch_size)
    runners = {}
    for graph, (path, workers) in graphs.items():
        backend = OnnxBackend(path, manifest, settings, workers)
        started = time.perf_counter()
        rows = backend.warm_up(sizes, ring.layout.pixel_shape)
        if row_size(rows) > ring.layout.row_floats:
            raise StartupError(
                f"{path.name}: an image's outputs need {row_size(rows)} floats, the ring holds {ring.layout.row_floats}"
            )
        logger.info("%s warmed up at batch sizes %s in %.2f s", path.name, sizes, time.perf_counter() - started)
        depth = metrics.queue_depth.labels(graph=graph.name.lower())  # each graph has a queue of its own
        batcher = Batcher(settings.max_batch_size, settings.max_wait_ms / 1000.0, depth.set)
        runners[graph] = GraphRunner(graph, backend, batcher, rows)
    return runners


def main() -> int:
    boot: Boot = read_boot()
    settings, manifest, layout = boot.typed()
    configure_logging(settings.log_level, settings.log_format, boot.name)
    ring = Ring(layout, boot.ring_fd)
    metrics = EngineMetrics()
    try:
        runners = _load(settings, manifest, ring, metrics)
    except StartupError as exc:
        report(boot.status_fd, error=str(exc))
        return 3
    engine = Engine(settings, manifest, ring, runners, metrics)
    # Bound by the supervisor and held for the server's life, so that no other process can take
    # the name while an engine restarts.
    listener = socket.socket(fileno=boot.listen_fd)
    stop_signals, write_end = os.pipe2(os.O_CLOEXEC)
    signals_to_pipe(write_end)
    workers = [
        threading.Thread(target=engine.work, args=(runner,), name=f"{graph.name.lower()}-{i}")
        for graph, runner in runners.items()
        for i in range(runner.backend.workers)
    ]
    for worker in workers:
        worker.start()
    threading.Thread(target=engine.accept, args=(listener,), daemon=True, name="accept").start()
    settle_heap()
    report(boot.status_fd, ready=True, **engine.info())
    os.close(boot.status_fd)
    os.read(stop_signals, 1)
    logger.info("stopping: waiting for the front-ends to leave (grace %.1f s)", settings.drain_grace_s)
    engine.drain(settings.drain_grace_s)
    listener.close()
    for worker in workers:
        worker.join()
    logger.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
