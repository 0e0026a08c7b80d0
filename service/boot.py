"""How the supervisor starts a child process, and what the child is told.

Everything a child needs arrives as one JSON document on its stdin (settings, the manifest, the
ring's layout, descriptor numbers): nothing secret appears on a command line or in the
environment. A child reports "ready" or its start-up error as one JSON line on a status pipe.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import signal
import sys
from dataclasses import asdict, dataclass

from model_export.manifest import Manifest
from service.settings import Settings
from service.shm_ring import RingLayout

_PR_SET_PDEATHSIG = 1
# A request makes thousands of short-lived objects that reference counting frees. At the default
# (a young collection every 700 allocations, the start-up heap walked by the older ones) the
# cyclic collector took 3.6% of a loaded front-end's CPU; with this and the freeze, 0.4%.
_YOUNG_COLLECTION_EVERY = 10_000


@dataclass(frozen=True)
class Boot:
    role: str  # "engine" or "frontend"
    partition: int  # the front-end's index (its slots, its log name); 0 for the engine
    settings: dict[str, object]
    manifest: str  # JSON
    layout: dict[str, object]
    ring_fd: int
    status_fd: int  # write end of the pipe the supervisor reads this child's "ready" from
    engine_address: str  # the engine's abstract Unix socket name
    listen_fd: int  # this front-end's HTTP listening socket, or the engine's Unix one
    metrics_dir: str
    supervisor_pid: int

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @property
    def name(self) -> str:
        return self.role if self.role == "engine" else f"frontend-{self.partition}"

    def typed(self) -> tuple[Settings, Manifest, RingLayout]:
        return (
            Settings.model_validate(self.settings),
            Manifest.from_json(self.manifest),
            RingLayout.from_dict(self.layout),
        )


def read_boot() -> Boot:
    """The child's side: read the boot document, and arrange to stop if the supervisor dies."""
    boot = Boot(**json.loads(sys.stdin.buffer.read()))
    # If the supervisor is killed (even with -9), the kernel sends us SIGTERM, which drains: no
    # orphan keeps serving on the port, and the ring's memory goes with the last of us.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != boot.supervisor_pid:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)
    return boot


def report(status_fd: int, **fields: object) -> None:
    """One JSON line to the supervisor: {"ready": true, ...} or {"error": "..."}."""
    with contextlib.suppress(OSError):  # the supervisor is gone; PDEATHSIG tells us what to do
        os.write(status_fd, json.dumps(fields).encode() + b"\n")


def signals_to_pipe(write_end: int) -> None:
    """From now on SIGTERM and SIGINT only write their number to `write_end`, made non-blocking
    here as the wake-up fd must be, for the main thread to read. A handler that did more could run
    inside the one of the signal before it, with its locks held: the engine's set a
    threading.Event, and a burst of SIGTERMs killed it undrained or left it waiting forever on the
    lock of the set() it had interrupted."""
    os.set_blocking(write_end, False)
    signal.set_wakeup_fd(write_end)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)


def settle_heap() -> None:
    """Once started: what start-up built leaves the cyclic collector's view, and young
    collections come less often."""
    gc.freeze()
    gc.set_threshold(_YOUNG_COLLECTION_EVERY, *gc.get_threshold()[1:])
