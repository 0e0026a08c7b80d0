"""Threads that decode uploads and hand each result straight to the event loop.

asyncio's run_in_executor goes through a concurrent.futures.Future (a Condition and its locks for
every call) chained to an asyncio future, and the executor counts its idle threads on every
submit: about a twentieth of a front-end's time with the GIL, measured. Here a job is a tuple on
a queue and its answer one call_soon_threadsafe.

A request's images share at most one job per thread (`starmap`): each hand-off wakes a thread and
then the loop, and the thread takes the GIL from the loop to start. Eight 248x248 JPEGs a request,
default model, against a job per image in alternating rounds: 229-252 against 232-240 requests/s
at 16 connections (three sets), 248 against 242 at 64, level at 4 (238 against 236; 222 against
242 in a set the connections' split decided); front-end CPU 1-8% less, and 9-10 voluntary context
switches a request against 11-14.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable, Sequence
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

    async def starmap(
        self, function: Callable[..., T], calls: Sequence[tuple[Any, ...]], stop: asyncio.Future[Any] | None = None
    ) -> list[T | Exception | None]:
        """`function(*args)` for each of `calls`, in order: its result, or the exception it raised.
        Each thread's job takes the next call as it finishes one, so a slow call holds up no other.
        Once `stop` is done (the client left) no more calls start, and theirs are None. Cancelled
        (the request's deadline passed), it starts no more either. Either way it returns, or
        raises, only once the calls running have finished: callers write shared memory."""
        outcomes: list[Any] = [None] * len(calls)
        claims = iter(range(len(calls)))  # next() on it is one C call, atomic under the GIL

        def skip_the_rest(_: object = None) -> None:
            for _ in claims:  # taken here, so no thread starts them
                pass

        def take_calls_in_turn() -> None:
            for index in claims:
                try:
                    outcomes[index] = function(*calls[index])
                except Exception as exc:  # the caller decides which one to raise
                    outcomes[index] = exc

        jobs = asyncio.gather(*(self.submit(take_calls_in_turn) for _ in range(min(len(self._threads), len(calls)))))
        if stop is not None:
            stop.add_done_callback(skip_the_rest)  # one already done: called at the loop's next turn
        try:
            await asyncio.shield(jobs)
        except asyncio.CancelledError:
            skip_the_rest()
            await jobs
            raise
        finally:
            if stop is not None:
                stop.remove_done_callback(skip_the_rest)
        return outcomes

    def shutdown(self) -> None:
        """Finish the jobs already queued, then stop every thread."""
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join()
