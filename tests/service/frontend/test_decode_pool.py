"""The decode threads: results and errors reach the awaiting coroutine, on its own loop."""

import asyncio
import threading

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
    done = []

    async def scenario() -> None:
        pool = DecodePool(1)
        release = threading.Event()
        first = pool.submit(release.wait)
        second = pool.submit(done.append, "queued")
        first.cancel()
        release.set()
        await asyncio.sleep(0.05)
        pool.shutdown()
        assert first.cancelled() and second.done()

    asyncio.run(scenario())
    assert done == ["queued"]
