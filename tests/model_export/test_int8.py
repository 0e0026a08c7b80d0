"""The int8 variant of the default model: exported, gated on Fashion-MNIST, served, reported."""

import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from bench.server import run_server
from model_export.manifest import Manifest
from tests.model_export.test_default_model import WEIGHTS_DIR

VIT_EXPORT = str(Path(sys.executable).parent / "vit-export")


@pytest.fixture(scope="module")
def int8_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("int8")
    result = subprocess.run(
        [
            VIT_EXPORT,
            str(WEIGHTS_DIR),
            "--out",
            str(out),
            "--name",
            "fashion-mnist-vit-int8",
            "--int8",
            "--gate",
            "fashion-mnist",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    print(result.stdout)
    return out


def test_int8_passes_its_gate_and_the_manifest_records_it(int8_model):
    manifest = Manifest.read(int8_model)
    gate = manifest.verification["int8_gate"]
    assert manifest.variant == "int8" and gate["passed"]
    assert gate["drop_points"] <= 0.5 and gate["top1_agreement"] >= 0.99
    assert gate["int8_accuracy"] >= 0.89
    graph = onnx.load(str(int8_model / "model.onnx")).graph
    assert any(node.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") for node in graph.node)


def test_the_server_reports_the_variant_and_its_gate(int8_model, samples):
    with run_server(int8_model) as server, server.client() as client:
        (model,) = client.get("/v1/models").json()["models"]
        assert model["variant"] == "int8" and model["variant_gate"]["passed"]
        assert 'variant="int8"' in client.get("/metrics").text
        response = client.post("/classify?explain=true", files={"file": ("x.png", samples[0].encoded(), "image/png")})
        assert response.status_code == 200 and "attention" in response.json()["results"][0]
        assert server.stop() == 0
