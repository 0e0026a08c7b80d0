"""The fp16 variant, for GPUs: weights and activations in half precision where that is safe."""

from __future__ import annotations

from pathlib import Path

import onnx
from onnxruntime.transformers.onnx_model import OnnxModel

# ViTs in fp16 overflow in LayerNorm's variance and in softmax's exponent sums: those stay fp32
# (the converter casts around them); the matrix products, where the time goes, run in fp16.
FP32_OPS = ["LayerNormalization", "Softmax"]


def to_fp16_in_place(onnx_path: Path) -> None:
    """Inputs and outputs stay float32, so clients and the server feed the graph as before."""
    graph = OnnxModel(onnx.load(str(onnx_path)))
    graph.convert_float_to_float16(keep_io_types=True, op_block_list=FP32_OPS)
    graph.topological_sort()  # the converter appends its input casts after their consumers
    onnx.save(graph.model, str(onnx_path))
