"""Each layout against its own library: build there with random weights, save, import here, compare logits."""

import json

import pytest
import timm
import torch
import torchvision
import transformers
from safetensors.torch import save_file

from model_export.checkpoints import default_preprocessing, import_checkpoint
from model_export.vit import PRESETS

TOLERANCE = 1e-4


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random, so no zero-initialised head or token hides a mapping error."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * 0.05
            param.copy_(1.0 + noise if name.endswith("norm.weight") or ".ln" in name else noise * 2)


def _compare(reference: torch.nn.Module, checkpoint, images: torch.Tensor, **kwargs) -> None:
    imported = import_checkpoint(checkpoint, **kwargs)
    with torch.no_grad():
        expected = reference.eval()(images)
        expected = getattr(expected, "logits", expected)
        actual = imported.model(images)
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max().item() <= TOLERANCE
    return imported


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_checkpoint_gives_timms_logits(tmp_path, suffix):
    reference = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0, num_classes=7
    )
    _randomise(reference, seed=1)
    path = tmp_path / f"timm{suffix}"
    state = reference.state_dict()
    save_file(state, path) if suffix == ".safetensors" else torch.save({"state_dict": state}, path)
    imported = _compare(reference, path, torch.randn(3, 3, 32, 32), num_heads=4)
    assert imported.layout == "timm"


def test_timm_named_preset_imports_with_the_preset(tmp_path):
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10)
    _randomise(reference, seed=2)
    # torch.compile and DataParallel prefixes are stripped on the way in.
    torch.save({f"_orig_mod.module.{k}": v for k, v in reference.state_dict().items()}, tmp_path / "t.pt")
    _compare(reference, tmp_path / "t.pt", torch.randn(2, 3, 224, 224), base=PRESETS["vit_tiny_patch16_224"])


def test_torchvision_checkpoint_gives_torchvisions_logits(tmp_path):
    reference = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128, num_classes=6
    )
    _randomise(reference, seed=3)
    torch.save(reference.state_dict(), tmp_path / "tv.pth")
    imported = _compare(reference, tmp_path / "tv.pth", torch.randn(3, 3, 32, 32), num_heads=4)
    assert imported.layout == "torchvision"
    assert imported.preprocessing.interpolation == "bilinear"
    assert imported.preprocessing.mean == [0.485, 0.456, 0.406]


def _hf_reference(seed: int) -> transformers.ViTForImageClassification:
    config = transformers.ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        num_labels=3,
        id2label={0: "cat", 1: "dog", 2: "owl"},
        label2id={"cat": 0, "dog": 1, "owl": 2},
    )
    model = transformers.ViTForImageClassification(config)
    _randomise(model, seed)
    return model


def test_hugging_face_folder_gives_transformers_logits_and_labels(tmp_path):
    reference = _hf_reference(seed=4)
    reference.save_pretrained(tmp_path, safe_serialization=True)
    processor = {
        "size": {"height": 32, "width": 32},
        "resample": 3,
        "image_mean": [0.4, 0.5, 0.6],
        "image_std": [0.2] * 3,
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(processor))
    # Hugging Face's LayerNorm eps (1e-12) and head count come from config.json, not from shapes.
    imported = _compare(reference, tmp_path, torch.randn(3, 3, 32, 32))
    assert imported.layout == "hf"
    assert imported.labels == ["cat", "dog", "owl"]
    assert imported.model.cfg.layer_norm_eps == reference.config.layer_norm_eps
    prep = imported.preprocessing
    assert (prep.resize_mode, prep.interpolation, prep.mean) == ("squash", "bicubic", [0.4, 0.5, 0.6])


def test_hugging_face_bin_file_imports_too(tmp_path):
    reference = _hf_reference(seed=5)
    torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin")
    _compare(reference, tmp_path / "pytorch_model.bin", torch.randn(2, 3, 32, 32), num_heads=4)


