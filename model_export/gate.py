"""The accuracy gate a reduced-precision variant must pass before it is written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from model_export.fashion_mnist import load_split
from model_export.manifest import LOGITS_NAME, PIXEL_VALUES_NAME, PIXELS_NAME, Manifest

# On the default model: at most this drop in top-1 accuracy, at least this agreement with fp32.
MAX_ACCURACY_DROP_POINTS = 0.5
MIN_TOP1_AGREEMENT = 0.99


def _gate_providers() -> list[str]:
    # The fp16 variant is for GPUs: judge it where it runs when there is one. Named, not every
    # available provider: TensorRT, listed first by onnxruntime-gpu, is not what the service runs.
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def _predictions(onnx_path: Path, pixels: np.ndarray) -> tuple[np.ndarray, str]:
    """Top-1 class of each uint8 (N, H, W, C) image, and the provider the session actually ran on."""
    session = ort.InferenceSession(str(onnx_path), providers=_gate_providers())
    _, height, width, channels = pixels.shape
    none = np.empty((0, channels, height, width), dtype=np.float32)
    logits = [
        session.run([LOGITS_NAME], {PIXELS_NAME: pixels[i : i + 500], PIXEL_VALUES_NAME: none})[0]
        for i in range(0, len(pixels), 500)
    ]
    return np.concatenate(logits).argmax(axis=1), session.get_providers()[0]


def fashion_mnist_gate(fp32_path: Path, variant_path: Path, manifest: Manifest, variant: str) -> dict[str, object]:
    """Top-1 of both graphs on the 10k Fashion-MNIST test split; the graphs normalise the pixels."""
    prep = manifest.preprocessing
    if (prep.color_mode, prep.image_size) != ("L", 28):
        raise ValueError("the Fashion-MNIST gate needs a 28x28 greyscale model")
    images, labels = load_split("test")
    pixels = images[:, :, :, None]
    (fp32, _), (reduced, provider) = _predictions(fp32_path, pixels), _predictions(variant_path, pixels)
    fp32_accuracy, variant_accuracy = float((fp32 == labels).mean()), float((reduced == labels).mean())
    drop = 100 * (fp32_accuracy - variant_accuracy)
    agreement = float((fp32 == reduced).mean())
    return {
        "variant": variant,
        "dataset": "Fashion-MNIST test split (10,000 images)",
        "provider": provider,  # where the variant's session ran, as it reports, not what was asked
        "fp32_accuracy": fp32_accuracy,
        "variant_accuracy": variant_accuracy,
        "drop_points": round(drop, 3),
        "top1_agreement": agreement,
        "passed": drop <= MAX_ACCURACY_DROP_POINTS and agreement >= MIN_TOP1_AGREEMENT,
        "limits": {"max_drop_points": MAX_ACCURACY_DROP_POINTS, "min_top1_agreement": MIN_TOP1_AGREEMENT},
    }
