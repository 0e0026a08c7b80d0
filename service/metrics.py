"""Prometheus metrics, all prefixed `vit_`, on a registry owned by one app instance."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Latencies from 1 ms to 30 s; batch sizes are counted in images.
_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_IMAGES = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("vit_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.request_seconds = Histogram(
            "vit_request_duration_seconds", "HTTP request latency", ["route", "status"], buckets=_SECONDS, registry=r
        )
        self.queue_wait_seconds = Histogram(
            "vit_queue_wait_seconds", "time an image waits before its batch runs", buckets=_SECONDS, registry=r
        )
        self.preprocess_seconds = Histogram(
            "vit_preprocess_seconds", "decode and resize time per image", buckets=_SECONDS, registry=r
        )
        self.inference_seconds = Histogram(
            "vit_inference_seconds", "onnxruntime time per batch", buckets=_SECONDS, registry=r
        )
        self.batch_size = Histogram("vit_batch_size_images", "images per formed batch", buckets=_IMAGES, registry=r)
        self.queue_depth = Gauge("vit_queue_depth_images", "images admitted and waiting for a batch", registry=r)
        self.rejections = Counter("vit_rejections", "work refused or dropped, by reason", ["reason"], registry=r)
        self.in_flight = Gauge("vit_requests_in_flight", "classify requests being served", registry=r)
        self.images = Counter("vit_images_classified", "images classified", registry=r)
        self.model_info = Gauge(
            "vit_model_info", "the served model (value is always 1)", ["model", "provider", "variant"], registry=r
        )
