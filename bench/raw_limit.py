"""The limit: onnxruntime alone, no HTTP, at the best layout of sessions x threads x batch."""

from __future__ import annotations

import itertools
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from model_export.manifest import PIXEL_VALUES_NAME, PIXELS_NAME
from service.engine.runtime import CPU, CUDA, requested_providers

# On a GPU batch size is what pays; on a CPU it barely moves throughput (measured), layout does.
CPU_BATCHES = (1, 8)
CUDA_BATCHES = (1, 8, 32, 64, 128)


def provider_for(device: str) -> str:
    """The provider a `--device` choice (auto, cpu, cuda) runs on, picked as VIT_PROVIDERS picks it."""
    return requested_providers(device, ort.get_available_providers())[0]


def device_of(provider: str) -> str:
    """ "cuda" or "cpu": the name the settings, the baseline and the tables use for a provider."""
    return "cuda" if provider == CUDA else "cpu"


@dataclass(frozen=True)
class Layout:
    sessions: int
    threads: int  # intra-op threads per session
    batch: int
    images_per_s: float


def open_session(model: Path | bytes, threads: int, provider: str) -> ort.InferenceSession:
    """One session with one inter-op thread, on `provider` or refused: onnxruntime may fall back quietly."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    providers = [provider] if provider == CPU else [provider, CPU]
    session = ort.InferenceSession(model if isinstance(model, bytes) else str(model), options, providers=providers)
    if session.get_providers()[0] != provider:
        raise RuntimeError(f"onnxruntime runs on {session.get_providers()[0]}, not {provider}")
    return session


Feeds = dict[str, np.ndarray]


def _runner(session: ort.InferenceSession, feeds: Feeds, device_input: bool) -> Callable[[], object]:
    """One forward pass on `feeds`, one array per graph input. On CUDA through IO binding with the
    outputs left on the device; the inputs are copied in from host memory on every call as the
    service's are, or, with device_input, put on the device once (the compute alone: what the GPU
    could do if the copy were free)."""
    if session.get_providers()[0] != CUDA:
        return lambda: session.run(None, feeds)
    binding = session.io_binding()
    for name, data in feeds.items():
        if device_input:
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(data, "cuda", 0))
        else:
            binding.bind_cpu_input(name, data)
    for output in session.get_outputs():
        binding.bind_output(output.name, "cuda")
    return lambda: session.run_with_iobinding(binding)


def runs_per_second(
    model: Path | bytes,
    feeds: Feeds,
    sessions: int,
    threads: int,
    seconds: float,
    provider: str = CPU,
    device_input: bool = False,
) -> float:
    """Each session runs `feeds` back to back in its own thread for `seconds`; runs per second overall."""
    runners = [_runner(open_session(model, threads, provider), feeds, device_input) for _ in range(sessions)]
    for run in runners:
        run()  # warm-up
    counts = [0] * sessions
    stop_at = time.perf_counter() + seconds

    def loop(index: int) -> None:
        while time.perf_counter() < stop_at:
            runners[index]()
            counts[index] += 1

    started = time.perf_counter()
    workers = [threading.Thread(target=loop, args=(i,)) for i in range(sessions)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sum(counts) / (time.perf_counter() - started)


def model_feeds(batch: int, pixel_shape: tuple[int, int, int]) -> Feeds:
    """A batch of random uint8 images as the service sends them, and no pre-normalised rows."""
    height, width, channels = pixel_shape
    return {
        PIXELS_NAME: np.random.default_rng(0).integers(0, 256, (batch, *pixel_shape), dtype=np.uint8),
        PIXEL_VALUES_NAME: np.empty((0, channels, height, width), dtype=np.float32),
    }


def measure_layout(
    onnx_path: Path,
    pixel_shape: tuple[int, int, int],
    sessions: int,
    threads: int,
    batch: int,
    seconds: float,
    provider: str = CPU,
    device_input: bool = False,
) -> Layout:
    feeds = model_feeds(batch, pixel_shape)
    runs = runs_per_second(onnx_path, feeds, sessions, threads, seconds, provider, device_input)
    return Layout(sessions, threads, batch, runs * batch)


def best_layout(
    onnx_path: Path, pixel_shape: tuple[int, int, int], cores: int, seconds: float, provider: str = CPU
) -> list[Layout]:
    """Best first. On CPU every way to split `cores` into sessions x threads, at each CPU batch;
    on CUDA one session (as the service runs there) at each CUDA batch, input copied from host."""
    batches: tuple[int, ...]
    if provider == CUDA:
        splits, batches = [(1, 1)], CUDA_BATCHES
    else:
        splits, batches = [(s, cores // s) for s in range(1, cores + 1) if cores % s == 0], CPU_BATCHES
    layouts = [
        measure_layout(onnx_path, pixel_shape, sessions, threads, batch, seconds, provider)
        for (sessions, threads), batch in itertools.product(splits, batches)
    ]
    return sorted(layouts, key=lambda layout: -layout.images_per_s)


def lone_latency_ms(
    onnx_path: Path, pixel_shape: tuple[int, int, int], threads: int, runs: int, provider: str = CPU
) -> float:
    """Median time of one image through one session with nothing else running: the floor under
    the service's latency at concurrency 1."""
    run = _runner(open_session(onnx_path, threads, provider), model_feeds(1, pixel_shape), device_input=False)
    run()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000
