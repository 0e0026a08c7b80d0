"""The [class]-token family against timm and transformers: distillation tokens, registers,
LayerScale, position tables without prefix rows, fc_norm, models without a class token, and the
DINOv2 head. Each layout is built in its library (tests/model_export/families.py), saved as the
library saves, imported, exported, and compared with the library's own logits, pre-head feature
and attention, in PyTorch and through the ONNX graph."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import timm
import torch
import transformers
from safetensors.torch import save_file

from model_export.checkpoints import CheckpointError, import_checkpoint
from model_export.manifest import (
    EXPLAIN_ONNX_FILE,
    EXPLAIN_OUTPUT_NAMES,
    OUTPUT_NAMES,
    PIXEL_VALUES_NAME,
    PIXELS_NAME,
    Manifest,
    Source,
)
from model_export.onnx_export import graph_description, normalise, write_artifact
from model_export.vit import VisionTransformer, ViTConfig
from tests.model_export.families import LAYOUTS, TOLERANCE, Member, randomise
from tests.model_export.test_default_model import WEIGHTS_DIR


@pytest.fixture(params=list(LAYOUTS))
def member(request: pytest.FixtureRequest, family) -> Member:
    return family(request.param)


def _inputs(member: Member, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three uint8 images and one already-normalised row, at the model's input size."""
    side = member.imported.model.cfg.img_size
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (3, side, side, 3), dtype=np.uint8)
    return pixels, rng.standard_normal((1, 3, side, side)).astype(np.float32)


def _library_input(member: Member, pixels: np.ndarray, tensors: np.ndarray) -> torch.Tensor:
    """What the library's model gets for the graph's rows: the pixels normalised outside any graph."""
    return torch.cat([normalise(torch.from_numpy(pixels), member.manifest.preprocessing), torch.from_numpy(tensors)])


def _session(member: Member, filename: str) -> ort.InferenceSession:
    return ort.InferenceSession(str(member.out / filename), providers=["CPUExecutionProvider"])


