import asyncio
import time

from service.frontend import loop_lag


def test_a_loop_held_by_a_long_turn_shows_as_lag_and_a_quiet_one_does_not():
    lags: list[float] = []

    async def main() -> None:
        watcher = asyncio.create_task(loop_lag.watch(lags.append, every_s=0.01))
        await asyncio.sleep(0.035)  # quiet samples
        quiet = len(lags)
        time.sleep(0.1)  # the loop held, as by a turn full of other requests' work
        await asyncio.sleep(0.035)
        watcher.cancel()
        assert quiet >= 1 and len(lags) > quiet

    asyncio.run(main())
    assert max(lags) >= 0.08
    assert min(lags) < 0.05
