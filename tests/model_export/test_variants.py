"""The default model's variants: exported, gated on Fashion-MNIST, served and reported."""

import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from bench.server import run_server
from model_export.manifest import Manifest
from tests.model_export.test_default_model import WEIGHTS_DIR

VIT_EXPORT = str(Path(sys.executable).parent / "vit-export")

# variant -> (vit-export flags, an operator that only that variant's plain graph holds)
VARIANTS = {
    "int8": (["--int8", "--gate", "fashion-mnist"], "DynamicQuantizeMatMul|MatMulInteger"),
    "fp16+fused-attention": (["--fp16", "--fused-attention", "--gate", "fashion-mnist"], "Attention"),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant_model(request, tmp_path_factory):
    flags, _ = VARIANTS[request.param]
    out = tmp_path_factory.mktemp(request.param.replace("+", "-"))
    result = subprocess.run(
        [VIT_EXPORT, str(WEIGHTS_DIR), "--out", str(out), "--name", "fashion-mnist-vit-variant", *flags],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    print(result.stdout)
    return request.param, out


def test_the_variant_passes_its_gate_and_the_manifest_records_it(variant_model, expected_provider):
    variant, folder = variant_model
    manifest = Manifest.read(folder)
    gate = manifest.verification["variant_gate"]
    assert manifest.variant == gate["variant"] == variant and gate["passed"]
    assert gate["drop_points"] <= 0.5 and gate["top1_agreement"] >= 0.99
    assert gate["variant_accuracy"] >= 0.89
    assert gate["provider"] == expected_provider  # where the gate's session ran: CUDA when there is one
    ops = {node.op_type for node in onnx.load(str(folder / "model.onnx")).graph.node}
    assert ops & set(VARIANTS[variant][1].split("|")), ops
    if variant.startswith("fp16"):
        # LayerNorm and softmax stay fp32; the weights of the matrix products are half precision.
        graph = onnx.load(str(folder / "model.onnx")).graph
        assert {init.data_type for init in graph.initializer} >= {onnx.TensorProto.FLOAT16}
        pixels, tensors = graph.input
        assert pixels.type.tensor_type.elem_type == onnx.TensorProto.UINT8
        assert tensors.type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_the_server_reports_the_variant_and_classifies_with_it(variant_model, samples):
    variant, folder = variant_model
    with run_server(folder) as server, server.client() as client:
        (model,) = client.get("/v1/models").json()["models"]
        assert model["variant"] == variant and model["variant_gate"]["passed"]
        assert f'variant="{variant}"' in client.get("/metrics").text
        files = [("file", (f"{i}.png", s.encoded(), "image/png")) for i, s in enumerate(samples[:32])]
        results = client.post("/classify", files=files).json()["results"]
        correct = sum(r["predictions"][0]["label"] == s.label for r, s in zip(results, samples, strict=False))
        assert correct >= 26, correct  # the model scores 0.90; 32 images leave room for chance
        response = client.post("/classify?explain=true", files={"file": ("x.png", samples[0].encoded(), "image/png")})
        assert response.status_code == 200 and "attention" in response.json()["results"][0]
        assert server.stop() == 0


def test_fused_attention_writes_one_operator_per_block_and_matches_pytorch(tmp_path):
    result = subprocess.run(
        [VIT_EXPORT, str(WEIGHTS_DIR), "--out", str(tmp_path), "--fused-attention", "--no-explain"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    manifest = Manifest.read(tmp_path)
    ops = [node.op_type for node in onnx.load(str(tmp_path / "model.onnx")).graph.node]
    assert manifest.variant == "fp32+fused-attention"
    assert ops.count("Attention") == manifest.config["depth"] and "Softmax" not in ops
    # Held to the fp32 tolerance, like the plain graph.
    assert all(check["max_abs_diff"] <= 1e-4 for check in manifest.verification["batches"])
