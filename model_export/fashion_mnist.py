"""Reads Debian's `dataset-fashion-mnist` IDX files (numpy only, so serving tests can use it)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")

LABELS = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# Per-pixel statistics of the 60k training images, after scaling to [0, 1].
MEAN = 0.2860
STD = 0.3530


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    # A bytearray keeps the array writable (torch.from_numpy warns on read-only buffers).
    return np.frombuffer(bytearray(data), dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_split(split: str, root: Path = DEFAULT_DIR) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels uint8 (N,)) for split "train" or "test"."""
    prefix = {"train": "train", "test": "t10k"}[split]
    images_path = root / f"{prefix}-images-idx3-ubyte.gz"
    if not images_path.exists():
        raise FileNotFoundError(f"{images_path} not found: apt-get install dataset-fashion-mnist")
    return _read_idx(images_path), _read_idx(root / f"{prefix}-labels-idx1-ubyte.gz")
