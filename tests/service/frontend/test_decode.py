import io
import json
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image, ImageOps

from model_export.manifest import Preprocessing
from service.errors import CorruptImage, ImageTooLarge, UnsupportedImageFormat
from service.frontend.decode import QUICK_BYTES, QUICK_PIXELS, Decoder, read_jpeg_header
from tests.conftest import REPO, encode, png_declaring

GREY = Preprocessing(image_size=28, resize_size=28, interpolation="bilinear", mean=[0.286], std=[0.353], color_mode="L")
RGB = Preprocessing(image_size=32, resize_size=36, interpolation="bicubic", mean=[0.5] * 3, std=[0.25] * 3)


def _gradient(width: int, height: int) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
    return Image.fromarray(np.concatenate([x + 0 * y, y + 0 * x, (x + y) / 2], axis=2).astype(np.uint8))


def _reference(image: Image.Image, prep: Preprocessing) -> np.ndarray:
    """torchvision's own Resize (shorter side) and CenterCrop on the PIL image: the whole image
    resized, then cropped, the slow and obvious way the libraries do it."""
    from torchvision import transforms

    resize = transforms.Resize(prep.resize_size, interpolation=transforms.InterpolationMode.BICUBIC)
    return np.asarray(transforms.CenterCrop(prep.image_size)(resize(image)))


@pytest.mark.parametrize("size", [(120, 80), (80, 121), (451, 300), (640, 427), (37, 50)])
def test_resize_and_centre_crop_follow_torchvision(size):
    """Odd sizes included: the long side is truncated and each axis scaled by its own ratio, and the
    crop's odd margin rounded half to even, as torchvision (and timm) do."""
    image = _gradient(*size)
    prep = RGB.model_copy(update={"crop_rounding": "half_even"})
    out = Decoder(prep, max_pixels=10**8).decode(encode(image, "PNG"))
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - _reference(image, prep).astype(int)).max() <= 2


def test_an_odd_margin_is_floored_the_hugging_face_way():
    image = _gradient(35, 35)  # already at the resize size: a 3-pixel margin around the 32-pixel crop
    prep = RGB.model_copy(update={"resize_size": 35})
    floored = Decoder(prep, max_pixels=10**8).decode(encode(image, "PNG"))
    rounded = Decoder(prep.model_copy(update={"crop_rounding": "half_even"}), max_pixels=10**8).decode(
        encode(image, "PNG")
    )
    pixels = np.asarray(image)
    assert np.array_equal(floored, pixels[1:33, 1:33]) and np.array_equal(rounded, pixels[2:34, 2:34])


def test_squash_mode_resizes_without_keeping_aspect():
    prep = RGB.model_copy(update={"resize_mode": "squash", "resize_size": 32})
    image = _gradient(120, 40)
    out = Decoder(prep, max_pixels=10**8).decode(encode(image, "PNG"))
    expected = np.asarray(image.resize((32, 32), Image.Resampling.BICUBIC))
    assert np.abs(out.astype(int) - expected.astype(int)).max() <= 2


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F", "1", "YCbCr"])
def test_every_mode_becomes_the_models_colour_mode(mode):
    source = _gradient(40, 40)
    image = source.convert(mode) if mode not in ("I;16", "I", "F") else source.convert("L").convert(mode)
    fmt = {"CMYK": "TIFF", "YCbCr": "JPEG", "F": "TIFF", "I": "TIFF"}.get(mode, "PNG")
    for prep in (GREY, RGB):
        out = Decoder(prep, max_pixels=10**8).decode(encode(image, fmt))
        assert out.shape == (prep.image_size, prep.image_size, prep.channels)


def test_sixteen_bit_greyscale_is_scaled_not_clipped():
    wide = Image.fromarray(np.full((28, 28), 32768, dtype=np.uint16))  # mid-grey in 16 bits
    out = Decoder(GREY, max_pixels=10**8).decode(encode(wide, "PNG"))
    assert 126 <= out.mean() <= 130


