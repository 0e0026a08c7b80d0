"""Turn a [class]-token attention grid into a heat map PNG laid over the image the model saw."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

# An inferno-like ramp: dark where the class token did not look, bright yellow where it did.
_RAMP = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float32)
HEAT_WEIGHT = 0.55


def colourise(values: np.ndarray) -> np.ndarray:
    """(H, W) values in [0, 1] -> (H, W, 3) uint8 colours along the ramp."""
    position = np.clip(values, 0.0, 1.0) * (len(_RAMP) - 1)
    low = np.floor(position).astype(int).clip(0, len(_RAMP) - 2)
    frac = (position - low)[..., None]
    return (_RAMP[low] * (1 - frac) + _RAMP[low + 1] * frac).astype(np.uint8)


def heatmap_png(pixels: np.ndarray, grid: np.ndarray) -> bytes:
    """PNG of the model-size input (uint8 H, W, C) with the grid, scaled to its maximum, blended on top.

    Rendered at the model's input size, the image the model saw: viewers scale it up smoothly,
    and encoding a few thousand pixels instead of an upscaled copy keeps explain cheap.
    """
    side = pixels.shape[0]
    base = np.asarray(Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).convert("RGB"))
    peak = float(grid.max())
    scaled = Image.fromarray((grid / peak if peak > 0 else grid).astype(np.float32))
    heat = np.asarray(scaled.resize((side, side), Image.Resampling.BILINEAR))
    blended = (1 - HEAT_WEIGHT) * base.astype(np.float32) + HEAT_WEIGHT * colourise(heat)
    buffer = io.BytesIO()
    Image.fromarray(blended.astype(np.uint8)).save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()
