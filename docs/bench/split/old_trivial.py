"""compare.py's trivial graph for the single-process design, written by that design's own Manifest:
run with the old checkout first on PYTHONPATH. Usage: old_trivial.py FOLDER"""

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from model_export.manifest import Manifest, Preprocessing, Source


def old_trivial_model(folder: Path) -> None:
    """The trivial graph in the old contract (format 1: normalised float32 in, logits out)."""
    folder.mkdir(parents=True, exist_ok=True)
    head = np.random.default_rng(0).standard_normal((1, 1000)).astype(np.float32)
    nodes = [
        helper.make_node("ReduceMean", ["pixel_values"], ["mean"], axes=[1, 2, 3], keepdims=0),
        helper.make_node("Unsqueeze", ["mean", "axis"], ["column"]),
        helper.make_node("MatMul", ["column", "head"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "trivial",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1000])],
        [numpy_helper.from_array(head, "head"), numpy_helper.from_array(np.array([1], np.int64), "axis")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, str(folder / "model.onnx"))
    preprocessing = Preprocessing(
        image_size=224, resize_size=248, interpolation="bicubic", mean=[0.5] * 3, std=[0.5] * 3
    )
    manifest = Manifest(
        name="trivial",
        labels=[f"class_{i}" for i in range(1000)],
        preprocessing=preprocessing,
        pooling="token",
        opset=17,
        config={},
        source=Source(checkpoint="none", layout="random-init", sha256=None),
    )
    (folder / "manifest.json").write_text(manifest.to_json())


if __name__ == "__main__":
    old_trivial_model(Path(sys.argv[1]))
