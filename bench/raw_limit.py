"""The limit: onnxruntime alone, no HTTP, at the best layout of sessions x threads x batch."""

from __future__ import annotations

import itertools
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort


@dataclass(frozen=True)
class Layout:
    sessions: int
    threads: int  # intra-op threads per session
    batch: int
    images_per_s: float


def _session(model: Path | bytes, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(
        model if isinstance(model, bytes) else str(model), options, providers=["CPUExecutionProvider"]
    )


def runs_per_second(
    model: Path | bytes, feed: dict[str, np.ndarray], sessions: int, threads: int, seconds: float
) -> float:
    """Each session runs `feed` back to back in its own thread for `seconds`; runs per second overall."""
    runners = [_session(model, threads) for _ in range(sessions)]
    for runner in runners:
        runner.run(None, feed)  # warm-up
    counts = [0] * sessions
    stop_at = time.perf_counter() + seconds

    def loop(index: int) -> None:
        while time.perf_counter() < stop_at:
            runners[index].run(None, feed)
            counts[index] += 1

    started = time.perf_counter()
    workers = [threading.Thread(target=loop, args=(i,)) for i in range(sessions)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sum(counts) / (time.perf_counter() - started)


def _feed(onnx_path: Path, batch: int, input_shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    name = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).get_inputs()[0].name
    return {name: np.random.default_rng(0).standard_normal((batch, *input_shape), dtype=np.float32)}


def measure_layout(
    onnx_path: Path, input_shape: tuple[int, ...], sessions: int, threads: int, batch: int, seconds: float
) -> Layout:
    runs = runs_per_second(onnx_path, _feed(onnx_path, batch, input_shape), sessions, threads, seconds)
    return Layout(sessions, threads, batch, runs * batch)


def best_layout(onnx_path: Path, input_shape: tuple[int, ...], cores: int, seconds: float) -> list[Layout]:
    """Every way to split `cores` into sessions x threads, at batch 1 and 8; best first."""
    splits = [(s, cores // s) for s in range(1, cores + 1) if cores % s == 0]
    layouts = [
        measure_layout(onnx_path, input_shape, sessions, threads, batch, seconds)
        for (sessions, threads), batch in itertools.product(splits, (1, 8))
    ]
    return sorted(layouts, key=lambda layout: -layout.images_per_s)


def lone_latency_ms(onnx_path: Path, input_shape: tuple[int, ...], threads: int, runs: int) -> float:
    """Median time of one image through one session with nothing else running: the floor under
    the service's latency at concurrency 1."""
    session = _session(onnx_path, threads)
    feed = _feed(onnx_path, 1, input_shape)
    session.run(None, feed)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000
