"""What the host spends per request apart from the model: the real server around a trivial graph.

The graph has the exported models' inputs and outputs but does almost nothing, so what the server
spends is HTTP, parsing, decode, the hand-off to the engine, batching and the answer. The engine's
own share is measured apart: it is what caps one engine, whatever feeds it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bench.cpu import process_tree, process_tree_cpu_seconds
from bench.load import multipart_upload, wire_closed_loop
from bench.server import run_server
from model_export.manifest import (
    EMBEDDING_NAME,
    LOGITS_NAME,
    PIXEL_VALUES_NAME,
    PIXELS_NAME,
    Manifest,
    Preprocessing,
    Source,
)

# ViT-B/16's timm preprocessing and head: the decode and the rows are a real model's.
PREPROCESSING = Preprocessing(image_size=224, resize_size=248, interpolation="bicubic", mean=[0.5] * 3, std=[0.5] * 3)
CLASSES, WIDTH = 1000, 768


def trivial_model(folder: Path) -> Path:
    """pixels and pixel_values in, logits and embedding out, from one value of each image: nothing
    here scales with the image, so what the server spends is the server's."""
    folder.mkdir(parents=True, exist_ok=True)
    side, channels = PREPROCESSING.image_size, PREPROCESSING.channels
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Slice", [PIXELS_NAME, "zeros", "ones", "axes"], ["first_pixel"]),
        helper.make_node("Cast", ["first_pixel"], ["pixel_value"], to=TensorProto.FLOAT),
        helper.make_node("Reshape", ["pixel_value", "column"], ["from_pixels"]),
        helper.make_node("Slice", [PIXEL_VALUES_NAME, "zeros", "ones", "axes"], ["first_value"]),
        helper.make_node("Reshape", ["first_value", "column"], ["from_tensors"]),
        helper.make_node("Concat", ["from_pixels", "from_tensors"], ["rows"], axis=0),
        helper.make_node("Mul", ["rows", "spread"], [EMBEDDING_NAME]),
        helper.make_node("Mul", ["rows", "head"], [LOGITS_NAME]),
    ]
    graph = helper.make_graph(
        nodes,
        "trivial",
        [
            helper.make_tensor_value_info(PIXELS_NAME, TensorProto.UINT8, ["batch", side, side, channels]),
            helper.make_tensor_value_info(PIXEL_VALUES_NAME, TensorProto.FLOAT, ["tensor_batch", channels, side, side]),
        ],
        [
            helper.make_tensor_value_info(LOGITS_NAME, TensorProto.FLOAT, ["rows", CLASSES]),
            helper.make_tensor_value_info(EMBEDDING_NAME, TensorProto.FLOAT, ["rows", WIDTH]),
        ],
        [
            numpy_helper.from_array(np.zeros(3, dtype=np.int64), "zeros"),
            numpy_helper.from_array(np.ones(3, dtype=np.int64), "ones"),
            numpy_helper.from_array(np.array([1, 2, 3], dtype=np.int64), "axes"),
            numpy_helper.from_array(np.array([-1, 1], dtype=np.int64), "column"),
            numpy_helper.from_array(rng.standard_normal((1, WIDTH)).astype(np.float32), "spread"),
            numpy_helper.from_array(rng.standard_normal((1, CLASSES)).astype(np.float32), "head"),
        ],
    )
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8), folder / "model.onnx"
    )
    manifest = Manifest(
        name="trivial",
        labels=[f"class_{i}" for i in range(CLASSES)],
        preprocessing=PREPROCESSING,
        pooling="token",
        opset=18,
        config={"img_size": side, "patch_size": 16, "embed_dim": WIDTH},
        source=Source(checkpoint="trivial", layout="random-init", sha256=None),
    )
    (folder / "manifest.json").write_text(manifest.to_json())
    return folder


@dataclass(frozen=True)
class HostPath:
    frontends: int
    concurrency: int
    requests_per_s: float
    server_cpu_ms: float  # per request, every process of the server
    engine_cpu_us: float  # per image, the engine process alone
    errors: int


def _engine_pid(root: int) -> int:
    for pid in process_tree(root):
        if "service.engine.process" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
            return pid
    raise RuntimeError("no engine process under the server")


def measure(model_dir: Path, image: bytes, frontends: int, levels: list[int], seconds: float) -> list[HostPath]:
    results = []
    with run_server(model_dir, frontend_processes=frontends) as server:
        request = multipart_upload(server.url, "/classify", [image])
        engine = _engine_pid(server.process.pid)
        wire_closed_loop(server.url, request, 2, 1.0)  # warm the path
        for clients in levels:
            before, engine_before, started = (
                process_tree_cpu_seconds(server.process.pid),
                process_tree_cpu_seconds(engine),
                time.monotonic(),
            )
            outcomes = wire_closed_loop(server.url, request, clients, seconds)
            elapsed = time.monotonic() - started
            spent = process_tree_cpu_seconds(server.process.pid) - before
            engine_spent = process_tree_cpu_seconds(engine) - engine_before
            answered = sum(o.status == 200 for o in outcomes)
            results.append(
                HostPath(
                    frontends,
                    clients,
                    answered / elapsed,
                    1000 * spent / max(1, len(outcomes)),
                    1e6 * engine_spent / max(1, answered),
                    len(outcomes) - answered,
                )
            )
        server.stop()
    return results
