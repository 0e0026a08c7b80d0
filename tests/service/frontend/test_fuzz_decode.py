"""Property-based fuzzing of the decode path: any bytes end in a typed 4xx error or a valid image.

Seeds are real files in every accepted format (including animated, 16-bit and palette images);
hypothesis truncates, flips bits, splices and prefixes them with magic numbers. EXIF blocks are
fuzzed inside otherwise sound files, where a flip of the whole file would rarely reach them.
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from model_export.manifest import Preprocessing
from service.errors import ServiceError
from service.frontend.decode import SIGNATURES, Decoder
from tests.conftest import encode, png_declaring

DECODER = Decoder(
    Preprocessing(image_size=28, resize_size=28, interpolation="bilinear", mean=[0.286], std=[0.353], color_mode="L"),
    max_pixels=4_000_000,
)


def _seeds() -> list[bytes]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8))
    frames = [Image.fromarray(rng.integers(0, 256, (24, 24), dtype=np.uint8)).convert("P") for _ in range(3)]
    seeds = [encode(rgb, fmt) for fmt in ("JPEG", "PNG", "WEBP", "GIF", "TIFF", "BMP")]
    seeds.append(encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0))
    seeds.append(
        encode(frames[0].convert("RGB"), "WEBP", save_all=True, append_images=[f.convert("RGB") for f in frames[1:]])
    )
    seeds.append(
        encode(frames[0].convert("L"), "TIFF", save_all=True, append_images=[f.convert("L") for f in frames[1:]])
    )
    seeds.append(encode(Image.fromarray(rng.integers(0, 65535, (20, 20), dtype=np.uint16)), "PNG"))
    seeds.append(encode(rgb.convert("P"), "PNG"))
    seeds.append(encode(rgb.convert("CMYK"), "JPEG"))
    return seeds


SEEDS = _seeds()


def _decode_is_safe(data: bytes) -> None:
    try:
        pixels = DECODER.decode(data)
    except ServiceError as error:
        assert 400 <= error.status < 500, (error.status, error.message)
    else:
        assert pixels.shape == (28, 28, 1) and pixels.dtype == np.uint8


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(seed=st.sampled_from(SEEDS), cut=st.floats(0, 1))
def test_truncated_files(seed, cut):
    _decode_is_safe(seed[: int(len(seed) * cut)])


@FUZZ
@given(
    seed=st.sampled_from(SEEDS), flips=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 7)), min_size=1, max_size=8)
)
def test_bit_flips(seed, flips):
    data = bytearray(seed)
    for where, bit in flips:
        data[min(int(where * len(data)), len(data) - 1)] ^= 1 << bit
    _decode_is_safe(bytes(data))


@FUZZ
@given(first=st.sampled_from(SEEDS), second=st.sampled_from(SEEDS), a=st.floats(0, 1), b=st.floats(0, 1))
def test_splices_of_two_files(first, second, a, b):
    _decode_is_safe(first[: int(len(first) * a)] + second[int(len(second) * b) :])


@FUZZ
@given(magic=st.sampled_from([m for magics in SIGNATURES.values() for m in magics]), tail=st.binary(max_size=2048))
def test_random_bytes_behind_a_real_magic_number(magic, tail):
    _decode_is_safe(magic + tail)


@FUZZ
@given(width=st.integers(0, 2**31 - 1), height=st.integers(0, 2**31 - 1), payload=st.binary(max_size=64))
def test_any_declared_size_with_a_tiny_body(width, height, payload):
    _decode_is_safe(png_declaring(width, height, payload))


def _exif_block() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    exif[0x010F] = "maker"  # an ASCII tag, whose value lies past the IFD
    return exif.tobytes()  # "Exif\0\0", then the TIFF structure


EXIF = _exif_block()
# Each format's way in for an EXIF block: PNG's eXIf chunk, WebP's EXIF chunk, a JPEG's APP1 segment
# (read by the service's own header reader, or by Pillow for CMYK).
EXIF_CARRIERS = {
    "PNG": Image.new("RGB", (12, 8), (200, 40, 90)),
    "WEBP": Image.new("RGB", (12, 8), (200, 40, 90)),
    "JPEG": Image.new("RGB", (12, 8), (200, 40, 90)),
    "CMYK JPEG": Image.new("CMYK", (12, 8), (10, 200, 40, 90)),
}


@FUZZ
@given(
    carrier=st.sampled_from(sorted(EXIF_CARRIERS)),
    cut=st.floats(0, 1),
    flips=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 7)), max_size=6),
)
def test_malformed_exif_blocks(carrier, cut, flips):
    block = bytearray(EXIF[: 6 + int((len(EXIF) - 6) * cut)])
    tiff = len(block) - 6
    for where, bit in flips:
        if tiff:
            block[6 + min(int(where * tiff), tiff - 1)] ^= 1 << bit
    _decode_is_safe(encode(EXIF_CARRIERS[carrier], carrier.split()[-1], exif=bytes(block)))


@pytest.mark.parametrize("index", range(len(SEEDS)))
def test_every_seed_itself_decodes(index):
    assert DECODER.decode(SEEDS[index]).shape == (28, 28, 1)
