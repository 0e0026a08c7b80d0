"""Encoded image bytes -> uint8 pixels at the model's input size, exactly as the manifest says.

The graph does the rest (cast, scale, mean/std, layout), so what leaves here is the small
(H, W, C) uint8 image, written straight into the caller's buffer (a shared-memory slot).

JPEGs, most uploads, go through simplejpeg (libjpeg-turbo): it releases the GIL for the whole
decode and scales in the DCT domain, so decode threads do not stall the event loop. Every
other format, and the JPEGs libjpeg-turbo will not turn into RGB (CMYK, YCCK), go through Pillow.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import simplejpeg
from PIL import Image, UnidentifiedImageError

from model_export.manifest import Preprocessing
from service.errors import CorruptImage, ImageTooLarge, UnsupportedImageFormat
from service.settings import MAX_JPEG_SCANS, MAX_PIXELS_PER_BYTE, Settings

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
# Pixels any image may have whatever its file's size: past them, max_pixels_per_byte applies.
FREE_PIXELS = 1_000_000
# A baseline JPEG within both decodes in a couple of milliseconds at most (photos of 128-512 px
# timed here: 0.1-0.6 ms for a 28 px greyscale model, 0.6-1.7 for 224 px RGB): short enough to
# run on a front-end's event loop (see EngineClient._fill).
QUICK_BYTES = 64 * 1024
QUICK_PIXELS = 512 * 512
# Start-of-frame markers (0xC4, 0xC8 and 0xCC share the range but are not frames), and those of
# the progressive processes, whose every scan libjpeg-turbo decodes over the whole image.
_START_OF_FRAME = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_PROGRESSIVE = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
# libjpeg-turbo colour spaces it can convert to RGB or greyscale itself.
_TURBO_COLOURS = {"Gray", "YCbCr", "RGB"}
# EXIF orientation -> the numpy operation that makes the image upright (Pillow's exif_transpose).
_UPRIGHT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a),
}
# The same for a Pillow image.
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


# The centre crop's offset from its margin, as each library rounds an odd one.
_CROP_OFFSET: dict[str, Callable[[int], int]] = {
    "floor": lambda margin: margin // 2,
    "half_even": lambda margin: round(margin / 2),
}


def sniff_format(data: bytes) -> str | None:
    for name, magics in SIGNATURES.items():
        if data.startswith(magics) and (name != "WEBP" or data[8:12] == b"WEBP"):
            return name
    return None


class JpegHeader(NamedTuple):
    orientation: int  # EXIF orientation 1-8; 1 when absent or unreadable
    progressive: bool | None  # None when the markers before the first scan could not all be read


def read_jpeg_header(data: bytes) -> JpegHeader:
    """What the markers before the first scan say: the EXIF orientation of its APP1 segment, and
    whether the frame is progressive. Each step is bounded by the segment lengths, so a hostile
    file costs at most one pass over its headers."""
    orientation, progressive = 1, None
    offset = 2
    while offset + 4 <= len(data) and data[offset] == 0xFF:
        marker = data[offset + 1]
        if marker == 0xDA:  # start of scan: no metadata after this
            return JpegHeader(orientation, progressive)
        (length,) = struct.unpack_from(">H", data, offset + 2)
        segment = data[offset + 4 : offset + 2 + length]
        if marker in _START_OF_FRAME:
            progressive = marker in _PROGRESSIVE
        elif marker == 0xE1 and orientation == 1 and segment.startswith(b"Exif\x00\x00"):
            orientation = _tiff_orientation(segment[6:])
        offset += 2 + length
    return JpegHeader(orientation, None)


def _tiff_orientation(tiff: bytes) -> int:
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return 1
    order = "<" if tiff[:2] == b"II" else ">"
    (ifd,) = struct.unpack_from(order + "I", tiff, 4)
    if ifd + 2 > len(tiff):
        return 1
    (entries,) = struct.unpack_from(order + "H", tiff, ifd)
    for index in range(entries):
        entry = ifd + 2 + 12 * index
        if entry + 12 > len(tiff):
            return 1
        tag, kind, _, value = struct.unpack_from(order + "HHIH", tiff, entry)
        if tag == 0x0112 and kind == 3:  # Orientation, a SHORT
            return value if value in _UPRIGHT else 1
    return 1


def pillow_orientation(image: Image.Image) -> int:
    """The EXIF orientation of an image Pillow loaded; 1 when absent or unreadable, as for JPEGs.
    Read here, not by Pillow's exif_transpose, which raises whatever its TIFF parser meets in a
    malformed block (struct.error, TypeError, AttributeError) and re-encodes the block besides.
    A TIFF's own orientation tag Pillow applies as it loads the file, and drops."""
    exif = image.info.get("exif")
    return _tiff_orientation(exif.removeprefix(b"Exif\x00\x00")) if isinstance(exif, bytes) else 1