def test_imported_model_gives_the_librarys_logits(member):
    side = member.imported.model.cfg.img_size
    images = torch.randn(3, 3, side, side, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = member.imported.model(images)
    expected = member.logits(images)
    assert ours.shape == expected.shape
    assert (ours - expected).abs().max().item() <= TOLERANCE


def test_exported_graph_gives_the_librarys_logits_and_pre_head_feature(member):
    pixels, tensors = _inputs(member)
    logits, embedding = _session(member, "model.onnx").run(
        OUTPUT_NAMES, {PIXELS_NAME: pixels, PIXEL_VALUES_NAME: tensors}
    )
    x = _library_input(member, pixels, tensors)
    assert np.abs(logits - member.logits(x).numpy()).max() <= TOLERANCE
    # HF last_hidden_state[:, 0]; timm forward_features(x)[:, 0], or without a class token
    # forward_head(pre_logits=True).
    assert embedding.shape == (4, member.imported.model.cfg.embed_dim)
    assert np.abs(embedding - member.feature(x).numpy()).max() <= TOLERANCE


def test_the_manifest_records_the_prefix_tokens_the_head_and_the_embedding(member):
    manifest = Manifest.read(member.out)
    assert manifest == member.manifest
    assert manifest.prefix_tokens == member.prefix_tokens
    assert manifest.head == member.head
    assert manifest.pooling == ("avg" if member.head == "avg" else "token")
    has_class_token = "class" in member.prefix_tokens
    assert manifest.embedding.startswith("the [class] token" if has_class_token else "the mean of the patch tokens")
    # The recorded config rebuilds the same model, and the source says which library wrote it.
    assert ViTConfig(**manifest.config) == member.imported.model.cfg  # type: ignore[arg-type]
    assert manifest.source.layout == member.library


def _library_last_layer_attention(member: Member, x: torch.Tensor) -> torch.Tensor:
    """The library's own last-layer attention weights, (B, heads, P + N, P + N)."""
    reference = member.reference
    with torch.no_grad():
        if member.library == "hf":
            reference.set_attn_implementation("eager")  # sdpa returns no weights
            try:
                return reference(pixel_values=x, output_attentions=True).attentions[-1]
            finally:
                reference.set_attn_implementation("sdpa")
        attention = reference.blocks[-1].attn
        captured: list[torch.Tensor] = []
        # timm's unfused path softmaxes, then passes the weights through attn_drop: catch them there.
        hook = attention.attn_drop.register_forward_hook(lambda module, args, out: captured.append(out))
        attention.fused_attn = False
        try:
            reference(x)
        finally:
            attention.fused_attn = True
            hook.remove()
        return captured[0]


def test_explain_graph_splits_the_class_tokens_attention_between_prefix_rows_and_patches(member):
    if "class" not in member.prefix_tokens:
        assert member.manifest.explain_onnx_file is None and not (member.out / EXPLAIN_ONNX_FILE).exists()
        return
    pixels, tensors = _inputs(member, seed=2)
    session = _session(member, EXPLAIN_ONNX_FILE)
    assert [o.name for o in session.get_outputs()] == EXPLAIN_OUTPUT_NAMES
    logits, _, last_layer, rollout, prefix = session.run(None, {PIXELS_NAME: pixels, PIXEL_VALUES_NAME: tensors})
    grid = member.imported.model.cfg.grid_size
    assert last_layer.shape == rollout.shape == (4, grid, grid)
    assert prefix.shape == (4, len(member.prefix_tokens))
    x = _library_input(member, pixels, tensors)
    assert np.abs(logits - member.logits(x).numpy()).max() <= TOLERANCE
    row = _library_last_layer_attention(member, x).mean(dim=1)[:, 0].numpy()  # the class token's row, (B, P + N)
    count = len(member.prefix_tokens)
    patches = row[:, count:]
    assert np.abs(prefix - row[:, :count]).max() <= TOLERANCE  # each prefix row's share, in the library's order
    assert np.abs(last_layer.reshape(4, -1) - patches / patches.sum(1, keepdims=True)).max() <= TOLERANCE
    assert np.allclose(prefix.sum(1) + patches.sum(1), 1.0, atol=1e-5)
    assert np.allclose(rollout.sum(axis=(1, 2)), 1.0, atol=1e-5) and (rollout >= 0).all()


# --- refusals -----------------------------------------------------------------------------------


def _timm_file(tmp_path: Path, **kwargs: object) -> Path:
    model = timm.models.vision_transformer.VisionTransformer(
        **{"img_size": 32, "patch_size": 16, "embed_dim": 64, "depth": 1, "num_heads": 1, "num_classes": 3, **kwargs}
    )
    save_file(model.state_dict(), tmp_path / "t.safetensors")
    return tmp_path / "t.safetensors"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"global_pool": "map"}, "an attention-pooling head (timm global_pool='map')"),
        ({"qk_norm": True}, "query/key or attention-output norms"),
        ({"pre_norm": True}, "a norm before the first block"),
        ({"num_classes": 0}, "checkpoint has no classifier ('head.weight')"),
    ],
)
def test_unsupported_timm_layouts_are_refused_naming_what_is_missing(tmp_path, kwargs, message):
    with pytest.raises(CheckpointError, match="unsupported layout|no classifier") as error:
        import_checkpoint(_timm_file(tmp_path, **kwargs))
    assert message in str(error.value)


@pytest.mark.parametrize(
    ("architecture", "kwargs", "message"),
    [
        ("vit_base_patch16_rpn_224", {}, "is a VisionTransformer of ResPostBlocks, not pre-norm ViT blocks"),
        ("vit_base_patch32_siglip_gap_256", {}, "uses GELUTanh(); this ViT uses exact GELU"),
        ("vit_tiny_patch16_224", {"act_layer": "quick_gelu"}, "model_args act_layer='quick_gelu'"),
        ("vit_tiny_patch16_224", {"global_pool": "avg", "pool_include_prefix": True}, "pool_include_prefix=True"),
        ("vit_tiny_patch16_224", {"global_pool": ""}, "global_pool='' answers a row per token"),
    ],
)
def test_a_timm_folder_whose_model_differs_where_its_tensors_cannot_show_it_is_refused(
    tmp_path, architecture, kwargs, message
):
    """Post-norm blocks, another activation, a mean over the prefix tokens too, no pooling at all: the
    tensors are the same as this ViT's, so the folder's architecture and model_args must say it."""
    model = timm.create_model(architecture, pretrained=False, depth=1, img_size=32, num_classes=3, **kwargs)
    timm.models.save_for_hf(model, tmp_path, safe_serialization=True, data_config={"input_size": (3, 32, 32)})
    with pytest.raises(CheckpointError, match="unsupported layout") as refused:
        import_checkpoint(tmp_path)
    assert message in str(refused.value)


