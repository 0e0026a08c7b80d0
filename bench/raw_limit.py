"""The limit: onnxruntime alone, no HTTP, at the best layout of sessions x threads x batch."""

from __future__ import annotations

import itertools
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


def _session(onnx_path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


def measure_layout(
    onnx_path: Path, input_shape: tuple[int, ...], sessions: int, threads: int, batch: int, seconds: float
) -> Layout:
    """Each session runs back to back in its own thread for `seconds`; images per second overall."""
    runners = [_session(onnx_path, threads) for _ in range(sessions)]
    name = runners[0].get_inputs()[0].name
    data = np.random.default_rng(0).standard_normal((batch, *input_shape), dtype=np.float32)
    for runner in runners:
        runner.run(None, {name: data})  # warm-up
    counts = [0] * sessions
    stop_at = time.perf_counter() + seconds

    def loop(index: int) -> None:
        while time.perf_counter() < stop_at:
            runners[index].run(None, {name: data})
            counts[index] += batch

    started = time.perf_counter()
    workers = [threading.Thread(target=loop, args=(i,)) for i in range(sessions)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return Layout(sessions, threads, batch, sum(counts) / (time.perf_counter() - started))


def best_layout(onnx_path: Path, input_shape: tuple[int, ...], cores: int, seconds: float) -> list[Layout]:
    """Every way to split `cores` into sessions x threads, at batch 1 and 8; best first."""
    splits = [(s, cores // s) for s in range(1, cores + 1) if cores % s == 0]
    layouts = [
        measure_layout(onnx_path, input_shape, sessions, threads, batch, seconds)
        for (sessions, threads), batch in itertools.product(splits, (1, 8))
    ]
    return sorted(layouts, key=lambda layout: -layout.images_per_s)
