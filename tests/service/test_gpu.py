"""The GPU lane: run on a host with an NVIDIA GPU and onnxruntime-gpu, `pytest -m gpu` (README,
"Tests on a GPU host"). CI has no GPU and deselects these with the `gpu` marker."""

import subprocess
import sys

import numpy as np
import pytest

from bench.server import run_server
from model_export.manifest import Manifest
from service.engine.runtime import CUDA, OnnxBackend
from service.settings import DEFAULT_MODEL_DIR, Settings
from tests.model_export.test_default_model import WEIGHTS_DIR

pytestmark = pytest.mark.gpu

MANIFEST = Manifest.read(DEFAULT_MODEL_DIR)
MODEL = DEFAULT_MODEL_DIR / MANIFEST.onnx_file


@pytest.fixture(scope="module")
def on_cuda() -> OnnxBackend:
    # The strict check passes: a session that fell back to the CPU would raise StartupError here.
    return OnnxBackend(MODEL, MANIFEST, Settings(providers="cuda", require_requested_provider=True))


@pytest.fixture(scope="module")
def on_cpu() -> OnnxBackend:
    return OnnxBackend(MODEL, MANIFEST, Settings(providers="cpu"))


def test_the_strict_provider_check_passes_and_the_session_runs_on_cuda(on_cuda):
    assert on_cuda.provider == CUDA and on_cuda.on_cuda
    assert on_cuda.providers.requested[0] == CUDA


@pytest.mark.parametrize("batch", [1, 3, 8, 64])
def test_io_binding_answers_what_the_cpu_answers(on_cuda, on_cpu, batch):
    rng = np.random.default_rng(batch)
    pixels = rng.integers(0, 256, (batch, 28, 28, 1), dtype=np.uint8)
    tensors = rng.standard_normal((batch // 2, 1, 28, 28), dtype=np.float32)
    for gpu, cpu in zip(on_cuda.predict(pixels, tensors), on_cpu.predict(pixels, tensors), strict=True):
        assert gpu.shape == cpu.shape and np.abs(gpu - cpu).max() <= 1e-3


def test_the_fp16_gate_records_the_provider_its_session_ran_on(tmp_path):
    # As a module: a host running bench/gpu_bundle.sh imports the repository and installs no scripts.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "model_export.cli",
            str(WEIGHTS_DIR),
            "--out",
            str(tmp_path),
            "--fp16",
            "--gate",
            "fashion-mnist",
            "--no-explain",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    gate = Manifest.read(tmp_path).verification["variant_gate"]
    assert gate["provider"] == CUDA and gate["passed"]


def test_the_service_classifies_on_cuda_over_http(samples):
    with run_server(providers="cuda", require_requested_provider="true") as server, server.client() as client:
        (model,) = client.get("/v1/models").json()["models"]
        assert model["provider"] == CUDA
        assert client.get("/readyz").json()["provider"] == CUDA
        files = [("file", (f"{i}.png", s.encoded(), "image/png")) for i, s in enumerate(samples[:32])]
        results = client.post("/classify", files=files).json()["results"]
        correct = sum(r["predictions"][0]["label"] == s.label for r, s in zip(results, samples, strict=False))
        assert correct >= 26, correct  # the model scores 0.90 on the CPU
        assert f'provider="{CUDA}"' in client.get("/metrics").text
        assert server.stop() == 0