def test_transparent_pixels_become_black():
    rgba = Image.new("RGBA", (28, 28), (255, 255, 255, 0))
    rgba.paste((255, 255, 255, 255), (0, 0, 14, 28))
    out = Decoder(GREY, max_pixels=10**8).decode(encode(rgba, "PNG"))
    assert out[:, :12].min() == 255 and out[:, 16:].max() == 0


def test_exif_orientation_is_applied():
    image = _gradient(60, 30)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    tagged = encode(image, "JPEG", exif=exif, quality=95)
    upright = encode(image.transpose(Image.Transpose.ROTATE_270), "JPEG", quality=95)
    pre = Decoder(RGB, max_pixels=10**8).decode
    assert np.abs(pre(tagged).astype(int) - pre(upright).astype(int)).mean() < 3


def test_large_jpeg_uses_draft_decoding_and_matches_a_full_decode():
    photo = _gradient(4000, 3000)  # 12 MP
    data = encode(photo, "JPEG", quality=90)
    pre = Decoder(RGB, max_pixels=10**8).decode
    started = time.perf_counter()
    out = pre(data)
    draft_s = time.perf_counter() - started
    full = _reference(Image.open(io.BytesIO(data)).convert("RGB"), RGB)
    assert np.abs(out.astype(int) - full.astype(int)).mean() < 3
    assert draft_s < 2.0  # a generous ceiling, only to catch a missing draft; timing lives in vit-bench


def test_pixel_limit_is_checked_from_the_header_before_decoding():
    bomb = png_declaring(100_000, 100_000)  # ten gigapixels declared in under 100 bytes
    with pytest.raises(ImageTooLarge):
        Decoder(GREY, max_pixels=40_000_000).decode(bomb)
    with pytest.raises(ImageTooLarge, match="9000x9000"):  # under Pillow's own bomb limit: ours decides
        Decoder(GREY, max_pixels=40_000_000).decode(png_declaring(9000, 9000))
    with pytest.raises(ImageTooLarge):
        Decoder(GREY, max_pixels=100).decode(encode(_gradient(20, 20), "PNG"))


def test_jpeg_scans_are_counted_before_decoding():
    """A progressive JPEG is decoded once per scan over the whole image, at any DCT scale: the limit
    holds before any of them runs, and the files encoders write pass it (a baseline one is not
    counted: its extra scans cost nothing)."""
    image = _gradient(64, 48)
    baseline, progressive = encode(image, "JPEG"), encode(image, "JPEG", progressive=True)
    assert (baseline.count(b"\xff\xda"), progressive.count(b"\xff\xda")) == (1, 10)
    assert (read_jpeg_header(baseline).progressive, read_jpeg_header(progressive).progressive) == (False, True)
    assert Decoder(RGB, max_pixels=10**8).decode(progressive).shape == (32, 32, 3)
    assert Decoder(RGB, max_pixels=10**8, max_jpeg_scans=1).decode(baseline).shape == (32, 32, 3)
    with pytest.raises(ImageTooLarge, match="10 scans; the limit is 9"):
        Decoder(RGB, max_pixels=10**8, max_jpeg_scans=9).decode(progressive)


def test_only_small_baseline_jpegs_are_quick_to_decode():
    """What a front-end may decode on its event loop: work bounded by the file and its header."""
    decoder = Decoder(GREY, max_pixels=10**8)
    small = _gradient(248, 248)
    assert decoder.is_quick(encode(small, "JPEG"))
    assert not decoder.is_quick(encode(small, "JPEG", progressive=True))  # a scan costs the whole image
    assert not decoder.is_quick(encode(small, "PNG"))
    side = int(QUICK_PIXELS**0.5) + 1
    many_pixels = encode(Image.new("L", (side, side), 128), "JPEG")
    assert len(many_pixels) < QUICK_BYTES and not decoder.is_quick(many_pixels)
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (400, 400, 3), dtype=np.uint8))
    many_bytes = encode(noise, "JPEG", quality=95)
    assert len(many_bytes) > QUICK_BYTES and not decoder.is_quick(many_bytes)
    assert not decoder.is_quick(b"\xff\xd8\xff\xe0" + b"\x00" * 40)  # a header it cannot read


