"""The int8 variant: dynamic quantization of an exported graph."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from onnxruntime.quantization import QuantType, quantize_dynamic


def quantize_in_place(onnx_path: Path) -> None:
    """Weights to int8, activations quantized at run time: the u8s8 kernels (VNNI where the CPU has it)."""
    with tempfile.TemporaryDirectory() as scratch:
        quantized = Path(scratch) / onnx_path.name
        quantize_dynamic(str(onnx_path), str(quantized), weight_type=QuantType.QInt8)
        os.replace(quantized, onnx_path)