def test_timm_checkpoint_served_at_a_larger_size_matches_timms_resampling(tmp_path):
    reference = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0, num_classes=4
    )
    _randomise(reference, seed=6)
    save_file(reference.state_dict(), tmp_path / "t.safetensors")
    imported = import_checkpoint(tmp_path / "t.safetensors", num_heads=4, img_size=48)
    assert imported.model.pos_embed.shape == (1, 1 + 36, 64)
    # timm resamples the same way (class row apart, bicubic on the grid) when asked for a new size.
    resized = timm.models.vision_transformer.VisionTransformer(
        img_size=48, patch_size=8, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0, num_classes=4
    )
    state = reference.state_dict()
    state["pos_embed"] = timm.layers.resample_abs_pos_embed(state["pos_embed"], (6, 6), num_prefix_tokens=1)
    resized.load_state_dict(state)
    images = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert torch.equal(imported.model.pos_embed[:, 0], reference.pos_embed[:, 0])
        diff = (imported.model(images) - resized.eval()(images)).abs().max().item()
    assert diff <= 1e-2  # both bicubic; timm's antialias default differs on upsampling only in rounding


def test_a_timm_folder_reads_the_head_count_its_architecture_defaults_to(tmp_path):
    """timm's save_for_hf records only the arguments given: ViT-H's 16 heads of 80 are the
    architecture's default, so they are read from the model timm builds for it (not 1280 / 64)."""
    reference = timm.create_model("deit3_huge_patch14_224", pretrained=False, depth=1, img_size=28, num_classes=3)
    _randomise(reference, seed=7)
    timm.models.save_for_hf(reference, tmp_path, safe_serialization=True, data_config={"input_size": (3, 28, 28)})
    assert "num_heads" not in json.loads((tmp_path / "config.json").read_text())["model_args"]
    imported = _compare(reference, tmp_path, torch.randn(2, 3, 28, 28))
    assert imported.model.cfg.num_heads == 16


def test_torchvision_vit_h_14_has_16_heads(tmp_path):
    reference = torchvision.models.VisionTransformer(
        image_size=28, patch_size=14, num_layers=1, num_heads=16, hidden_dim=1280, mlp_dim=5120, num_classes=3
    )
    _randomise(reference, seed=8)
    torch.save(reference.state_dict(), tmp_path / "h14.pth")
    assert _compare(reference, tmp_path / "h14.pth", torch.randn(2, 3, 28, 28)).model.cfg.num_heads == 16


# b_16's and l_16's SWAG linear probes at 224 share their shapes with IMAGENET1K_V1 and read as it.
_SHAPES_OF_V1 = {"ViT_B_16_Weights.IMAGENET1K_SWAG_LINEAR_V1", "ViT_L_16_Weights.IMAGENET1K_SWAG_LINEAR_V1"}


@pytest.mark.parametrize(
    ("weights", "width", "patch"),
    [
        (w, width, patch)
        for enum, width, patch in [
            (torchvision.models.ViT_B_16_Weights, 768, 16),
            (torchvision.models.ViT_B_32_Weights, 768, 32),
            (torchvision.models.ViT_L_16_Weights, 1024, 16),
            (torchvision.models.ViT_L_32_Weights, 1024, 32),
            (torchvision.models.ViT_H_14_Weights, 1280, 14),
        ]
        for w in enum
    ],
    ids=str,
)
def test_a_torchvision_file_gets_the_transforms_of_the_weights_its_shapes_name(weights, width, patch):
    (crop,) = weights.transforms().crop_size
    transforms = (type(weights).IMAGENET1K_V1 if str(weights) in _SHAPES_OF_V1 else weights).transforms()
    (resize,) = transforms.resize_size
    got = default_preprocessing("torchvision", crop, 3, (width, patch, crop))
    assert (got.image_size, got.resize_size, got.interpolation) == (crop, resize, transforms.interpolation.value)
    assert (got.mean, got.std) == (list(transforms.mean), list(transforms.std))