def test_a_timm_folder_needs_timm_to_read_its_architectures_defaults(tmp_path, monkeypatch):
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, img_size=32, num_classes=3)
    timm.models.save_for_hf(model, tmp_path, safe_serialization=True, data_config={"input_size": (3, 32, 32)})
    monkeypatch.setitem(sys.modules, "timm", None)  # not installed
    with pytest.raises(CheckpointError, match="install timm to import it"):
        import_checkpoint(tmp_path)


def _hf_folder(tmp_path: Path, image_size: object = 32, **processor: object) -> Path:
    config = transformers.ViTConfig(
        image_size=image_size, patch_size=16, hidden_size=64, num_hidden_layers=1, num_attention_heads=1, num_labels=2
    )
    transformers.ViTForImageClassification(config).save_pretrained(tmp_path)
    processor = {"do_resize": True, "do_normalize": True, **processor}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(processor))
    return tmp_path


@pytest.mark.parametrize(
    ("processor", "message"),
    [
        # transformers reads a bare int as the shorter side for these, as a square for ViT's and DeiT's.
        ({"image_processor_type": "BitImageProcessor", "size": 32}, "a bare int means the shorter side or a square"),
        ({"size": {"shortest_edge": 32, "longest_edge": 48}}, "only a shortest_edge alone is reproduced"),
        ({"size": {"longest_edge": 32}}, "is not a {height, width} size"),
        ({"size": {"height": 32, "width": 32}, "resample": 4}, "resample 4 is not supported"),  # BOX
    ],
)
def test_a_hugging_face_processor_this_service_would_not_reproduce_is_refused(tmp_path, processor, message):
    with pytest.raises(CheckpointError) as refused:
        import_checkpoint(_hf_folder(tmp_path, **processor))
    assert message in str(refused.value)


def test_a_hugging_face_image_size_may_be_a_square_pair_but_not_an_oblong_one(tmp_path):
    square = import_checkpoint(_hf_folder(tmp_path / "square", image_size=[32, 32], size={"height": 32, "width": 32}))
    assert square.preprocessing.image_size == 32
    with pytest.raises(CheckpointError, match="square"):  # a 2x3 grid of patches
        import_checkpoint(_hf_folder(tmp_path / "oblong", image_size=[32, 48], size={"height": 32, "width": 32}))


