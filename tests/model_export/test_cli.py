"""`vit-export`, run as users run it: the installed console script."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from model_export.manifest import Manifest
from model_export.onnx_export import VERIFY_BATCHES
from model_export.vit import VisionTransformer, ViTConfig

VIT_EXPORT = str(Path(sys.executable).parent / "vit-export")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([VIT_EXPORT, *map(str, args)], capture_output=True, text=True, timeout=300)


def test_random_init_preset_exports_and_reports_what_it_verified(tmp_path):
    result = _run("--random-init", "--preset", "vit_tiny_patch16_224", "--out", tmp_path / "ti")
    assert result.returncode == 0, result.stderr
    for batch, tensor_batch in VERIFY_BATCHES:
        assert (
            f"verified: {batch} uint8 images + {tensor_batch} normalised tensors: max |ORT - PyTorch|" in result.stdout
        )
    assert "onnx.checker passed" in result.stdout
    manifest = Manifest.read(tmp_path / "ti")
    assert (manifest.name, manifest.source.layout, manifest.config["embed_dim"]) == ("ti", "random-init", 192)


def test_a_checkpoint_with_a_labels_file_exports(tmp_path):
    torch.manual_seed(0)
    cfg = ViTConfig(img_size=32, patch_size=8, num_classes=3, embed_dim=64, depth=1, num_heads=1, mlp_dim=64)
    save_file(VisionTransformer(cfg).state_dict(), tmp_path / "w.safetensors")
    (tmp_path / "labels.json").write_text(json.dumps({"0": "cat", "1": "dog", "2": "owl"}))
    result = _run(
        tmp_path / "w.safetensors", "--labels", tmp_path / "labels.json", "--name", "pets", "--out", tmp_path / "o"
    )
    assert result.returncode == 0, result.stderr
    manifest = Manifest.read(tmp_path / "o")
    assert manifest.labels == ["cat", "dog", "owl"] and manifest.name == "pets"
    assert manifest.source.checkpoint == "w.safetensors" and len(manifest.source.sha256) == 64


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: [d / "missing.safetensors"], "checkpoint not found"),
        (lambda d: [], "give a checkpoint path"),
        (lambda d: ["--random-init"], "--random-init needs --preset"),
        (lambda d: [_write(d / "r.safetensors", {"conv.weight": torch.zeros(2)})], "unknown checkpoint layout"),
        (lambda d: [_write(d / "b.pt", None)], "refused by torch.load"),
        (lambda d: [_tiny(d), "--preset", "vit_base_patch16_224"], "does not match the preset"),
        (lambda d: [_tiny(d), "--img-size", "30"], "not a multiple of patch_size"),
        (lambda d: [_tiny(d), "--gate", "fashion-mnist"], "--gate applies to --int8 or --fp16"),
    ],
)
def test_bad_input_exits_non_zero_with_a_clear_message(tmp_path, setup, message):
    result = _run(*setup(tmp_path), "--out", tmp_path / "out")
    assert result.returncode == 1
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("vit-export: error:") and message in last_line
    assert "Traceback" not in result.stderr


def _write(path: Path, tensors: dict | None) -> Path:
    if tensors is None:
        path.write_bytes(b"\x80\x04K\x01.")  # a pickle of the int 1, not a state dict
    else:
        save_file(tensors, path)
    return path


def _tiny(directory: Path) -> Path:
    cfg = ViTConfig(img_size=32, patch_size=8, num_classes=2, embed_dim=64, depth=1, num_heads=1, mlp_dim=64)
    return _write(directory / "tiny.safetensors", VisionTransformer(cfg).state_dict())


def test_a_bare_weights_file_is_read_with_what_it_cannot_say_said(tmp_path):
    """Head count, activation, block order and pooling are not in a state dict: the export says
    what it assumed, and how to give the folder that records them."""
    result = _run(_tiny(tmp_path), "--out", tmp_path / "o")
    assert result.returncode == 0, result.stderr
    assert "note: a bare timm weights file does not record its head count, activation" in result.stderr
    assert "read as 1 head of 64, exact GELU, pre-norm blocks and a token head" in result.stderr


def test_a_model_without_a_class_token_exports_without_an_explain_graph_and_says_so(tmp_path):
    cfg = ViTConfig(
        img_size=32, patch_size=8, num_classes=2, embed_dim=64, depth=1, num_heads=1, mlp_dim=64,
        class_token=False, reg_tokens=2, no_embed_class=True, fc_norm=True, head="avg",
    )  # fmt: skip
    path = _write(tmp_path / "gap.safetensors", VisionTransformer(cfg).state_dict())
    result = _run(path, "--out", tmp_path / "o")
    assert result.returncode == 0, result.stderr
    assert "prefix tokens: register, register; embedding: the mean of the patch tokens" in result.stdout
    assert "no explain graph: the model has no [class] token" in result.stdout
    manifest = Manifest.read(tmp_path / "o")
    assert (manifest.head, manifest.pooling, manifest.prefix_tokens) == ("avg", "avg", ["register", "register"])
    assert manifest.explain_onnx_file is None and not (tmp_path / "o" / "model_explain.onnx").exists()
