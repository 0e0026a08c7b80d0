"""vit-serve's first process: it owns what the others share, starts them, and decides what a death means.

It creates the ring (an anonymous memfd), the metrics folder and the listening sockets, starts one
engine process and N front-end processes, and waits. Start-up fails (exit 3) if the engine
cannot load the model. Then:
- a front-end dies: it is started again on the same partition and listening socket (the engine
  reclaims its slots; connections queued on its socket wait for the new one);
- the engine is stuck (a front-end finds it holding an image `VIT_ENGINE_STALL_S` past its
  deadline; a restarted one is not ready within twice the first one's start-up and that
  allowance; one told to stop is not gone within it): it is killed, and dies as below;
- the engine dies: the front-ends answer 503 at once, and it is started again, up to
  `VIT_ENGINE_RESTARTS` times in 10 minutes; one more death and the server exits 1, for
  Kubernetes to restart the pod. Accepted requests wait for the new engine, within their deadline;
- SIGTERM or SIGINT: the front-ends drain (in-flight requests finish, new ones get 503), then the
  engine stops, then the supervisor exits 0. A second signal kills everything at once.
"""

from __future__ import annotations

import collections
import fcntl
import json
import logging
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from service.boot import Boot, signals_to_pipe
from service.errors import StartupError
from service.model_folder import load_manifest
from service.settings import Settings
from service.shm_ring import Ring, RingLayout

logger = logging.getLogger(__name__)

STARTUP_EXIT = 3  # as uvicorn's: the server could not start as configured
RESTART_WINDOW_S = 600.0
METRICS_PREFIX = "vit-serve-metrics-"


@dataclass
class Child:
    boot: Boot
    process: subprocess.Popen[bytes]
    pidfd: int
    status: int  # read end of its status pipe; -1 once closed
    started: float = field(default_factory=time.monotonic)
    ready: dict[str, object] | None = None  # its ready report, once it sent it
    deadline: float | None = None  # when it must be ready, or gone, by; killed past it
    overdue: str = ""  # what missing the deadline means, for the log


def _clean_stale_metrics() -> None:
    """Metrics folders left by a supervisor that was killed: the kernel dropped its lock on them.
    Not a pid in the name: in a container the supervisor is pid 1 in every incarnation, and a pod's
    /tmp (an emptyDir) outlives a killed container."""
    for folder in Path(tempfile.gettempdir()).glob(f"{METRICS_PREFIX}*"):
        try:
            lock = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # its supervisor is running
        else:
            shutil.rmtree(folder, ignore_errors=True)
        finally:
            os.close(lock)


