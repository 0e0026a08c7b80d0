"""Prometheus metrics, all prefixed `vit_`, from every process of one server.

Each process writes its own values into the folder named by PROMETHEUS_MULTIPROC_DIR (the
supervisor sets it for its children before they import prometheus-client), and whichever
front-end answers /metrics sums them with the library's own multiprocess collector. Counters of a
process that died stay in the totals; its live gauges leave with it.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

# Latencies from 1 ms to 30 s; batch sizes are counted in images.
_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_IMAGES = (1, 2, 4, 8, 16, 32, 64, 128)
# Copies within the engine: tens of microseconds to a few milliseconds a batch.
_COPY_SECONDS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05)


def _rejections() -> Counter:
    # Front-ends refuse (overloaded, draining, client_disconnected); the engine drops (deadline, cancelled).
    return Counter("vit_rejections", "work refused or dropped, by reason", ["reason"], registry=None)


class FrontendMetrics:
    def __init__(self) -> None:
        self.requests = Counter("vit_requests", "HTTP requests by route and status", ["route", "status"], registry=None)
        self.request_seconds = Histogram(
            "vit_request_duration_seconds", "HTTP request latency", ["route", "status"], buckets=_SECONDS, registry=None
        )
        self.preprocess_seconds = Histogram(
            "vit_preprocess_seconds", "decode and resize time per image", buckets=_SECONDS, registry=None
        )
        self.rejections = _rejections()
        # Observed here, from each image's DONE record: it keeps the engine's own work per image small.
        self.queue_wait_seconds = Histogram(
            "vit_queue_wait_seconds",
            "time an image waits in the engine before its batch runs",
            buckets=_SECONDS,
            registry=None,
        )
        self.in_flight = Gauge(
            "vit_requests_in_flight", "inference requests being served", registry=None, multiprocess_mode="livesum"
        )
        self.images_in_flight = Gauge(
            "vit_images_in_flight",
            "images admitted and not yet answered, over every front-end",
            registry=None,
            multiprocess_mode="livesum",
        )
        self.loop_lag_seconds = Histogram(
            "vit_event_loop_lag_seconds",
            "how late a front-end's event loop ran a timer: how long ready work waits for the loop",
            buckets=_SECONDS,  # from uvloop's timer resolution, 1 ms
            registry=None,
        )
        self.images = Counter("vit_images_classified", "images answered by the model", registry=None)
        self.model_info = Gauge(
            "vit_model_info",
            "the served model (value is always 1)",
            ["model", "provider", "variant"],
            registry=None,
            multiprocess_mode="livemax",
        )


class EngineMetrics:
    def __init__(self) -> None:
        self.inference_seconds = Histogram(
            "vit_inference_seconds", "onnxruntime time per batch", buckets=_SECONDS, registry=None
        )
        # Triton's compute_input: copying each image's pixels (150 KB at 224 px) out of its slot is
        # a large share of the engine's own CPU on a host with little memory bandwidth (17-32 of
        # 52-87 us per image on the 2-core build machine, measured alone; most of it at batch 64).
        self.gather_seconds = Histogram(
            "vit_batch_gather_seconds",
            "time per batch copying its inputs out of their slots",
            buckets=_COPY_SECONDS,
            registry=None,
        )
        self.batch_size = Histogram("vit_batch_size_images", "images per formed batch", buckets=_IMAGES, registry=None)
        self.queue_depth = Gauge(
            "vit_queue_depth_images",
            "images waiting in the engine for a batch, by graph (plain, explain)",
            ["graph"],
            registry=None,
            multiprocess_mode="livesum",
        )
        self.rejections = _rejections()


def render(folder: str) -> bytes:
    """Every process's metrics, summed, in the Prometheus text format."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=folder)
    return generate_latest(registry)
