"""The model code every peer server shares, so that the peers differ only in serving.

Each peer wraps the same three steps: decode an upload with the service's own Decoder (same
pixels), run the exported graph in an onnxruntime session laid out as the service lays its
sessions (one single-thread session per worker; one per GPU), and answer the top-k predictions.
Nothing here imports the service's batching or engine: batching is each framework's job.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import numpy as np

from bench.raw_limit import open_session
from model_export.manifest import Manifest
from service.engine.runtime import CPU, CUDA, run_session
from service.frontend.decode import Decoder
from service.frontend.results import top_k
from service.settings import Settings

TOP_K = 5  # the service's default_top_k
# Where a framework starts the workers itself (BentoML, mosec, TorchServe), they read the bench's
# model folder and device from these.
ENV_MODEL, ENV_DEVICE = "VIT_PEER_MODEL", "VIT_PEER_DEVICE"
BOUNDARY_LINE_END = b"\r\n"


@dataclass(frozen=True)
class ServeArgs:
    """What the bench tells a peer server when it starts it."""

    model: Path  # exported model folder
    device: str  # "cpu" or "cuda"
    port: int  # loopback port to listen on
    workers: int  # model workers (processes or instances), each with one session
    max_batch_size: int  # the framework's batch limit


def parse_serve_args(description: str, argv: list[str] | None = None) -> ServeArgs:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--device", choices=["cpu", "cuda"], required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--max-batch-size", type=int, required=True)
    args = parser.parse_args(argv)
    return ServeArgs(args.model, args.device, args.port, args.workers, args.max_batch_size)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def interrupt_on_sigterm() -> None:
    """Let SIGTERM (how the bench stops a server) unwind like Ctrl-C, so that the framework's own
    shutdown runs (Ray's cluster, Triton's workspace) instead of the process just vanishing."""
    signal.signal(signal.SIGTERM, _interrupt)


def free_port() -> int:
    """A loopback port nobody listens on now (the OS's pick)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def decoder_for(manifest: Manifest) -> Decoder:
    """The service's decoder with the service's default pixel limit."""
    return Decoder(manifest.preprocessing, Settings.model_fields["max_image_pixels"].default)


def decode_all(decoder: Decoder, uploads: list[bytes]) -> np.ndarray:
    """Uploads -> uint8 (N, H, W, C), each exactly as the service decodes it."""
    pixels = np.empty((len(uploads), *decoder.shape), dtype=np.uint8)
    for row, data in enumerate(uploads):
        decoder.decode_into(data, pixels[row])
    return pixels


class OnnxClassifier:
    """Decode, forward and top-k for one worker: one session, not thread-safe by design (one per worker)."""

    def __init__(self, model_dir: Path, device: str) -> None:
        self.manifest = Manifest.read(model_dir)
        prep = self.manifest.preprocessing
        self.decoder = decoder_for(self.manifest)
        # As the service lays its sessions out: one intra-op thread each.
        self.session = open_session(model_dir / self.manifest.onnx_file, 1, CUDA if device == "cuda" else CPU)
        self.output_device = "cuda" if device == "cuda" else None
        self.no_tensors = np.empty((0, prep.channels, prep.image_size, prep.image_size), dtype=np.float32)
        self.logits(np.zeros((1, *self.decoder.shape), dtype=np.uint8))  # warm-up

    def decode_all(self, uploads: list[bytes]) -> np.ndarray:
        return decode_all(self.decoder, uploads)

    def logits(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (B, H, W, C) -> float32 (B, classes)."""
        feeds = dict(zip(self.manifest.input_names, (pixels, self.no_tensors), strict=True))
        # As the service runs: on CUDA through IO binding, one copy in and one out.
        return run_session(self.session, feeds, self.manifest.output_names[:1], self.output_device)[0]

    def top_k(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, classes) logits -> class ids (B, k) and softmax scores (B, k): the service's top-k."""
        return top_k(logits, TOP_K)

    def predictions(self, logits: np.ndarray) -> list[list[dict[str, object]]]:
        """Per image, the service's prediction objects: label, class_id, score."""
        ids, scores = self.top_k(logits)
        labels = self.manifest.labels
        return [
            [{"label": labels[i], "class_id": int(i), "score": float(s)} for i, s in zip(row, row_scores, strict=True)]
            for row, row_scores in zip(ids, scores, strict=True)
        ]

    def classify(self, pixels: np.ndarray) -> list[list[dict[str, object]]]:
        return self.predictions(self.logits(pixels))

    def classify_requests(self, requests: list[np.ndarray]) -> list[dict[str, object]]:
        """One forward pass for a batch of requests, each holding its own number of images; each
        request's response body."""
        predictions = self.classify(np.concatenate(requests))
        bounds = np.cumsum([0] + [len(pixels) for pixels in requests])
        return [results(predictions[start:end]) for start, end in zip(bounds[:-1], bounds[1:], strict=True)]


def model_variables(args: ServeArgs) -> dict[str, str]:
    """The bench's model folder and device, for workers that a framework starts itself."""
    return {ENV_MODEL: str(args.model.resolve()), ENV_DEVICE: args.device}


def classifier_from_variables() -> OnnxClassifier:
    """In such a worker: the classifier for the model and device that `model_variables` passed."""
    return OnnxClassifier(Path(os.environ[ENV_MODEL]), os.environ[ENV_DEVICE])


def results(predictions: list[list[dict[str, object]]]) -> dict[str, object]:
    """The service's response body for one request's images."""
    return {"results": [{"predictions": p} for p in predictions]}


def multipart_files(body: bytes) -> list[bytes]:
    """The contents of every part of a multipart/form-data body, for frameworks that hand over the
    raw body without its headers: the boundary is the body's first line. Part headers are skipped;
    every part is taken as one upload."""
    delimiter = body[: body.index(BOUNDARY_LINE_END)]  # b"--" + boundary
    # Every part but the first follows a CRLF + delimiter; what follows the last one is "--" (the close).
    chunks = body.split(BOUNDARY_LINE_END + delimiter)
    chunks[0] = chunks[0][len(delimiter) :]
    files = []
    for chunk in chunks[:-1]:
        part = chunk[len(BOUNDARY_LINE_END) :]  # the CRLF that ends the delimiter line
        files.append(part[part.index(b"\r\n\r\n") + 4 :])  # after the part's headers
    return files
