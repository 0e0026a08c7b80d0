"""The decode threads: results and errors reach the awaiting coroutine, on its own loop."""

import asyncio
import threading
import time

import pytest

from service.frontend.decode_pool import DecodePool


def test_results_and_errors_come_back_to_the_loop_that_asked():
    async def scenario() -> None:
        pool = DecodePool(2)
        try:
            where = await pool.submit(lambda: threading.current_thread().name)
            assert where.startswith("decode-")
            assert await asyncio.gather(*(pool.submit(pow, i, 2) for i in range(10))) == [i * i for i in range(10)]
            with pytest.raises(ZeroDivisionError):
                await pool.submit(lambda: 1 / 0)
        finally:
            pool.shutdown()

    asyncio.run(scenario())


def test_a_cancelled_wait_leaves_the_job_to_finish_quietly_and_shutdown_drains_the_queue():
    async def scenario() -> None:
        pool = DecodePool(1)
        started, release = threading.Event(), threading.Event()

        def block() -> None:
            started.set()
            release.wait()

        first = pool.submit(block)
        assert started.wait(10)  # the only thread is busy from here on: whatever comes next stays queued
        second = pool.submit(lambda: "decoded")
        first.cancel()

        # Let the thread go only once shutdown has queued its stop after `second`: nothing else empties the
        # queue meanwhile, so 2 entries (`second`, then the stop) prove `second` was queued at shutdown.
        def release_after_shutdown_queues_its_stop() -> None:
            deadline = time.monotonic() + 10
            while pool._jobs.qsize() < 2 and time.monotonic() < deadline:
                time.sleep(0.001)
            queued.append(pool._jobs.qsize())
            release.set()

        queued: list[int] = []
        watcher = threading.Thread(target=release_after_shutdown_queues_its_stop)
        watcher.start()
        pool.shutdown()
        watcher.join()
        assert queued == [2]
        assert not second.done()  # its answer waits for the loop, which shutdown() has held until now
        for _ in range(3):
            await asyncio.sleep(0)
        assert first.cancelled() and second.done() and second.result() == "decoded"

    asyncio.run(scenario())


def test_starmap_answers_every_call_in_order_with_each_error_in_its_place():
    async def scenario() -> None:
        pool = DecodePool(2)
        try:
            outcomes = await pool.starmap(lambda a, b: a / b, [(1, 1), (1, 0), (4, 2), (3, 0)])
            assert outcomes[0] == 1.0 and outcomes[2] == 2.0
            assert isinstance(outcomes[1], ZeroDivisionError) and isinstance(outcomes[3], ZeroDivisionError)
            assert await pool.starmap(pow, []) == []
        finally:
            pool.shutdown()

    asyncio.run(scenario())


def test_a_slow_call_holds_up_none_of_the_calls_after_it():
    # The first call waits until the other nine have run: they must go to the other thread one by one,
    # not wait behind it (as they would, some of them, if each thread were dealt its share up front).
    others_done, lock, finished = threading.Event(), threading.Lock(), []

    def call(index: int) -> object:
        if index == 0:
            return others_done.wait(10)
        with lock:
            finished.append(threading.current_thread().name)
            if len(finished) == 9:
                others_done.set()
        return index

    async def scenario() -> None:
        pool = DecodePool(2)
        try:
            assert await pool.starmap(call, [(i,) for i in range(10)]) == [True, *range(1, 10)]
            assert len(set(finished)) == 1
        finally:
            pool.shutdown()

    asyncio.run(scenario())


@pytest.mark.parametrize("stopped_by", ["cancel", "stop"])
def test_a_stopped_starmap_starts_no_more_calls_and_returns_once_those_running_have_finished(stopped_by):
    """Cancelled (a deadline) it raises; its `stop` done (the client left) it returns None for the
    calls it skipped. Either way, only once the running calls are over."""
    running, release, ran = threading.Semaphore(0), threading.Event(), []

    def call(index: int) -> int:
        ran.append(index)
        running.release()
        release.wait(10)
        return index

    async def scenario() -> None:
        pool = DecodePool(2)
        try:
            stop = asyncio.get_running_loop().create_future()
            task = asyncio.create_task(pool.starmap(call, [(i,) for i in range(8)], stop=stop))
            for _ in range(2):  # both threads are in a call
                while not running.acquire(blocking=False):
                    await asyncio.sleep(0.001)
            if stopped_by == "cancel":
                task.cancel()
            else:
                stop.set_result(None)
            await asyncio.sleep(0.05)
            assert not task.done()  # a caller's slots must not be freed while a thread still writes them
            release.set()
            if stopped_by == "cancel":
                with pytest.raises(asyncio.CancelledError):
                    await task
            else:
                assert await task == [0, 1, *[None] * 6]
            assert sorted(ran) == [0, 1]
        finally:
            pool.shutdown()

    asyncio.run(scenario())
