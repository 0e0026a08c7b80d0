"""A burst far over capacity: many clients post many images at the same instant. Refusals must stay
fast (the server's own duration of each 429, from its access log) and nothing may be a 5xx."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from bench.load import multipart_upload, read_answer
from bench.server import ServerProcess, run_server
from bench.throughput import percentile


@dataclass(frozen=True)
class Round:
    by_status: dict[int, int]
    refusal_ms: tuple[float, float, float]  # server-side duration of the 429s: p10, p50, p90
    accepted_ms: tuple[float, float, float]  # and of the 200s

    @property
    def server_errors(self) -> int:
        return sum(count for status, count in self.by_status.items() if status >= 500 or status == 0)


async def _post(host: str, port: int, request: bytes) -> int:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        await writer.drain()
        return await read_answer(reader)
    except (ConnectionError, asyncio.IncompleteReadError):
        return 0
    finally:
        writer.close()


async def _burst(url: str, request: bytes, clients: int) -> list[int]:
    parts = urlsplit(url)
    return await asyncio.gather(
        *(_post(parts.hostname or "127.0.0.1", parts.port or 80, request) for _ in range(clients))
    )


def _deciles(values: list[float]) -> tuple[float, float, float]:
    return percentile(values, 10), percentile(values, 50), percentile(values, 90)


def run_burst(model_dir: Path, image: bytes, clients: int, images_per_request: int, rounds: int) -> list[Round]:
    """Each round from an idle server; the first is also its first traffic (a cold start)."""
    with run_server(model_dir) as server:
        request = multipart_upload(server.url, "/classify", [image] * images_per_request)
        results = burst_rounds(server, request, clients, rounds)
        server.stop()
    return results


def burst_rounds(server: ServerProcess, request: bytes, clients: int, rounds: int, pause_s: float = 0.0) -> list[Round]:
    """`rounds` bursts of `clients` posting `request` at once to a running server, `pause_s` apart."""
    results = []
    for _ in range(rounds):
        logged = len(server.lines)
        statuses = asyncio.run(_burst(server.url, request, clients))
        time.sleep(1.0)  # let the admitted work finish, and its access log lines arrive
        results.append(_round(statuses, server.lines[logged:]))
        time.sleep(pause_s)
    return results


def _round(statuses: list[int], lines: list[str]) -> Round:
    durations: dict[int, list[float]] = {200: [], 429: []}
    for line in lines:
        if line.startswith("{") and '"route": "/classify"' in line:
            entry = json.loads(line)
            durations.setdefault(entry["status"], []).append(entry["duration_ms"])
    by_status = {status: statuses.count(status) for status in sorted(set(statuses))}
    return Round(by_status, _deciles(durations[429]), _deciles(durations[200]))