def test_unsupported_hugging_face_layouts_are_refused_naming_what_is_missing(tmp_path):
    shape = {"image_size": 28, "patch_size": 14, "hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 1}
    swiglu = transformers.Dinov2Config(**shape, num_labels=2, use_swiglu_ffn=True)
    transformers.Dinov2ForImageClassification(swiglu).save_pretrained(tmp_path / "swiglu")
    with pytest.raises(CheckpointError, match="unsupported layout: .*SwiGLU"):
        import_checkpoint(tmp_path / "swiglu")
    # A feature extractor without a classifier.
    transformers.Dinov2Model(transformers.Dinov2Config(**shape)).save_pretrained(tmp_path / "backbone")
    with pytest.raises(CheckpointError, match="no classifier"):
        import_checkpoint(tmp_path / "backbone")


# --- variants and the gate on the new layouts -----------------------------------------------------


def _default_model_as(**layout: object) -> VisionTransformer:
    """The trained default model rewritten into a new layout, its function kept or nearly so:
    LayerScale gains of 1 and the class token's position row folded into the token change
    nothing; a distillation token copied from the class token with a copy of the head, and zero
    registers, change the attention a little (0.8937 top-1 instead of 0.9022)."""
    imported = import_checkpoint(WEIGHTS_DIR)
    state, cfg = imported.model.state_dict(), replace(imported.model.cfg, **layout)  # type: ignore[arg-type]
    model = VisionTransformer(cfg).eval()
    d, pos = cfg.embed_dim, state["pos_embed"]
    new = {k: v for k, v in state.items() if k in model.state_dict() and model.state_dict()[k].shape == v.shape}
    new.update({f"blocks.{i}.ls{j}.gamma": torch.ones(d) for i in range(cfg.depth) for j in (1, 2)})
    new["cls_token"] = state["cls_token"] + pos[:, :1]
    new.update(dist_token=new["cls_token"].clone(), reg_token=torch.zeros(1, cfg.reg_tokens, d), pos_embed=pos[:, 1:])
    new.update({"head_dist.weight": state["head.weight"], "head_dist.bias": state["head.bias"]})
    model.load_state_dict({k: new[k] for k in model.state_dict()}, strict=True)
    return model


def _manifest(model: VisionTransformer) -> Manifest:
    imported = import_checkpoint(WEIGHTS_DIR)
    return Manifest(
        name="fashion-mnist-token-family",
        labels=imported.labels,
        preprocessing=imported.preprocessing,
        **graph_description(model.cfg),  # type: ignore[arg-type]
        opset=17,
        config=model.cfg.to_dict(),
        source=Source(checkpoint="weights.safetensors", layout="native", sha256=None),
    )


def test_int8_fused_attention_variant_of_a_distilled_registers_layerscale_model_passes_the_gate(tmp_path):
    model = _default_model_as(
        distillation_token=True, reg_tokens=4, layer_scale=True, no_embed_class=True, head="distilled"
    )
    manifest = write_artifact(
        model, tmp_path, _manifest(model), explain=False, precision="int8", fused_attention=True, gate="fashion-mnist"
    )
    gate = manifest.verification["variant_gate"]
    assert manifest.variant == gate["variant"] == "int8+fused-attention" and gate["passed"]
    assert gate["fp32_accuracy"] >= 0.89 and gate["top1_agreement"] >= 0.99
    assert manifest.prefix_tokens == ["class", "distillation", *["register"] * 4]
    ops = [node.op_type for node in onnx.load(str(tmp_path / "model.onnx")).graph.node]
    assert ops.count("QAttention") + ops.count("Attention") == model.cfg.depth


@pytest.mark.parametrize(
    "layout",
    [
        {"layer_scale": True, "head": "token+patch_mean"},
        {
            "class_token": False,
            "reg_tokens": 4,
            "layer_scale": True,
            "no_embed_class": True,
            "fc_norm": True,
            "head": "avg",
        },
    ],
    ids=["dinov2-head", "registers-no-class-token"],
)
def test_fp16_fused_attention_variant_of_the_other_layouts_exports_and_stays_close(tmp_path, layout):
    torch.manual_seed(0)
    fashion = ViTConfig(28, 4, 1, num_classes=10, embed_dim=64, depth=2, num_heads=4, mlp_dim=256)
    model = VisionTransformer(replace(fashion, **layout)).eval()
    randomise(model, seed=5)
    fused = write_artifact(model, tmp_path / "fused", _manifest(model), explain=False, fused_attention=True)
    # The fused operator is held to the fp32 tolerance, LayerScale and prefix rows included.
    assert all(check["max_abs_diff"] <= TOLERANCE for check in fused.verification["batches"])
    ops = [node.op_type for node in onnx.load(str(tmp_path / "fused" / "model.onnx")).graph.node]
    assert ops.count("Attention") == 2 and "Softmax" not in ops
    half = write_artifact(model, tmp_path / "fp16", _manifest(model), precision="fp16", fused_attention=True)
    assert half.variant == "fp16+fused-attention"
    assert all(check["max_abs_diff"] <= 2e-2 for check in half.verification["variant_batches"])
    assert (half.explain_onnx_file is None) == (not model.cfg.class_token)