def test_images_far_smaller_than_their_pixels_are_refused_before_decoding():
    """A flat 3000x3000 lossless WebP is a few hundred bytes that decode to nine megapixels:
    refused by its pixels per byte, while the first megapixel of any image is free."""
    flat = encode(Image.new("L", (3000, 3000), 128), "WEBP", lossless=True)
    with pytest.raises(ImageTooLarge, match="pixels per byte"):
        Decoder(GREY, max_pixels=40_000_000).decode(flat)
    assert Decoder(GREY, max_pixels=40_000_000, max_pixels_per_byte=10**6).decode(flat).shape == (28, 28, 1)
    one_megapixel = encode(Image.new("L", (1000, 1000)), "WEBP", lossless=True)
    assert Decoder(GREY, max_pixels=40_000_000).decode(one_megapixel).shape == (28, 28, 1)


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"hello, not an image", UnsupportedImageFormat),
        (b"\x00\x00\x01\x00" + b"\x00" * 64, UnsupportedImageFormat),  # ICO: real, but not accepted
        (png_declaring(0, 10), CorruptImage),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, CorruptImage),
    ],
)
def test_unsupported_and_corrupt_bytes_raise_typed_errors(data, error):
    with pytest.raises(error):
        Decoder(GREY, max_pixels=10**8).decode(data)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "TIFF", "BMP"])
def test_truncated_files_are_corrupt_not_crashes(fmt):
    data = encode(_gradient(64, 64), fmt)
    with pytest.raises(CorruptImage):
        Decoder(RGB, max_pixels=10**8).decode(data[: len(data) // 2])


def _pillow_reference(data: bytes, prep: Preprocessing) -> np.ndarray:
    """Pillow alone, as the service decoded before simplejpeg: draft, EXIF transpose, convert, resize + crop."""
    image = Image.open(io.BytesIO(data))
    image.draft(prep.color_mode, (prep.resize_size, prep.resize_size))
    image = ImageOps.exif_transpose(image).convert(prep.color_mode)
    if image.width <= image.height:
        width, height = prep.resize_size, int(prep.resize_size * image.height / image.width)
    else:
        width, height = int(prep.resize_size * image.width / image.height), prep.resize_size
    left, top = (width - prep.image_size) // 2, (height - prep.image_size) // 2
    scale_x, scale_y = width / image.width, height / image.height
    box = (left / scale_x, top / scale_y, (left + prep.image_size) / scale_x, (top + prep.image_size) / scale_y)
    resized = image.resize((prep.image_size, prep.image_size), Image.Resampling.BICUBIC, box=box)
    return np.asarray(resized).reshape(prep.image_size, prep.image_size, -1)


@pytest.mark.parametrize("size", [(36, 36), (120, 80), (1024, 768), (4032, 3024)])
@pytest.mark.parametrize("prep", [RGB, GREY.model_copy(update={"interpolation": "bicubic"})], ids=["rgb", "grey"])
@pytest.mark.parametrize("source_mode", ["RGB", "L"])
def test_jpegs_decode_to_the_same_pixels_as_pillow(size, prep, source_mode):
    data = encode(_gradient(*size).convert(source_mode), "JPEG", quality=90)
    assert np.array_equal(Decoder(prep, max_pixels=10**8).decode(data), _pillow_reference(data, prep))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_turns_the_jpeg_like_pillow(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(_gradient(60, 30), "JPEG", exif=exif, quality=95)
    assert read_jpeg_header(data).orientation == orientation
    assert np.array_equal(Decoder(RGB, max_pixels=10**8).decode(data), _pillow_reference(data, RGB))


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "TIFF", "CMYK JPEG"])
def test_every_exif_orientation_turns_pillows_formats_like_exif_transpose(fmt, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    image = _gradient(60, 30).convert("CMYK") if fmt == "CMYK JPEG" else _gradient(60, 30)
    data = encode(image, fmt.split()[-1], exif=exif, **({"lossless": True} if fmt == "WEBP" else {}))
    assert np.array_equal(Decoder(RGB, max_pixels=10**8).decode(data), _pillow_reference(data, RGB))


@pytest.mark.parametrize(
    "block",
    [
        b"MM\x00*\x00\x00",  # a TIFF header cut before its IFD offset: Pillow raised struct.error
        b"II*\x00\xff\xff\x00\x00",  # the IFD past the block's end
        b"MM\x00*\x00\x00\x00\x08\x00\x05\x01\x12\x00\x03",  # five entries promised, one cut short
        b"MM\x00*\x00\x00\x00\x08\x00\x01\x01\x12\x00\x02\x00\x00\x00\x04abc\x00",  # Orientation as text
        b"MM\x00*\x00\x00\x00\x08\x00\x01\x01\x12\x00\x03\x00\x00\x00\x01\x00\x09\x00\x00",  # Orientation 9
    ],
)
@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "CMYK JPEG", "JPEG"])
def test_an_unreadable_exif_block_is_ignored_as_browsers_do(fmt, block):
    """The pixels are sound; only the metadata is not: served as if it had no orientation, not a 500."""
    image = _gradient(40, 30).convert("CMYK") if fmt == "CMYK JPEG" else _gradient(40, 30)
    kind = fmt.split()[-1]
    tagged = encode(image, kind, exif=(b"Exif\x00\x00" if kind == "JPEG" else b"") + block, quality=95)
    plain = encode(image, kind, quality=95)
    decode = Decoder(RGB, max_pixels=10**8).decode
    assert np.array_equal(decode(tagged), decode(plain))