def draft_factor(width: int, height: int, target: int) -> int:
    """The DCT downscale (1, 2, 4 or 8) that keeps both sides at least `target`: Pillow's draft rule."""
    fits = min(width // target, height // target)
    return next((factor for factor in (8, 4, 2) if fits >= factor), 1)


class Decoder:
    """Decode, orient, convert and resize one upload into a uint8 (H, W, C) buffer."""

    def __init__(
        self,
        preprocessing: Preprocessing,
        max_pixels: int,
        max_jpeg_scans: int = MAX_JPEG_SCANS,
        max_pixels_per_byte: int = MAX_PIXELS_PER_BYTE,
    ) -> None:
        self.prep = preprocessing
        self.max_pixels = max_pixels
        self.max_jpeg_scans = max_jpeg_scans
        self.max_pixels_per_byte = max_pixels_per_byte
        self.resample = _RESAMPLE[preprocessing.interpolation]
        self.shape = (preprocessing.image_size, preprocessing.image_size, preprocessing.channels)

    @classmethod
    def from_settings(cls, preprocessing: Preprocessing, settings: Settings) -> Decoder:
        """The decoder under the limits these settings give uploads."""
        return cls(preprocessing, settings.max_image_pixels, settings.max_jpeg_scans, settings.max_pixels_per_byte)

    def warm_up(self) -> None:
        """Decode a small image of every supported format once. Pillow loads its format plugins on
        first use: done here, before serving, the first uploads of a fresh front-end do not pay for
        it (the first WebP took 17-21 ms against 0.4), nor do decode threads race to import them."""
        sample = Image.new("RGB", (64, 48), (90, 120, 150))
        Image.init()
        for fmt in SIGNATURES:
            if fmt not in Image.SAVE:  # a Pillow built without this format's codec cannot decode it either
                continue
            encoded = io.BytesIO()
            sample.save(encoded, fmt)
            self.decode(encoded.getvalue())

    def is_quick(self, data: bytes) -> bool:
        """A baseline JPEG within QUICK_BYTES and QUICK_PIXELS: bounded work, whatever its content.
        Progressive files are not (each scan decodes over the whole image), nor anything unreadable."""
        if len(data) > QUICK_BYTES or sniff_format(data) != "JPEG" or read_jpeg_header(data).progressive is not False:
            return False
        try:
            height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError:
            return False
        return width * height <= QUICK_PIXELS

    def decode(self, data: bytes) -> np.ndarray:
        pixels = np.empty(self.shape, dtype=np.uint8)
        self.decode_into(data, pixels)
        return pixels

    def decode_into(self, data: bytes, out: np.ndarray) -> None:
        """Write the model-size image into `out` (uint8, self.shape); typed errors for bad input."""
        fmt = sniff_format(data)
        if fmt is None:
            raise UnsupportedImageFormat(f"not a supported image format (supported: {SUPPORTED_FORMATS})")
        decoded = None
        if fmt == "JPEG":
            header = read_jpeg_header(data)
            if header.progressive is not False:  # progressive, or a header too odd to say
                self._check_scans(data)
            decoded = self._jpeg(data, header.orientation)
        if decoded is not None:
            height, width = decoded.shape[:2]
            scale, crop, box = self._geometry(width, height)
            if scale == (1, 1):  # already at the resize size: the model's input is a slice of it
                left, top, right, bottom = crop
                out[...] = decoded[top:bottom, left:right]
                return
            image = Image.fromarray(decoded[..., 0] if decoded.shape[-1] == 1 else decoded)
        else:
            image = self._pillow(data, fmt)
        try:
            out[...] = np.asarray(self.resize_and_crop(image)).reshape(self.shape)
        finally:
            image.close()

    def _jpeg(self, data: bytes, orientation: int) -> np.ndarray | None:
        """libjpeg-turbo's decode at the draft scale, upright; None for colour spaces it cannot convert."""
        try:
            height, width, colour, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError as exc:
            raise CorruptImage(f"JPEG header is corrupt or truncated: {exc}") from exc
        self._check_size(width, height, len(data))
        if colour not in _TURBO_COLOURS:
            return None
        factor = draft_factor(width, height, self.prep.resize_size)
        try:
            # The smallest scale whose sides reach these minimums is exactly 1/factor.
            pixels = simplejpeg.decode_jpeg(
                data,
                colorspace="GRAY" if self.prep.color_mode == "L" else "RGB",
                min_width=-(-width // factor),
                min_height=-(-height // factor),
            )
        except ValueError as exc:  # truncated or inconsistent data; strict mode refuses to guess
            raise CorruptImage(f"image data is corrupt or truncated: {exc}") from exc
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        return _UPRIGHT[orientation](pixels) if orientation != 1 else pixels

    def _pillow(self, data: bytes, fmt: str) -> Image.Image:
        try:
            # Pillow warns about odd but readable files (and very large ones, which our own
            # limit decides on next); vit-serve sends warnings to the log, they fail nothing.
            image = Image.open(io.BytesIO(data), formats=tuple(SIGNATURES))
        except Image.DecompressionBombError as exc:
            raise ImageTooLarge(f"image dimensions exceed the decoder's safety limit: {exc}") from exc
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
            raise CorruptImage(f"{fmt} header is corrupt or truncated") from exc
        try:
            self._check_size(*image.size, len(data))
            if image.format in ("JPEG", "MPO"):  # MPO: the multi-picture JPEGs many phones write
                image.draft(self.prep.color_mode, (self.prep.resize_size, self.prep.resize_size))
            image.load()
            orientation = pillow_orientation(image)
            return self._convert(image.transpose(_TRANSPOSE[orientation]) if orientation != 1 else image)
        except (ImageTooLarge, CorruptImage):
            image.close()
            raise
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError) as exc:
            image.close()
            # Pillow reports truncated or inconsistent data with any of these.
            raise CorruptImage(f"image data is corrupt or truncated: {exc}") from exc

    def _check_scans(self, data: bytes) -> None:
        # Each scan starts at an SOS marker, and in entropy-coded data 0xFF is always followed by 0x00
        # or a restart marker, so this counts the scans (plus any in an embedded thumbnail). It costs
        # about 1 ns a byte, and only progressive frames need it: a baseline JPEG with 50 scans too
        # many decoded no slower, so baseline files, most uploads, skip it.
        scans = data.count(b"\xff\xda")
        if scans > self.max_jpeg_scans:
            raise ImageTooLarge(
                f"JPEG has {scans} scans; the limit is {self.max_jpeg_scans} (each is decoded over the whole image)"
            )

    def _check_size(self, width: int, height: int, file_bytes: int) -> None:
        if width <= 0 or height <= 0:
            raise CorruptImage(f"image has no pixels ({width}x{height})")
        if width * height > self.max_pixels:
            raise ImageTooLarge(f"image is {width}x{height} = {width * height} pixels; the limit is {self.max_pixels}")
        # Decoding costs by the pixel, so a file far smaller than its pixels would cost far more
        # than its bytes suggest (a decompression bomb); any image gets its first megapixel free.
        if width * height > FREE_PIXELS + self.max_pixels_per_byte * file_bytes:
            raise ImageTooLarge(
                f"image is {width}x{height} pixels in a {file_bytes}-byte file: more than "
                f"{self.max_pixels_per_byte} pixels per byte past its first megapixel"
            )

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

    def _geometry(
        self, width: int, height: int
    ) -> tuple[tuple[float, float], tuple[int, int, int, int], tuple[float, float, float, float]]:
        """The resize scale (x, y), the centre crop in resized pixels, and that crop in source pixels.

        As torchvision, timm and Hugging Face size it: the shorter side becomes resize_size, the
        longer one int(resize_size * long / short) (truncated), each axis scaled by its own ratio."""
        prep, size = self.prep, self.prep.resize_size
        if prep.resize_mode == "squash":
            resized = (size, size)
        elif width <= height:
            resized = (size, int(size * height / width))
        else:
            resized = (int(size * width / height), size)
        scale_x, scale_y = resized[0] / width, resized[1] / height
        offset = _CROP_OFFSET[prep.crop_rounding]
        left, top = offset(resized[0] - prep.image_size), offset(resized[1] - prep.image_size)
        crop = (left, top, left + prep.image_size, top + prep.image_size)
        box = (crop[0] / scale_x, crop[1] / scale_y, crop[2] / scale_x, crop[3] / scale_y)
        return (scale_x, scale_y), crop, box

    def resize_and_crop(self, image: Image.Image) -> Image.Image:
        """The model's input from a decoded, upright image in its colour mode."""
        scale, crop, box = self._geometry(*image.size)
        if scale == (1, 1):
            # At scale 1 every filter weighs only the pixel itself: the crop is the resize, exactly.
            return image.crop(crop)
        # Resize only the source region that the centre crop keeps: same pixels, less work.
        return image.resize((self.prep.image_size, self.prep.image_size), self.resample, box=box)
