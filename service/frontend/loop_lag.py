"""How late a front-end's event loop runs a timer: how long work that is ready waits for the loop.

Under load most of a request's time in the server is this wait: before its route starts, and
again after its images come back (docs/performance.md, "Where a request's time goes under load").
No other metric shows it: a request's duration includes it, the engine's queue and inference
times do not. A sample every 100 ms costs nothing measurable and catches any long turn.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

SAMPLE_EVERY_S = 0.1


async def watch(observe: Callable[[float], None], every_s: float = SAMPLE_EVERY_S) -> None:
    """Until cancelled: sleep `every_s`, and observe how much later than that the loop woke us."""
    while True:
        started = time.perf_counter()
        await asyncio.sleep(every_s)
        observe(max(0.0, time.perf_counter() - started - every_s))
