"""Encoded image bytes -> the model's input, exactly as the manifest's preprocessing says.

Decoding and resizing (`ImagePreprocessor.__call__`) run in the preprocessing thread pool and
yield small uint8 arrays; normalisation (`normalize_into`) writes straight into the batch
buffer in CHW order when a batch is formed.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from model_export.manifest import Preprocessing
from service.errors import CorruptImage, ImageTooLarge, UnsupportedImageFormat

# Pillow format name -> the leading bytes that identify it.
SIGNATURES: dict[str, tuple[bytes, ...]] = {
    "JPEG": (b"\xff\xd8\xff",),
    "PNG": (b"\x89PNG\r\n\x1a\n",),
    "GIF": (b"GIF87a", b"GIF89a"),
    "WEBP": (b"RIFF",),
    "TIFF": (b"II*\x00", b"MM\x00*"),
    "BMP": (b"BM",),
}
SUPPORTED_FORMATS = ", ".join(SIGNATURES)

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


def sniff_format(data: bytes) -> str | None:
    for name, magics in SIGNATURES.items():
        if data.startswith(magics) and (name != "WEBP" or data[8:12] == b"WEBP"):
            return name
    return None


class ImagePreprocessor:
    def __init__(self, preprocessing: Preprocessing, max_pixels: int) -> None:
        self.prep = preprocessing
        self.max_pixels = max_pixels
        self.resample = _RESAMPLE[preprocessing.interpolation]
        channels = preprocessing.channels
        std = np.asarray(preprocessing.std, dtype=np.float32)
        # (x / 255 - mean) / std as one multiply-add per channel.
        self._scale = (1.0 / (255.0 * std)).reshape(channels, 1, 1)
        self._bias = (-np.asarray(preprocessing.mean, dtype=np.float32) / std).reshape(channels, 1, 1)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        size = self.prep.image_size
        return (self.prep.channels, size, size)

    def __call__(self, data: bytes) -> np.ndarray:
        """Decode, orient, convert and resize; returns uint8 (H, W, C) at the model's size."""
        image = self._open(data)
        try:
            self._check_size(image.size)
            if image.format in ("JPEG", "MPO"):  # MPO: the multi-picture JPEGs many phones write
                # Let libjpeg scale by 1/2..1/8 during decode: the result stays at least
                # resize_size on its shorter side, and a 12 MP photo decodes several times faster.
                image.draft(self.prep.color_mode, (self.prep.resize_size, self.prep.resize_size))
            image.load()
            oriented = ImageOps.exif_transpose(image)
            pixels = self._resize(self._convert(oriented))
        except (ImageTooLarge, CorruptImage):
            raise
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError) as exc:
            # Pillow reports truncated or inconsistent data with any of these.
            raise CorruptImage(f"image data is corrupt or truncated: {exc}") from exc
        finally:
            image.close()
        array = np.asarray(pixels, dtype=np.uint8)
        return array[:, :, None] if array.ndim == 2 else array

    def _open(self, data: bytes) -> Image.Image:
        sniffed = sniff_format(data)
        if sniffed is None:
            raise UnsupportedImageFormat(f"not a supported image format (supported: {SUPPORTED_FORMATS})")
        try:
            # Pillow warns about odd but readable files (and very large ones, which our own
            # limit decides on next); vit-serve sends warnings to the log, they fail nothing.
            return Image.open(io.BytesIO(data), formats=tuple(SIGNATURES))
        except Image.DecompressionBombError as exc:
            raise ImageTooLarge(f"image dimensions exceed the decoder's safety limit: {exc}") from exc
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
            raise CorruptImage(f"{sniffed} header is corrupt or truncated") from exc

    def _check_size(self, size: tuple[int, int]) -> None:
        width, height = size
        if width <= 0 or height <= 0:
            raise CorruptImage(f"image has no pixels ({width}x{height})")
        if width * height > self.max_pixels:
            raise ImageTooLarge(f"image is {width}x{height} = {width * height} pixels; the limit is {self.max_pixels}")

    def _convert(self, image: Image.Image) -> Image.Image:
        target = self.prep.color_mode
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            # 16-bit (or 32-bit int) greyscale: Pillow's convert("L") would clip at 255; scale instead.
            wide = np.asarray(image, dtype=np.float32)
            image = Image.fromarray(np.clip(wide / 256.0, 0, 255).astype(np.uint8), mode="L")
        elif image.mode == "F":
            image = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8), mode="L")
        if image.mode == "P":
            image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
            # Transparent pixels become black: alpha-premultiplied, the usual convention.
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
            image = Image.alpha_composite(background, rgba)
        return image if image.mode == target else image.convert(target)

    def _resize(self, image: Image.Image) -> Image.Image:
        prep = self.prep
        width, height = image.size
        if prep.resize_mode == "squash":
            scale_x, scale_y = prep.resize_size / width, prep.resize_size / height
        else:
            scale_x = scale_y = prep.resize_size / min(width, height)
        resized_w, resized_h = round(width * scale_x), round(height * scale_y)
        left = (resized_w - prep.image_size) // 2
        top = (resized_h - prep.image_size) // 2
        # Resize only the source region that the centre crop keeps: same pixels, less work.
        box = (
            left / scale_x,
            top / scale_y,
            (left + prep.image_size) / scale_x,
            (top + prep.image_size) / scale_y,
        )
        return image.resize((prep.image_size, prep.image_size), self.resample, box=box)

    def normalize_into(self, images: list[np.ndarray], out: np.ndarray) -> None:
        """Write (x / 255 - mean) / std of each uint8 (H, W, C) image into out[i] as (C, H, W);
        float32 (C, H, W) tensors arrive already normalised (Open Inference Protocol FP32 input)."""
        for slot, image in zip(out, images, strict=True):
            if image.dtype == np.float32:
                slot[...] = image
                continue
            np.multiply(image.transpose(2, 0, 1), self._scale, out=slot)
            slot += self._bias
