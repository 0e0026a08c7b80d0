"""What the probes report: started, ready or not (and why), draining, requests in flight."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

from service.errors import Draining


class Lifecycle:
    def __init__(self) -> None:
        self.started = False  # model loaded, providers checked, warmed up, batcher running
        self.draining = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def not_ready_reason(self) -> str | None:
        if self.draining:
            return "draining: the server is shutting down"
        if not self.started:
            return "starting: the model is loading or warming up"
        return None

    def begin_drain(self) -> None:
        self.draining = True

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        """Count a unit of work for the drain to wait on; refused (503) once draining began."""
        if self.draining:
            raise Draining("the server is shutting down; retry on another replica", retry_after=1)
        self._in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        """True when nothing is in flight, False if timeout_s passed first."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True
