"""All service settings, read from `VIT_*` environment variables (see the README's table)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.cores import available_cores

DEFAULT_MODEL_DIR = Path(__file__).parent / "default_model"
# Encoders write 1 scan (baseline) to about 20 (progressive, optimised); the format allows over
# 2,000, and libjpeg-turbo decodes each over the whole image, at any DCT scale.
MAX_JPEG_SCANS = 100
# Photos store 0.5 to 6 pixels a byte, synthetic graphics a few hundred; a flat 40 MP WebP stores
# 40,000 in a 1 KB file that takes 0.6 s to decode.
MAX_PIXELS_PER_BYTE = 1000
# From here a graph's session is shared by its workers when VIT_SHARED_SESSION is auto: ViT-S/16
# (88 MB) keeps one per worker, ViT-B/16 (346 MB) and larger share.
SHARED_SESSION_BYTES = 100 * 2**20


class Settings(BaseSettings):
    # hide_input_in_errors: a validation error would otherwise print the values it was given, the
    # API keys among them (pydantic shows the whole input of a model-level check).
    model_config = SettingsConfigDict(
        env_prefix="VIT_", extra="ignore", protected_namespaces=(), hide_input_in_errors=True
    )

    # Model and runtime
    model_dir: Path = Field(DEFAULT_MODEL_DIR, description="folder with model.onnx and manifest.json")
    providers: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: CUDA when onnxruntime has it, else CPU; cuda: ask for CUDA"
    )
    require_requested_provider: bool = Field(
        False, description="fail start-up when CUDA was asked for but the session runs on CPU"
    )
    session_workers: int = Field(
        0,
        ge=0,
        description="batches run side by side, on a session each unless shared; 0 = one per core on CPU, 1 on CUDA",
    )
    intra_op_threads: int = Field(1, ge=1, description="threads inside each session")
    shared_session: bool | Literal["auto"] = Field(
        "auto",
        description="the session workers run one session, holding the weights once; auto: for graphs of 100 MB or more",
    )
    preprocess_threads: int = Field(0, ge=0, description="decode/resize threads per front-end; 0 = as many as cores")

    # Processes
    frontend_processes: int | Literal["auto"] = Field(
        "auto", description="HTTP/decode front-end processes feeding the one engine; auto: see resolved_frontends()"
    )
    engine_restarts: int = Field(
        3, ge=0, description="restarts of a dead engine within 10 minutes before the server exits 1; 0: exit at once"
    )
    engine_stall_s: float = Field(
        30.0,
        ge=0,
        description="an engine holding an image this long past its request's deadline is stuck: it is killed"
        " and restarted as after a death; 0: never",
    )

    # Batching and admission
    max_batch_size: int = Field(8, ge=1, description="most images in one forward pass")
    # 0 on CPU: batches still form whenever every session is busy, and an idle session should
    # not wait for company. On a GPU, where batch size pays, a few ms is worth waiting.
    max_wait_ms: float = Field(0.0, ge=0, description="how long the first image waits for others to join")
    max_queue_images: int = Field(
        256, ge=1, description="images admitted and not yet answered, over every front-end; beyond: 429"
    )
    request_timeout_s: float = Field(
        30.0, gt=0, description="default deadline per request, the body's arrival included; beyond it: 504"
    )
    min_body_rate_bytes_s: float = Field(
        1024.0, ge=0, description="least average rate a body must keep once its grace has passed; slower: 408; 0: none"
    )
    body_rate_grace_s: float = Field(5.0, ge=0, description="how long a body may arrive at any rate")
    retry_after_s: int = Field(1, ge=0, description="Retry-After header value on 429 and 503")

    # Input limits
    max_body_bytes: int = Field(20 * 1024 * 1024, ge=1, description="request body limit, enforced while reading: 413")
    max_image_pixels: int = Field(40_000_000, ge=1, description="width x height from the image header: 413")
    max_jpeg_scans: int = Field(MAX_JPEG_SCANS, ge=1, description="scans in one JPEG, counted before decoding: 413")
    max_pixels_per_byte: int = Field(
        MAX_PIXELS_PER_BYTE, ge=1, description="an image's pixels per byte of its file, past its first megapixel: 413"
    )
    max_images_per_request: int = Field(32, ge=1, description="images in one request: 413")
    max_form_fields: int = Field(16, ge=0, description="multipart parts other than `file` in one request: 413")
    max_part_header_bytes: int = Field(16384, ge=256, description="one multipart part's header block: 400")
    max_header_bytes: int = Field(32768, ge=1024, description="a request's line and headers together: 431")
    header_timeout_s: float = Field(
        30.0, gt=0, description="how long a request's line and headers may take to arrive: 408 (Kestrel's default)"
    )
    default_top_k: int = Field(5, ge=1, description="predictions per image when top_k is not given")

    # Lifecycle and HTTP
    drain_grace_s: float = Field(25.0, ge=0, description="on SIGTERM, how long in-flight requests may finish")
    # Above a gateway's own idle timeout for its pooled connections (nginx's upstream keepalive_timeout and
    # ingress-nginx's upstream-keepalive-timeout: 60 s), so that the gateway closes an idle connection, not
    # the server: at uvicorn's 5 s, a POST the gateway sent as the server closed got a 502, not retried.
    keep_alive_s: int = Field(75, ge=1, description="how long an idle keep-alive connection stays open")
    root_path: str = Field("", description="path prefix the app is served under behind a gateway")
    forwarded_allow_ips: str = Field(
        "127.0.0.1", description="comma-separated proxy addresses whose X-Forwarded-* headers are trusted; * for any"
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "text"] = Field("json", description="json: one object per line, for collectors")

    # Access
    api_keys: str = Field("", repr=False, description="comma-separated keys; when set, inference needs one")
    metrics_require_key: bool = Field(False, description="guard /metrics with the API keys too")
    cors_origins: str = Field("", description="comma-separated origins allowed by CORS; empty: CORS off")

    @field_validator("api_keys")
    @classmethod
    def _keys_travel_in_headers(cls, keys: str) -> str:
        # Clients send header bytes as they are, and the server reads them as latin-1: a key
        # beyond printable ASCII would never match what a client sent for it.
        if not (keys.isascii() and keys.isprintable()):
            raise ValueError("API keys must be printable ASCII: they travel in HTTP headers")
        return keys

    @model_validator(mode="after")
    def _sizes(self) -> Settings:
        if self.max_queue_images < self.max_images_per_request:
            raise ValueError("max_queue_images must hold at least one full request (max_images_per_request)")
        return self

    @property
    def api_key_list(self) -> list[str]:
        return [key.strip() for key in self.api_keys.split(",") if key.strip()]

    @property
    def cors_origin_list(self) -> list[str]:
        return [origin.strip() for origin in self.cors_origins.split(",") if origin.strip()]

    def resolved_session_workers(self, on_cuda: bool) -> int:
        if self.session_workers:
            return self.session_workers
        # On CPU, independent single-threaded sessions beat one multi-threaded session (measured
        # by vit-bench); on a GPU one session owns the device.
        return 1 if on_cuda else max(1, available_cores() // self.intra_op_threads)

    def resolved_shared_session(self, graph_bytes: int) -> bool:
        if self.shared_session != "auto":
            return self.shared_session
        # A session per worker holds the weights once per core (ViT-B/16: 430 MB each), while
        # sharing one costs a small graph a few percent (the default model on 2 cores: 1-12% fewer
        # requests/s in four sets of five) and a large one nothing measurable: a run's own
        # milliseconds hide it.
        return graph_bytes >= SHARED_SESSION_BYTES

    def resolved_preprocess_threads(self, frontends: int, cores: int | None = None) -> int:
        """Decode threads in each of the server's `frontends` front-ends."""
        if self.preprocess_threads:
            return self.preprocess_threads
        cores = cores or available_cores()
        # Enough for every core to decode at once across the front-ends, and two in each, so that
        # one large upload does not hold up the small ones behind it.
        return max(2, -(-cores // frontends))

    def resolved_frontends(self, cores: int | None = None) -> int:
        if self.frontend_processes != "auto":
            return max(1, self.frontend_processes)
        cores = cores or available_cores()
        if self.providers == "cuda":
            # The GPU runs the model and the engine needs about one core: the front-ends, doing all
            # the rest, set the ceiling (`vit-bench host-path` prints it), so they get every other
            # core. At most 16, more than one GPU needs: a container given no CPU limit on a big
            # multi-GPU host must not start one per core of the host.
            return min(max(1, cores - 1), 16)
        # On CPU the sessions need the cores too: one per core, at most 8 (`vit-bench host-path`).
        return min(cores, 8)
