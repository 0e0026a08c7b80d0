"""Closed-loop HTTP load against a loopback server, and the server's memory as it goes."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx


@dataclass(frozen=True)
class Outcome:
    started: float  # monotonic seconds
    status: int  # 0 when the request failed without an HTTP answer
    latency_s: float


def rss_mb(pid: int) -> float:
    """Resident memory of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def closed_loop(
    url: str,
    send: Callable[[httpx.Client], httpx.Response],
    clients: int,
    duration_s: float,
    on_tick: Callable[[], None] | None = None,
    tick_s: float = 0.5,
) -> list[Outcome]:
    """`clients` threads each send, wait, and send again until duration_s has passed.

    on_tick runs every tick_s in the calling thread meanwhile (for sampling memory)."""
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + duration_s

    def loop() -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            while (now := time.monotonic()) < stop_at:
                started = time.perf_counter()
                try:
                    status = send(client).status_code
                except httpx.HTTPError:
                    status = 0
                with lock:
                    outcomes.append(Outcome(now, status, time.perf_counter() - started))

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads):
        if on_tick is not None:
            on_tick()
        time.sleep(tick_s)  # a sampling interval
    for thread in threads:
        thread.join()
    return outcomes
