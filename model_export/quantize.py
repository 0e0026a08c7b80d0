"""The int8 variant: dynamic quantization of an exported graph, and the accuracy gate it must pass."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import QuantType, quantize_dynamic

from model_export.fashion_mnist import load_split
from model_export.manifest import INPUT_NAME, LOGITS_NAME, Manifest

# The gate (on the default model): at most this drop in top-1 accuracy, at least this agreement.
MAX_ACCURACY_DROP_POINTS = 0.5
MIN_TOP1_AGREEMENT = 0.99


def quantize_in_place(onnx_path: Path) -> None:
    """Weights to int8, activations quantized at run time (u8s8: what AVX-512 VNNI runs fastest)."""
    with tempfile.TemporaryDirectory() as scratch:
        quantized = Path(scratch) / onnx_path.name
        quantize_dynamic(str(onnx_path), str(quantized), weight_type=QuantType.QInt8)
        os.replace(quantized, onnx_path)


def _predictions(onnx_path: Path, batch: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    logits = [session.run([LOGITS_NAME], {INPUT_NAME: batch[i : i + 500]})[0] for i in range(0, len(batch), 500)]
    return np.concatenate(logits).argmax(axis=1)


def fashion_mnist_gate(fp32_path: Path, int8_path: Path, manifest: Manifest) -> dict[str, object]:
    """Top-1 of both graphs on the 10k Fashion-MNIST test split, normalised as the manifest says."""
    prep = manifest.preprocessing
    if (prep.color_mode, prep.image_size) != ("L", 28):
        raise ValueError("the Fashion-MNIST gate needs a 28x28 greyscale model")
    images, labels = load_split("test")
    batch = ((images.astype(np.float32) / 255.0 - prep.mean[0]) / prep.std[0])[:, None]
    fp32, int8 = _predictions(fp32_path, batch), _predictions(int8_path, batch)
    fp32_accuracy, int8_accuracy = float((fp32 == labels).mean()), float((int8 == labels).mean())
    drop = 100 * (fp32_accuracy - int8_accuracy)
    agreement = float((fp32 == int8).mean())
    return {
        "dataset": "Fashion-MNIST test split (10,000 images)",
        "fp32_accuracy": fp32_accuracy,
        "int8_accuracy": int8_accuracy,
        "drop_points": round(drop, 3),
        "top1_agreement": agreement,
        "passed": drop <= MAX_ACCURACY_DROP_POINTS and agreement >= MIN_TOP1_AGREEMENT,
        "limits": {"max_drop_points": MAX_ACCURACY_DROP_POINTS, "min_top1_agreement": MIN_TOP1_AGREEMENT},
    }
