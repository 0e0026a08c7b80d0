"""Bytes to the model's uint8 input on one core: the service's decoder against the Pillow-only paths."""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from model_export.manifest import Preprocessing
from service.frontend.decode import Decoder

# ViT-B/16's timm preprocessing: resize the shorter side to 248, bicubic, centre-crop 224.
VIT_B = Preprocessing(image_size=224, resize_size=248, interpolation="bicubic", mean=[0.5] * 3, std=[0.5] * 3)


@dataclass(frozen=True)
class PreprocessTimes:
    label: str
    service_ms: float  # our path: sniff, header check, simplejpeg at the draft scale, orient, resize+crop
    pillow_draft_ms: float  # the same rule through Pillow alone (the service's decoder before simplejpeg)
    full_decode_ms: float  # resize after a full-size decode, as most servers do


def _best_of(function: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return min(times) * 1000  # best of n: the machine's noise only ever adds


def measure(label: str, jpeg: bytes, repeats: int = 10) -> PreprocessTimes:
    decoder = Decoder(VIT_B, max_pixels=10**8)

    def pillow_draft() -> np.ndarray:
        image = Image.open(io.BytesIO(jpeg))
        image.draft("RGB", (VIT_B.resize_size, VIT_B.resize_size))
        return np.asarray(decoder.resize_and_crop(ImageOps.exif_transpose(image).convert("RGB")))

    def full_decode() -> np.ndarray:
        # Every pixel decoded, then the same resize and crop (of only the region kept).
        return np.asarray(decoder.resize_and_crop(Image.open(io.BytesIO(jpeg)).convert("RGB")))

    return PreprocessTimes(
        label,
        _best_of(lambda: decoder.decode(jpeg), repeats),
        _best_of(pillow_draft, repeats),
        _best_of(full_decode, repeats),
    )
