"""What explain=true costs: latency of explain vs plain /classify requests, same server, same images."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.server import run_server


@dataclass(frozen=True)
class LatencyComparison:
    model: str
    requests: int
    plain_p50_ms: float
    explain_p50_ms: float
    plain_p95_ms: float
    explain_p95_ms: float

    @property
    def ratio_p50(self) -> float:
        return self.explain_p50_ms / self.plain_p50_ms


def _latencies(client: httpx.Client, images: list[bytes], requests: int, explain: bool) -> list[float]:
    query = "/classify?explain=true" if explain else "/classify"
    times = []
    for i in range(requests):
        files = {"file": ("image.jpg", images[i % len(images)], "application/octet-stream")}
        started = time.perf_counter()
        response = client.post(query, files=files)
        times.append((time.perf_counter() - started) * 1000)
        response.raise_for_status()
    return times


def measure(model_dir: Path, images: list[bytes], requests: int = 100) -> LatencyComparison:
    """Sequential requests (concurrency 1), interleaved in rounds so drift in machine speed hits both alike."""
    with run_server(model_dir) as server, server.client() as client:
        name = client.get("/v1/models").json()["models"][0]["name"]
        _latencies(client, images, 5, False), _latencies(client, images, 5, True)  # warm both paths
        plain: list[float] = []
        explain: list[float] = []
        rounds = 5
        for _ in range(rounds):
            plain += _latencies(client, images, requests // rounds, False)
            explain += _latencies(client, images, requests // rounds, True)
        server.stop()

    def p95(values: list[float]) -> float:
        return statistics.quantiles(values, n=20)[-1]

    return LatencyComparison(
        name, len(plain), statistics.median(plain), statistics.median(explain), p95(plain), p95(explain)
    )