def _own_metrics_folder() -> tuple[str, int]:
    """A new metrics folder and the lock held on it for this process's life. It is locked under
    another name, then renamed, so that no other server's clean-up ever sees it unlocked."""
    staging = tempfile.mkdtemp(prefix=f".{METRICS_PREFIX}")
    lock = os.open(staging, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    fcntl.flock(lock, fcntl.LOCK_EX)
    folder = os.path.join(os.path.dirname(staging), os.path.basename(staging).removeprefix("."))
    os.rename(staging, folder)
    return folder, lock


def _listen(host: str, port: int, count: int) -> list[socket.socket]:
    """`count` listening sockets on one port, one per front-end, that the kernel spreads new
    connections over (SO_REUSEPORT). On one shared socket, whichever front-end woke first took
    every connection of a burst: 16 connections opened at once all landed on one of two
    front-ends in 2 of 12 runs, and that front-end's core was the server's limit."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # A plain bind first: it fails on a port in use, also by another server's SO_REUSEPORT group,
    # which sockets of our own group would silently join.
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
        port = probe.getsockname()[1]
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            sock.listen(2048)
            sock.set_inheritable(True)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class Supervisor:
    def __init__(self, settings: Settings, host: str, port: int) -> None:
        self.settings = settings
        self.manifest = load_manifest(settings.model_dir)
        frontends = settings.resolved_frontends()
        self.layout = RingLayout.for_model(
            self.manifest, frontends, settings.max_queue_images, settings.max_images_per_request
        )
        self.ring = Ring.create(self.layout)
        _clean_stale_metrics()
        self.metrics_dir, self._metrics_lock = _own_metrics_folder()
        # Held here for the server's life: a front-end that dies leaves the connections queued on
        # its socket to the one started in its place.
        self.listeners = _listen(host, port, frontends)
        self.url = "http://{}:{}".format(*self.listeners[0].getsockname()[:2])
        self.engine_address = f"\0vit-serve-engine-{os.getpid()}-{os.urandom(4).hex()}"
        # Bound here, not by each engine: an abstract name is free between an engine's death and its
        # successor's bind, and any local process could take it then (and welcome the front-ends).
        self.engine_listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.engine_listener.bind(self.engine_address)
        self.engine_listener.listen(64)
        self.engine_listener.set_inheritable(True)
        self.selector = selectors.DefaultSelector()
        self.children: dict[int, Child] = {}  # by pidfd
        self.engine_deaths: collections.deque[float] = collections.deque()
        self.engine_start_s = 0.0  # how long the first engine took to be ready
        self.draining = False
        self.exit_status = 0
        self._wakeup, self._wakeup_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.selector.register(self._wakeup, selectors.EVENT_READ, "signal")

    def spawn(self, role: str, partition: int = 0) -> Child:
        status_read, status_write = os.pipe()
        listen_fd = (self.listeners[partition] if role == "frontend" else self.engine_listener).fileno()
        boot = Boot(
            role=role,
            partition=partition,
            settings=self.settings.model_dump(mode="json"),
            manifest=self.manifest.model_dump_json(),
            layout=self.layout.to_dict(),
            ring_fd=self.ring.fd,
            status_fd=status_write,
            engine_address=self.engine_address,
            listen_fd=listen_fd,
            metrics_dir=self.metrics_dir,
            supervisor_pid=os.getpid(),
        )
        fds = [self.ring.fd, status_write, listen_fd]
        module = "service.engine.process" if role == "engine" else "service.frontend.worker"
        process = subprocess.Popen(
            [sys.executable, "-m", module, boot.name],  # the name is for `ps`: the child reads stdin only
            stdin=subprocess.PIPE,
            pass_fds=fds,
            env=self._child_environment(),
            process_group=0,  # a terminal's Ctrl-C reaches the supervisor only: it forwards once
        )
        os.close(status_write)
        assert process.stdin is not None
        process.stdin.write(boot.to_json())
        process.stdin.close()
        child = Child(boot, process, os.pidfd_open(process.pid), status_read)
        self.children[child.pidfd] = child
        self.selector.register(child.pidfd, selectors.EVENT_READ, ("exit", child))
        self.selector.register(status_read, selectors.EVENT_READ, ("status", child))
        return child

    def _child_environment(self) -> dict[str, str]:
        # numpy's OpenBLAS starts a thread per core it can see (the host's, not the CPU limit) in
        # every process that imports it, and nothing here multiplies matrices with it: onnxruntime
        # has its own kernels. A user's own setting still wins.
        return {"OPENBLAS_NUM_THREADS": "1", **os.environ, "PROMETHEUS_MULTIPROC_DIR": self.metrics_dir}

    def _forget(self, child: Child) -> int:
        """Reap a child that exited: close its descriptors and drop its live gauges; its exit code."""
        from prometheus_client.multiprocess import mark_process_dead

        self.selector.unregister(child.pidfd)
        os.close(child.pidfd)
        self._close_status(child)
        del self.children[child.pidfd]
        mark_process_dead(child.process.pid, self.metrics_dir)
        return child.process.wait()

    def _close_status(self, child: Child) -> None:
        if child.status >= 0:
            self.selector.unregister(child.status)
            os.close(child.status)
            child.status = -1

    def _read_status(self, child: Child) -> dict[str, object] | None:
        """Act on what the child reported (ready, an engine stuck); its start-up error, if it sent one."""
        data = os.read(child.status, 65536)
        if not data:
            self._close_status(child)
            return None
        error = None
        for line in data.splitlines():
            message: dict[str, object] = json.loads(line)
            if message.get("ready"):
                child.ready, child.deadline = message, None
                logger.info("%s ready", child.boot.name, extra={k: v for k, v in message.items() if k != "ready"})
            elif "stalled" in message:
                self._kill_stuck_engine(message, child)
            elif "error" in message:
                error = message
        return error

    def _kill_stuck_engine(self, report: dict[str, object], reporter: Child) -> None:
        """A front-end found the engine holding images long past their deadline: kill it, and its death
        takes the usual course (a restart, or the exit once they are used up). Each front-end may say so
        of the same engine; one that has been replaced meanwhile is left alone."""
        for child in self.children.values():
            if child.boot.role == "engine" and child.process.pid == report["stalled"] and child.process.poll() is None:
                found = f"{reporter.boot.name} found it holding {report['images']} image(s) past their deadline"
                self._kill(child, f"the engine is stuck: {found}, the oldest by {report['late_s']:.1f} s")

    def run(self) -> int:
        signals_to_pipe(self._wakeup_write)  # the loop reads them with its children's events
        try:
            # All at once: the front-ends import their web stack while the engine loads and warms up.
            engine = self.spawn("engine")
            frontends = [self.spawn("frontend", k) for k in range(self.layout.partitions)]
            self.wait_ready([engine, *frontends])
        except StartupError as exc:
            logger.error("start-up failed: %s", exc)
            self.stop()
            return STARTUP_EXIT
        assert engine.ready is not None
        self.engine_start_s = time.monotonic() - engine.started
        provider = engine.ready["provider"]
        logger.info("vit-serve running on %s (%d front-ends, engine on %s)", self.url, self.layout.partitions, provider)
        try:
            while self.children:
                for key, _ in self.selector.select(self._until_a_deadline()):
                    self._handle(key.data)
                self._kill_overdue()
        finally:
            self._cleanup()
        return self.exit_status

    def wait_ready(self, children: list[Child]) -> None:
        """Block until each child has said ready; a start-up error, an exit or a signal fails the start.

        Any child's report may be read here, also one not waited for: each says ready once."""
        while not all(child.ready for child in children):
            for key, _ in self.selector.select():
                if key.data == "signal":
                    os.read(self._wakeup, 64)
                    raise StartupError("interrupted during start-up")
                event, child = key.data
                if event == "exit":
                    raise StartupError(f"{child.boot.name} exited with {child.process.wait()} during start-up")
                error = self._read_status(child)
                if error:
                    raise StartupError(str(error["error"]))

    def _handle(self, data: object) -> None:
        if data == "signal":
            signals = os.read(self._wakeup, 64)
            if self.draining:
                logger.warning("second signal: stopping every process now")
                self.exit_status = 1
                self._stop_all(signal.SIGKILL)
            elif signals:
                self._drain()
            return
        event, child = cast(tuple[str, Child], data)
        if event == "status":
            self._read_status(child)
        else:
            self._on_exit(child)

    def _until_a_deadline(self) -> float | None:
        deadlines = [child.deadline for child in self.children.values() if child.deadline is not None]
        return max(0.0, min(deadlines) - time.monotonic()) if deadlines else None

    def _kill_overdue(self) -> None:
        """A stuck engine answers nothing, so missing a deadline is the only sign of it."""
        now = time.monotonic()
        for child in self.children.values():
            if child.deadline is not None and now >= child.deadline:
                self._kill(child, f"{child.boot.name} {child.overdue}")

    def _kill(self, child: Child, why: str) -> None:
        """A stuck child: its death takes the usual course."""
        logger.error("%s (VIT_ENGINE_STALL_S=%g): killing it", why, self.stall_s)
        child.deadline = None
        child.process.kill()

    @property
    def stall_s(self) -> float:
        return self.settings.engine_stall_s

    def _drain(self) -> None:
        """Front-ends first (they finish what they accepted, which needs the engine), then the engine."""
        self.draining = True
        # The front-ends keep their own: once the last has gone, a connection is refused (a gateway
        # retries elsewhere), not queued on a socket nobody will accept from and then reset.
        for listener in self.listeners:
            listener.close()
        logger.info("draining: %d front-end(s), then the engine", self.layout.partitions)
        for child in self.children.values():
            if child.boot.role == "frontend":
                child.process.send_signal(signal.SIGTERM)
        self._stop_engine_when_alone()

    def _stop_engine_when_alone(self) -> None:
        if not any(child.boot.role == "frontend" for child in self.children.values()):
            for child in self.children.values():
                child.process.send_signal(signal.SIGTERM)
                if self.stall_s and child.deadline is None:  # it has only its running batches to finish
                    child.deadline = time.monotonic() + self.stall_s
                    child.overdue = f"had not stopped {self.stall_s:g} s after it was told to"

    def _on_exit(self, child: Child) -> None:
        code = self._forget(child)
        if self.draining:
            # One still starting when the drain began dies of the SIGTERM itself, with nothing to drain.
            if code not in (0, -signal.SIGTERM):
                logger.warning("%s exited with %d while draining", child.boot.name, code)
                self.exit_status = self.exit_status or 1
            self._stop_engine_when_alone()
            return
        if child.boot.role == "frontend":
            # Its images are the engine's to drop or finish now, and no longer count against the
            # others' queue; its successor publishes its own count once it admits anything.
            self.ring.admitted[child.boot.partition] = 0
            logger.warning("%s exited with %d: starting it again", child.boot.name, code)
            self.spawn("frontend", child.boot.partition)
            return
        now = time.monotonic()
        self.engine_deaths.append(now)
        while self.engine_deaths and now - self.engine_deaths[0] > RESTART_WINDOW_S:
            self.engine_deaths.popleft()
        if len(self.engine_deaths) > self.settings.engine_restarts:
            logger.error(
                "the engine exited with %d, its %d. death in %.0f minutes (VIT_ENGINE_RESTARTS=%d): stopping",
                code,
                len(self.engine_deaths),
                RESTART_WINDOW_S / 60,
                self.settings.engine_restarts,
            )
            self.exit_status = 1
            self._drain()
            return
        logger.warning("the engine exited with %d: starting it again", code)
        engine = self.spawn("engine")
        if self.stall_s:  # a GPU that hung the last engine may hang this one's start
            allowance = 2 * self.engine_start_s + self.stall_s
            engine.deadline = engine.started + allowance
            engine.overdue = f"was not ready {allowance:.0f} s after its restart"

    def stop(self) -> None:
        """Kill every child and free what the supervisor owns (start-up failures, benchmarks)."""
        self._stop_all(signal.SIGKILL)
        self._cleanup()

    def _stop_all(self, sig: signal.Signals) -> None:
        for child in self.children.values():
            if child.process.poll() is None:
                child.process.send_signal(sig)
        for child in list(self.children.values()):
            self._forget(child)

    def _cleanup(self) -> None:
        for listener in self.listeners:
            listener.close()
        self.engine_listener.close()
        shutil.rmtree(self.metrics_dir, ignore_errors=True)
        os.close(self._metrics_lock)


def serve(settings: Settings, host: str, port: int) -> int:
    try:
        supervisor = Supervisor(settings, host, port)
    except StartupError as exc:
        logger.error("start-up failed: %s", exc)
        return STARTUP_EXIT
    except OSError as exc:
        logger.error("start-up failed: cannot listen on %s:%d: %s", host, port, exc)
        return STARTUP_EXIT
    return supervisor.run()
