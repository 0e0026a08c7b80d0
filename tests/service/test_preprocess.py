import time

import numpy as np
import pytest
from PIL import Image

from model_export.manifest import Preprocessing
from service.errors import CorruptImage, ImageTooLarge, UnsupportedImageFormat
from service.preprocess import ImagePreprocessor
from tests.conftest import encode, png_declaring

GREY = Preprocessing(image_size=28, resize_size=28, interpolation="bilinear", mean=[0.286], std=[0.353], color_mode="L")
RGB = Preprocessing(image_size=32, resize_size=36, interpolation="bicubic", mean=[0.5] * 3, std=[0.25] * 3)


def _gradient(width: int, height: int) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
    return Image.fromarray(np.concatenate([x + 0 * y, y + 0 * x, (x + y) / 2], axis=2).astype(np.uint8))


def _reference(image: Image.Image, prep: Preprocessing) -> np.ndarray:
    """Resize the whole image, then centre-crop: the rule written the slow, obvious way."""
    scale = prep.resize_size / min(image.size)
    resized = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
    left, top = (resized.width - prep.image_size) // 2, (resized.height - prep.image_size) // 2
    return np.asarray(resized.crop((left, top, left + prep.image_size, top + prep.image_size)))


def test_resize_and_centre_crop_follow_the_manifest():
    image = _gradient(120, 80)
    out = ImagePreprocessor(RGB, max_pixels=10**8)(encode(image, "PNG"))
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - _reference(image, RGB).astype(int)).max() <= 2


def test_squash_mode_resizes_without_keeping_aspect():
    prep = RGB.model_copy(update={"resize_mode": "squash", "resize_size": 32})
    image = _gradient(120, 40)
    out = ImagePreprocessor(prep, max_pixels=10**8)(encode(image, "PNG"))
    expected = np.asarray(image.resize((32, 32), Image.Resampling.BICUBIC))
    assert np.abs(out.astype(int) - expected.astype(int)).max() <= 2


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F", "1", "YCbCr"])
def test_every_mode_becomes_the_models_colour_mode(mode):
    source = _gradient(40, 40)
    image = source.convert(mode) if mode not in ("I;16", "I", "F") else source.convert("L").convert(mode)
    fmt = {"CMYK": "TIFF", "YCbCr": "JPEG", "F": "TIFF", "I": "TIFF"}.get(mode, "PNG")
    for prep in (GREY, RGB):
        out = ImagePreprocessor(prep, max_pixels=10**8)(encode(image, fmt))
        assert out.shape == (prep.image_size, prep.image_size, prep.channels)


def test_sixteen_bit_greyscale_is_scaled_not_clipped():
    wide = Image.fromarray(np.full((28, 28), 32768, dtype=np.uint16))  # mid-grey in 16 bits
    out = ImagePreprocessor(GREY, max_pixels=10**8)(encode(wide, "PNG"))
    assert 126 <= out.mean() <= 130


def test_transparent_pixels_become_black():
    rgba = Image.new("RGBA", (28, 28), (255, 255, 255, 0))
    rgba.paste((255, 255, 255, 255), (0, 0, 14, 28))
    out = ImagePreprocessor(GREY, max_pixels=10**8)(encode(rgba, "PNG"))
    assert out[:, :12].min() == 255 and out[:, 16:].max() == 0


def test_exif_orientation_is_applied():
    image = _gradient(60, 30)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    tagged = encode(image, "JPEG", exif=exif, quality=95)
    upright = encode(image.transpose(Image.Transpose.ROTATE_270), "JPEG", quality=95)
    pre = ImagePreprocessor(RGB, max_pixels=10**8)
    assert np.abs(pre(tagged).astype(int) - pre(upright).astype(int)).mean() < 3


def test_large_jpeg_uses_draft_decoding_and_matches_a_full_decode():
    photo = _gradient(4000, 3000)  # 12 MP
    data = encode(photo, "JPEG", quality=90)
    pre = ImagePreprocessor(RGB, max_pixels=10**8)
    started = time.perf_counter()
    out = pre(data)
    draft_s = time.perf_counter() - started
    full = _reference(Image.open(__import__("io").BytesIO(data)).convert("RGB"), RGB)
    assert np.abs(out.astype(int) - full.astype(int)).mean() < 3
    assert draft_s < 2.0  # a generous ceiling, only to catch a missing draft; timing lives in vit-bench


def test_pixel_limit_is_checked_from_the_header_before_decoding():
    bomb = png_declaring(100_000, 100_000)  # ten gigapixels declared in under 100 bytes
    with pytest.raises(ImageTooLarge):
        ImagePreprocessor(GREY, max_pixels=40_000_000)(bomb)
    with pytest.raises(ImageTooLarge, match="9000x9000"):  # under Pillow's own bomb limit: ours decides
        ImagePreprocessor(GREY, max_pixels=40_000_000)(png_declaring(9000, 9000))
    with pytest.raises(ImageTooLarge):
        ImagePreprocessor(GREY, max_pixels=100)(encode(_gradient(20, 20), "PNG"))


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
        ImagePreprocessor(GREY, max_pixels=10**8)(data)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "TIFF", "BMP"])
def test_truncated_files_are_corrupt_not_crashes(fmt):
    data = encode(_gradient(64, 64), fmt)
    with pytest.raises(CorruptImage):
        ImagePreprocessor(RGB, max_pixels=10**8)(data[: len(data) // 2])


def test_normalisation_writes_chw_into_the_batch_buffer():
    pre = ImagePreprocessor(RGB, max_pixels=10**8)
    images = [np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8) for i in range(3)]
    batch = np.empty((4, 3, 32, 32), dtype=np.float32)
    pre.normalize_into(images, batch[:3])
    naive = np.stack([(img.astype(np.float32) / 255 - 0.5) / 0.25 for img in images]).transpose(0, 3, 1, 2)
    assert np.allclose(batch[:3], naive, atol=1e-5)
