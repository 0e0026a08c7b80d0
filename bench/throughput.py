"""Side by side, same model, same images: the raw onnxruntime limit, the service, the baseline."""

from __future__ import annotations

import multiprocessing
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from bench.load import Outcome, multipart_upload, wire_closed_loop
from bench.machine import Machine, describe
from bench.raw_limit import Layout, best_layout, lone_latency_ms
from bench.server import run_server, run_uvicorn_process
from model_export.manifest import Manifest
from model_export.vit import ViTConfig
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
    errors: int


@dataclass(frozen=True)
class BenchResult:
    model: str
    variant: str
    image_bytes: int
    machine: Machine
    multiply_adds: int  # per image
    limit: list[Layout]
    lone_ms: float  # one image, one session of the service's threads, nothing else running
    http: list[HttpResult]

    def best(self, system: str) -> HttpResult:
        return max((r for r in self.http if r.system == system), key=lambda r: r.images_per_s)

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "ratios": self.ratios()}

    def ratios(self) -> dict[str, float]:
        service, baseline = self.best("service"), self.best("baseline")
        lone_request = min((r for r in self.http if r.system == "service"), key=lambda r: r.concurrency)
        int8 = self.variant.startswith("int8")
        peak = self.machine.int8_peak_gops if int8 else self.machine.fp32_peak_gflops
        return {
            "service_over_limit": service.images_per_s / self.limit[0].images_per_s,
            "service_over_baseline": service.images_per_s / baseline.images_per_s,
            # HTTP, decode, batching and the load generator's own turn, at the lowest concurrency.
            "overhead_ms": lone_request.p50_ms - self.lone_ms,
            "limit_over_peak": self.limit[0].images_per_s * 2 * self.multiply_adds / 1e9 / peak,
        }


def _load(url: str, image: bytes, clients: int, seconds: float) -> list[Outcome]:
    return wire_closed_loop(url, multipart_upload(url, "/classify", image), clients, seconds)


def _batch_totals(client: httpx.Client) -> tuple[float, float]:
    totals = {"sum": 0.0, "count": 0.0}
    for line in client.get("/metrics").text.splitlines():
        for kind in totals:
            if line.startswith(f"vit_batch_size_images_{kind} "):
                totals[kind] = float(line.split()[1])
    return totals["sum"], totals["count"]


def _percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def measure_http(system: str, url: str, image: bytes, levels: list[int], seconds: float) -> list[HttpResult]:
    # The load generator runs in its own process, so its Python work is not the server's.
    context = multiprocessing.get_context("spawn")
    results = []
    with httpx.Client(base_url=url, timeout=60) as client, context.Pool(1) as pool:
        _load(url, image, 2, 1.0)  # warm the path
        for clients in levels:
            before = _batch_totals(client) if system == "service" else None
            outcomes = pool.apply(_load, (url, image, clients, seconds))
            ok = [o for o in outcomes if o.status == 200]
            latencies = [o.latency_s * 1000 for o in ok]
            mean_batch = None
            if before is not None:
                after = _batch_totals(client)
                mean_batch = (after[0] - before[0]) / max(1.0, after[1] - before[1])
            results.append(
                HttpResult(
                    system,
                    clients,
                    len(ok) / seconds,
                    _percentile(latencies, 50),
                    _percentile(latencies, 95),
                    _percentile(latencies, 99),
                    mean_batch,
                    len(outcomes) - len(ok),
                )
            )
    return results


def run_bench(model_dir: Path, image: bytes, levels: list[int], seconds: float) -> BenchResult:
    manifest = Manifest.read(model_dir)
    prep = manifest.preprocessing
    shape = (prep.channels, prep.image_size, prep.image_size)
    onnx_path = model_dir / manifest.onnx_file
    cores = available_cores()
    machine = describe(cores, seconds)
    limit = best_layout(onnx_path, shape, cores, seconds)
    lone_ms = lone_latency_ms(onnx_path, shape, Settings().intra_op_threads, runs=max(5, int(seconds * 10)))
    with run_server(model_dir, max_queue_images=max(256, 4 * max(levels))) as server:
        service = measure_http("service", server.url, image, levels, seconds)
        server.stop()
    with run_uvicorn_process(["-m", "bench.baseline_server", "--model", str(model_dir)]) as baseline_server:
        baseline = measure_http("baseline", baseline_server.url, image, levels, seconds)
    multiply_adds = ViTConfig(**manifest.config).multiply_adds()  # type: ignore[arg-type]
    return BenchResult(
        manifest.name, manifest.variant, len(image), machine, multiply_adds, limit, lone_ms, service + baseline
    )
