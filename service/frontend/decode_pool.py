"""Threads that decode uploads and hand each result straight to the event loop.

asyncio's run_in_executor goes through a concurrent.futures.Future (a Condition and its locks for
every call) chained to an asyncio future, and the executor counts its idle threads on every
submit: about a twentieth of a front-end's time with the GIL, measured. Here a job is a tuple on
a queue and its answer one call_soon_threadsafe.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
_Job = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", Callable[..., Any], tuple[Any, ...]]


def _settle(future: asyncio.Future[T], result: T | None, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)  # type: ignore[arg-type]


class DecodePool:
    def __init__(self, threads: int) -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._work, name=f"decode-{i}", daemon=True) for i in range(threads)]
        for thread in self._threads:
            thread.start()

    def submit(self, function: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.put((loop, future, function, args))
        return future

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            loop, future, function, args = job
            try:
                result, error = function(*args), None
            except Exception as exc:  # handed to the awaiting request, which raises it
                result, error = None, exc
            loop.call_soon_threadsafe(_settle, future, result, error)

    def shutdown(self) -> None:
        """Finish the jobs already queued, then stop every thread."""
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join()
