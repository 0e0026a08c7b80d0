"""Side by side, same model, same images: the raw onnxruntime limit, the service, the baseline."""

from __future__ import annotations

import multiprocessing
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from bench.load import Outcome, multipart_upload, wire_closed_loop
from bench.machine import Machine, describe
from bench.raw_limit import Layout, best_layout, device_of, lone_latency_ms, measure_layout, provider_for
from bench.server import run_server, run_uvicorn_process
from model_export.manifest import Manifest
from model_export.vit import ViTConfig
from service.engine.runtime import CUDA
from service.settings import Settings, available_cores


@dataclass(frozen=True)
class HttpResult:
    system: str  # "service" or "baseline"
    concurrency: int
    images_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_batch: float | None  # images per formed batch (the service's metrics); None for the baseline
    # How late the front-ends' event loops ran their timers, on average (the service's metrics): ms of
    # waiting for a front-end, where it grows while the batches do not, the front-ends are the limit.
    mean_loop_lag_ms: float | None
    errors: int


@dataclass(frozen=True)
class BenchResult:
    model: str
    variant: str
    image_bytes: int
    machine: Machine
    multiply_adds: int  # per image
    limit: list[Layout]
    # CUDA: images/s at the limit's batch with the input already on the GPU (the host copy left out)
    limit_device_input: float | None
    lone_ms: float  # one image, one session of the service's threads, nothing else running
    http: list[HttpResult]
    images_per_request: int  # the service's; the baseline takes one image per request
    skipped_levels: list[int]  # too slow a round trip for the window: see measurable_levels

    def best(self, system: str) -> HttpResult:
        return max((r for r in self.http if r.system == system), key=lambda r: r.images_per_s)

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "ratios": self.ratios()}

    def ratios(self) -> dict[str, float]:
        service, baseline = self.best("service"), self.best("baseline")
        lone_request = min((r for r in self.http if r.system == "service"), key=lambda r: r.concurrency)
        peak = self.machine.peak_for(self.variant)
        return {
            "service_over_limit": service.images_per_s / self.limit[0].images_per_s,
            "service_over_baseline": service.images_per_s / baseline.images_per_s,
            # HTTP, decode, batching and the load generator's own turn, at the lowest concurrency.
            "overhead_ms": lone_request.p50_ms - self.lone_ms,
            "limit_over_peak": self.limit[0].images_per_s * 2 * self.multiply_adds / 1e9 / peak,
        }


_SERVICE_TOTALS = (
    "vit_batch_size_images_sum",
    "vit_batch_size_images_count",
    "vit_event_loop_lag_seconds_sum",
    "vit_event_loop_lag_seconds_count",
)


def _service_totals(client: httpx.Client) -> tuple[float, ...]:
    """The service's batch and loop-lag histograms' sums and counts, in _SERVICE_TOTALS' order."""
    totals = dict.fromkeys(_SERVICE_TOTALS, 0.0)
    for line in client.get("/metrics").text.splitlines():
        name, _, value = line.partition(" ")
        if name in totals:
            totals[name] = float(value)
    return tuple(totals.values())


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


Sample = Callable[[], tuple[float, ...]]


@dataclass(frozen=True)
class Window:
    """One concurrency level's timed window: the 200s that finished inside it, and what it cost."""

    clients: int
    answered: list[Outcome]
    errors: int  # answers other than 200, and requests that got none, over the whole level
    spent: tuple[float, ...]  # the sampled counters' growth over the window (CPU seconds, batch totals)

    def latencies_ms(self) -> list[float]:
        return [o.latency_s * 1000 for o in self.answered]


