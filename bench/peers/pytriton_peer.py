"""PyTriton: NVIDIA's Triton Inference Server (the C++ server from the wheel) with a Python callable.

Configured as Triton's model-configuration guide describes: the dynamic batcher on with its
defaults (`dynamic_batching {}`, no queue delay: the guide's first step, before measuring whether
a delay pays), a `max_batch_size`, and one model instance per core on CPU (one on a GPU): PyTriton
makes an instance for each callable in the list given to `bind`. Each instance has its own
single-thread session; the instances are threads of this one Python process (Triton's Python
backend stubs relay the batches to it), so decoding and top-k share its interpreter.

Triton speaks the Open Inference Protocol, not multipart: the closest equivalent request is one
POST /v2/models/vit/infer with a BYTES input of shape (N, 1), the same JPEG bytes sent raw through
the protocol's binary-data extension (a JSON header, then each image as 4-byte length + bytes),
asking for the top-k class ids, scores and labels as JSON.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import sysconfig
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

from bench.peers import Peer
from bench.peers.common import (
    TOP_K,
    OnnxClassifier,
    ServeArgs,
    free_port,
    interrupt_on_sigterm,
    parse_serve_args,
)
from model_export.manifest import Manifest

MODEL = "vit"
INFER_PATH = f"/v2/models/{MODEL}/infer"
INPUT = "image"
OUTPUTS = ("class_ids", "scores", "labels")


def oip_request(url: str, images: list[bytes], content_type: str) -> bytes:
    """One complete keep-alive HTTP/1.1 request: the images as one BYTES tensor of shape (N, 1)."""
    tensor = b"".join(struct.pack("<I", len(image)) + image for image in images)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": INPUT,
                    "shape": [len(images), 1],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(tensor)},
                }
            ],
            "outputs": [{"name": name, "parameters": {"binary_data": False}} for name in OUTPUTS],
        },
        separators=(",", ":"),
    ).encode()
    head = (
        f"POST {INFER_PATH} HTTP/1.1\r\nHost: {urlsplit(url).netloc}\r\n"
        f"Content-Type: application/octet-stream\r\nInference-Header-Content-Length: {len(header)}\r\n"
        f"Content-Length: {len(header) + len(tensor)}\r\n\r\n"
    )
    return head.encode() + header + tensor


def top1(body: bytes) -> list[int]:
    """The first class id of each row of the class_ids output, (N, k)."""
    output = next(o for o in json.loads(body)["outputs"] if o["name"] == "class_ids")
    rows, k = output["shape"]
    return [int(output["data"][row * k]) for row in range(rows)]


def describe(workers: int, max_batch_size: int, device: str) -> str:
    return (
        f"{workers} model instance(s) on {device} (threads of one Python process), each 1 session x 1 thread; "
        f"dynamic batcher with its defaults (no queue delay), max_batch_size {max_batch_size} images"
    )


PEER = Peer("pytriton", "nvidia-pytriton", __name__, oip_request, top1, describe)


class Instance:
    """One model instance: its own session."""

    def __init__(self, args: ServeArgs) -> None:
        self.model = OnnxClassifier(args.model, args.device)
        self.labels = np.array([label.encode() for label in self.model.manifest.labels], dtype=np.object_)

    @batch
    def __call__(self, image: np.ndarray) -> dict[str, np.ndarray]:
        pixels = self.model.decode_all([bytes(row[0]) for row in image])
        ids, scores = self.model.top_k(self.model.logits(pixels))
        return {"class_ids": ids.astype(np.int64), "scores": scores.astype(np.float32), "labels": self.labels[ids]}


def _same_libpython() -> None:
    """Triton's Python backend stub links libpython dynamically, and the loader's first pick may be
    the system's (Debian's 3.11.2 beside a pyenv 3.11.7, whose standard library then calls what
    that older runtime lacks). Put this interpreter's own library folder first."""
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir and Path(libdir, f"libpython{sys.version_info.major}.{sys.version_info.minor}.so.1.0").exists():
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [libdir, os.environ.get("LD_LIBRARY_PATH")]))


def main(args: ServeArgs) -> None:
    _same_libpython()
    interrupt_on_sigterm()  # Triton.serve() stops the server and cleans its workspace on Ctrl-C
    # gRPC and metrics stay on (Triton's defaults), on loopback ports of their own.
    config = TritonConfig(
        http_address="127.0.0.1",
        http_port=args.port,
        grpc_address="127.0.0.1",
        grpc_port=free_port(),
        metrics_address="127.0.0.1",
        metrics_port=free_port(),
    )
    k = min(TOP_K, Manifest.read(args.model).num_classes)
    with Triton(config=config) as triton:
        triton.bind(
            model_name=MODEL,
            infer_func=[Instance(args) for _ in range(args.workers)],
            inputs=[Tensor(name=INPUT, shape=(1,), dtype=np.bytes_)],
            outputs=[
                Tensor(name="class_ids", shape=(k,), dtype=np.int64),
                Tensor(name="scores", shape=(k,), dtype=np.float32),
                Tensor(name="labels", shape=(k,), dtype=np.bytes_),
            ],
            config=ModelConfig(max_batch_size=args.max_batch_size, batcher=DynamicBatcher()),
            strict=True,
        )
        triton.serve()


if __name__ == "__main__":
    main(parse_serve_args(__doc__ or ""))
