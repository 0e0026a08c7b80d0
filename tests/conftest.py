"""Session fixtures: the real default model, real encoded images, real servers on loopback."""

from __future__ import annotations

import io
import os
import queue
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from model_export.fashion_mnist import LABELS, load_split
from service.settings import DEFAULT_MODEL_DIR

REPO = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT_S = 60


@dataclass
class ServerProcess:
    process: subprocess.Popen[str]
    url: str
    lines: list[str] = field(default_factory=list)

    def client(self, **kwargs: object) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kwargs)  # type: ignore[arg-type]

    def stop(self, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    @property
    def log(self) -> str:
        return "".join(self.lines)


def _pump(stream: io.TextIOBase, lines: list[str], announced: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.append(line)
        if "Uvicorn running on" in line:
            announced.put(line)
    announced.put(None)  # the process closed its output: it has exited


@contextmanager
def run_server(model_dir: Path = DEFAULT_MODEL_DIR, **env: object) -> Iterator[ServerProcess]:
    """`vit-serve` in a subprocess on 127.0.0.1 and a free port, with VIT_* settings from env."""
    environment = {**os.environ, **{f"VIT_{k.upper()}": str(v) for k, v in env.items()}}
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "--model", str(model_dir), "--host", "127.0.0.1", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=environment,
        cwd=REPO,
    )
    lines: list[str] = []
    announced: queue.Queue[str | None] = queue.Queue()
    reader = threading.Thread(target=_pump, args=(process.stdout, lines, announced), daemon=True)
    reader.start()
    try:
        try:
            line = announced.get(timeout=STARTUP_TIMEOUT_S)
        except queue.Empty:
            raise RuntimeError("server did not start in time:\n" + "".join(lines)) from None
        if line is None:
            raise RuntimeError(f"server exited with {process.wait()}:\n" + "".join(lines))
        port = re.search(r"http://127\.0\.0\.1:(\d+)", line).group(1)  # type: ignore[union-attr]
        yield ServerProcess(process, f"http://127.0.0.1:{port}", lines)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        reader.join(timeout=10)
        process.stdout.close()  # type: ignore[union-attr]


@pytest.fixture(scope="session")
def server() -> Iterator[ServerProcess]:
    """The default model served with default settings, shared by the read-only HTTP tests."""
    with run_server() as running:
        yield running
        assert running.stop() == 0, running.log


@pytest.fixture
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


@dataclass(frozen=True)
class Sample:
    pixels: np.ndarray  # uint8 (28, 28)
    label: str

    def encoded(self, fmt: str = "PNG", **options: object) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(self.pixels).save(buffer, fmt, **options)
        return buffer.getvalue()


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
