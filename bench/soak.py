"""A soak: steady load for minutes, the server's RSS over time, and every error counted."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.load import Outcome, closed_loop, rss_mb
from bench.server import run_server


@dataclass
class SoakReport:
    duration_s: float
    requests: int
    by_status: dict[int, int]
    rss_mb: list[tuple[float, float]] = field(default_factory=list)  # (seconds since start, MB)

    @property
    def errors(self) -> int:
        """Answers other than 200 and 429 (429 is the server protecting itself), and failed requests."""
        return sum(count for status, count in self.by_status.items() if status not in (200, 429))

    @property
    def rss_growth_mb(self) -> float:
        """Last sample minus the mean of the first quarter after warm-up (the first quarter is skipped)."""
        values = [mb for _, mb in self.rss_mb]
        quarter = max(1, len(values) // 4)
        return values[-1] - statistics.mean(values[quarter : 2 * quarter] or values)


def soak(model_dir: Path, images: list[bytes], duration_s: float, clients: int) -> SoakReport:
    with run_server(model_dir) as server:
        pid, started = server.process.pid, time.monotonic()
        samples: list[tuple[float, float]] = []
        counter = {"sent": 0}

        def send(client):
            counter["sent"] += 1
            data = images[counter["sent"] % len(images)]
            return client.post("/classify", files={"file": ("image.jpg", data, "image/jpeg")})

        outcomes: list[Outcome] = closed_loop(
            server.url,
            send,
            clients,
            duration_s,
            on_tick=lambda: samples.append((time.monotonic() - started, rss_mb(pid))),
            tick_s=2.0,
        )
        server.stop()
    by_status: dict[int, int] = {}
    for outcome in outcomes:
        by_status[outcome.status] = by_status.get(outcome.status, 0) + 1
    return SoakReport(duration_s, len(outcomes), by_status, samples)
