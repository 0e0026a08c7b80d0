"""What the probes report of a front-end: started, ready or not (and why), draining, requests in flight."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator

from service.errors import Draining


class Lifecycle:
    def __init__(self, retry_after_s: int, on_refused: Callable[[], None], on_count: Callable[[int], None]) -> None:
        self.started = False  # the engine welcomed this front-end once: model loaded, checked, warm
        self.engine_connected = False
        self.draining = False  # the one drain flag: readiness, admission and the engine client read it
        self.retry_after_s = retry_after_s
        self._on_refused = on_refused  # counts a draining refusal
        self._on_count = on_count  # told the number of requests in flight whenever it changes
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
            return "starting: the engine is loading or warming up the model"
        if not self.engine_connected:
            return "the engine is not running: it is being restarted"
        return None

    def begin_drain(self) -> None:
        self.draining = True

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        """Count a unit of work for the drain to wait on; refused (503) once draining began."""
        if self.draining:
            self._on_refused()
            raise Draining("the server is shutting down; retry on another replica", retry_after=self.retry_after_s)
        self._in_flight += 1
        self._on_count(self._in_flight)
        self._idle.clear()
        try:
            yield
        finally:
            self._in_flight -= 1
            self._on_count(self._in_flight)
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