def timed_windows(
    url: str,
    request: bytes,
    levels: list[int],
    seconds: float,
    images_per_request: int,
    limit_per_s: float,
    sample: Sample = tuple,
) -> Iterator[Window]:
    """Closed-loop load at each level, from a load generator in its own process (its Python work is
    not the server's); figures from the requests that finish inside a `seconds` window opened once
    the loop has had a round trip to settle (about clients / limit). `sample` is read as the window
    opens and as it closes.

    A level at which every request was answered but none inside the window (a system far slower
    than the limit) ends the measurement: it would read as 0 images/s, and the levels above as
    worse, from a system that did answer."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        pool.apply(wire_closed_loop, (url, request, 2, 1.0))  # warm the path
        for clients in levels:
            settle_s = max(0.5, 1.5 * clients * images_per_request / limit_per_s)
            pending = pool.apply_async(wire_closed_loop, (url, request, clients, settle_s + seconds))
            time.sleep(settle_s)
            opening = sample()
            time.sleep(seconds)
            spent = tuple(after - before for after, before in zip(sample(), opening, strict=True))
            outcomes = pending.get()
            opened = min((o.started for o in outcomes), default=0.0) + settle_s
            ok = [o for o in outcomes if o.status == 200 and opened <= o.started + o.latency_s <= opened + seconds]
            errors = sum(o.status != 200 for o in outcomes)
            if not ok and not errors:
                return
            yield Window(clients, ok, errors, spent)


def measure_http(
    system: str, url: str, images: list[bytes], levels: list[int], seconds: float, limit_per_s: float
) -> list[HttpResult]:
    """images/s and latency at each level for one image list per /classify request; the service's
    mean formed batch and front-end loop lag from its own metrics."""
    results = []
    request = multipart_upload(url, "/classify", images)
    with httpx.Client(base_url=url, timeout=60) as client:
        sample: Sample = (lambda: _service_totals(client)) if system == "service" else tuple
        for window in timed_windows(url, request, levels, seconds, len(images), limit_per_s, sample):
            mean_batch = mean_lag_ms = None
            if window.spent:
                batched, batches, lag_s, lag_samples = window.spent
                mean_batch = batched / max(1.0, batches)
                mean_lag_ms = 1000 * lag_s / max(1.0, lag_samples)
            latencies = window.latencies_ms()
            results.append(
                HttpResult(
                    system,
                    window.clients,
                    len(window.answered) * len(images) / seconds,
                    percentile(latencies, 50),
                    percentile(latencies, 95),
                    percentile(latencies, 99),
                    mean_batch,
                    mean_lag_ms,
                    window.errors,
                )
            )
    return results


def measurable_levels(levels: list[int], limit_per_s: float, seconds: float) -> list[int]:
    """The levels whose round trip (clients / limit) fits a window of `seconds` at least twice."""
    return [clients for clients in levels if clients == min(levels) or clients / limit_per_s <= seconds / 2]


def run_bench(
    model_dir: Path, image: bytes, levels: list[int], seconds: float, device: str = "auto", images_per_request: int = 1
) -> BenchResult:
    """device: "auto" (CUDA when onnxruntime has it), "cpu" or "cuda", as the service's VIT_PROVIDERS."""
    manifest = Manifest.read(model_dir)
    prep = manifest.preprocessing
    shape = (prep.image_size, prep.image_size, prep.channels)
    onnx_path = model_dir / manifest.onnx_file
    provider = provider_for(device)
    cores = available_cores()
    machine = describe(cores, seconds, provider)
    limit = best_layout(onnx_path, shape, cores, seconds, provider)
    best = limit[0]
    on_device = None
    if provider == CUDA:
        on_device = measure_layout(onnx_path, shape, 1, 1, best.batch, seconds, provider, device_input=True)
    threads = Settings().intra_op_threads
    lone_ms = lone_latency_ms(onnx_path, shape, threads, runs=max(5, int(seconds * 10)), provider=provider)
    measured = measurable_levels(levels, best.images_per_s / images_per_request, seconds)
    # On CUDA the batch is the limit's best: batches still form with no wait, from the images that
    # gather while the GPU runs the one before.
    with run_server(
        model_dir,
        providers=device_of(provider),
        require_requested_provider=True,
        max_queue_images=max(256, 4 * max(measured) * images_per_request),
        max_batch_size=best.batch if provider == CUDA else Settings().max_batch_size,
    ) as server:
        uploads = [image] * images_per_request
        service = measure_http("service", server.url, uploads, measured, seconds, best.images_per_s)
        server.stop()
    baseline_args = ["-m", "bench.baseline_server", "--model", str(model_dir), "--device", device_of(provider)]
    with run_uvicorn_process(baseline_args) as baseline_server:
        baseline = measure_http("baseline", baseline_server.url, [image], measured, seconds, best.images_per_s)
    multiply_adds = ViTConfig(**manifest.config).multiply_adds()  # type: ignore[arg-type]
    return BenchResult(
        manifest.name,
        manifest.variant,
        len(image),
        machine,
        multiply_adds,
        limit,
        on_device.images_per_s if on_device else None,
        lone_ms,
        service + baseline,
        images_per_request,
        [level for level in levels if level not in measured],
    )