def test_cmyk_jpegs_fall_back_to_pillow():
    data = encode(_gradient(50, 40).convert("CMYK"), "JPEG")
    assert np.array_equal(Decoder(RGB, max_pixels=10**8).decode(data), _pillow_reference(data, RGB))


def test_at_scale_one_the_crop_equals_the_resize():
    data = encode(_gradient(RGB.resize_size, RGB.resize_size + 8), "PNG")
    image = Image.open(io.BytesIO(data))
    top = (RGB.resize_size + 8 - RGB.image_size) // 2
    left = (RGB.resize_size - RGB.image_size) // 2
    box = (left, top, left + RGB.image_size, top + RGB.image_size)
    resized = image.resize((RGB.image_size, RGB.image_size), Image.Resampling.BICUBIC, box=box)
    assert np.array_equal(Decoder(RGB, max_pixels=10**8).decode(data), np.asarray(resized))


def test_decode_into_writes_the_callers_buffer():
    decoder = Decoder(RGB, max_pixels=10**8)
    slot = np.zeros((2, *decoder.shape), dtype=np.uint8)
    decoder.decode_into(encode(_gradient(40, 40), "PNG"), slot[1])
    assert slot[0].max() == 0 and slot[1].max() > 0


def test_warm_up_loads_every_format_plugin_before_the_first_upload():
    """In a fresh interpreter, as a front-end starts: no decode thread imports a plugin afterwards."""
    program = (
        "import json, sys\n"
        "from model_export.manifest import Manifest\n"
        "from service.frontend.decode import Decoder\n"
        "from service.settings import DEFAULT_MODEL_DIR\n"
        "plugins = lambda: sorted(m for m in sys.modules if m.startswith('PIL.') and m.endswith('ImagePlugin'))\n"
        "decoder = Decoder(Manifest.read(DEFAULT_MODEL_DIR).preprocessing, 10**8)\n"
        "before = plugins()\n"
        "decoder.warm_up()\n"
        "print(json.dumps([before, plugins()]))\n"
    )
    ran = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, cwd=REPO, check=True)
    before, after = json.loads(ran.stdout)
    formats = {"Jpeg", "Png", "Gif", "WebP", "Tiff", "Bmp"}
    assert not formats <= {name.removeprefix("PIL.").removesuffix("ImagePlugin") for name in before}
    assert formats <= {name.removeprefix("PIL.").removesuffix("ImagePlugin") for name in after}
