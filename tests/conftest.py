"""Session fixtures: the real default model, real encoded images, real servers on loopback."""

from __future__ import annotations

import io
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from bench.server import ServerProcess, run_server
from model_export.fashion_mnist import LABELS, load_split

REPO = Path(__file__).resolve().parents[1]


# Of a server's output, what a failing test's report shows.
SERVER_LOG_TAIL_CHARS = 20_000


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failing test's report carries the output of every server it used: a 500 there is one
    line in the test, and its traceback is in the server's log."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for name, value in getattr(item, "funcargs", {}).items():
            if isinstance(value, ServerProcess):
                report.sections.append((f"server log: {name}", value.log[-SERVER_LOG_TAIL_CHARS:]))


@pytest.fixture(scope="session")
def server() -> Iterator[ServerProcess]:
    """The default model served with default settings, shared by the read-only HTTP tests."""
    with run_server() as running:
        yield running
        assert running.stop() == 0, running.log


@pytest.fixture(scope="session")
def expected_provider() -> str:
    """Where the server's session should run with VIT_PROVIDERS=auto on this host. onnxruntime-gpu lists CUDA
    whether or not a GPU works, and a session without one falls back to the CPU: like the service, believe
    what a real session on the default model says it runs on. Tests compare what the server reports with it."""
    import onnxruntime as ort

    from model_export.manifest import Manifest
    from service.settings import DEFAULT_MODEL_DIR

    cuda, cpu = "CUDAExecutionProvider", "CPUExecutionProvider"
    if cuda not in ort.get_available_providers():
        return cpu
    if hasattr(ort, "preload_dlls"):  # as the service does before a CUDA session (service/engine/runtime.py)
        ort.preload_dlls()
    model = DEFAULT_MODEL_DIR / Manifest.read(DEFAULT_MODEL_DIR).onnx_file
    return ort.InferenceSession(str(model), providers=[cuda, cpu]).get_providers()[0]


@pytest.fixture
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


@dataclass(frozen=True)
class Sample:
    pixels: np.ndarray  # uint8 (28, 28)
    label: str

    def encoded(self, fmt: str = "PNG", **options: object) -> bytes:
        return encode(Image.fromarray(self.pixels), fmt, **options)


@pytest.fixture(scope="session")
def fashion_test_split() -> tuple[np.ndarray, np.ndarray]:
    return load_split("test")


@pytest.fixture(scope="session")
def samples(fashion_test_split: tuple[np.ndarray, np.ndarray]) -> list[Sample]:
    """The first 100 Fashion-MNIST test images with their true labels."""
    images, labels = fashion_test_split
    return [Sample(images[i], LABELS[labels[i]]) for i in range(100)]


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png_declaring(width: int, height: int, payload: bytes = b"\x00" * 64) -> bytes:
    """A well-formed greyscale PNG that declares any size, with only `payload` (compressed) as data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(payload)) + chunk(b"IEND", b"")


def wait_for(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    """Poll a condition the server exposes (its metrics) until it holds, or fail."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


@pytest.fixture(scope="session")
def photo_12mp() -> bytes:
    """A real photo (scikit-image's astronaut) at a phone camera's 4032x3024, as JPEG."""
    from skimage import data

    return encode(Image.fromarray(data.astronaut()).resize((4032, 3024), Image.Resampling.BILINEAR), "JPEG", quality=90)


@pytest.fixture(scope="session")
def photo_1024() -> bytes:
    from skimage import data

    return encode(Image.fromarray(data.coffee()).resize((1024, 768), Image.Resampling.BILINEAR), "JPEG", quality=90)


def metric(client: httpx.Client, name: str) -> float:
    """Sum of every sample of one metric on /metrics (0 if absent)."""
    total = 0.0
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name) and line[len(name)] in " {":
            total += float(line.rsplit(" ", 1)[1])
    return total
