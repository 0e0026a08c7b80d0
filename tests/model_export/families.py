"""The [class]-token family, each member built in its own library with random weights, saved the
way that library saves, imported here and exported once per test session.

Sizes are real models' shapes cut down (depth 2, width 128 or 192 at 64 dimensions per head),
so each build, import and export takes seconds on two cores.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
import transformers
from safetensors.torch import save_file
from timm.models._hub import save_for_hf

from model_export.checkpoints import ImportedCheckpoint, import_checkpoint
from model_export.manifest import Manifest, Source
from model_export.onnx_export import graph_description, write_artifact

TOLERANCE = 1e-4


def randomise(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random, so that no zero-initialised head, token or LayerScale hides a mapping
    error: weights at 1/sqrt(fan-in), so every activation stays near unit scale and every token,
    position row and LayerScale gain moves the logits well past the tolerance."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            owner = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
            if isinstance(owner, torch.nn.LayerNorm):
                param.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * noise)
            elif isinstance(owner, torch.nn.Linear | torch.nn.Conv2d) and name.endswith("weight"):
                param.copy_(noise / param[0].numel() ** 0.5)
            elif name.endswith("bias"):
                param.copy_(0.1 * noise)
            else:  # tokens, position tables, LayerScale gains
                param.copy_(0.5 * noise)


@dataclass
class Member:
    """One layout: the library's model, what it saved, our import of it and the exported folder."""

    name: str
    library: str  # "timm" or "hf"
    reference: torch.nn.Module
    saved: Path  # the file or folder the library wrote
    prefix_tokens: list[str]  # what the manifest must record
    head: str
    imported: ImportedCheckpoint = field(init=False)
    out: Path = field(init=False)
    manifest: Manifest = field(init=False)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = self.reference(x)
        return getattr(out, "logits", out)

    def feature(self, x: torch.Tensor) -> torch.Tensor:
        """The library's own pre-head vector: the final [class] token, or the pooled vector without one."""
        with torch.no_grad():
            if self.library == "hf":
                base = getattr(self.reference, self.reference.base_model_prefix)
                return base(pixel_values=x).last_hidden_state[:, 0]  # after the final layernorm
            features = self.reference.forward_features(x)
            if self.reference.has_class_token:
                return features[:, 0]
            return self.reference.forward_head(features, pre_logits=True)


def _hf_labels(num: int) -> dict[str, object]:
    names = ["tabby", "heron", "kettle", "rocket", "espresso", "astronaut", "teapot"][:num]
    return {"id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}, "num_labels": num}


def _timm(
    name: str, seed: int, save: str, tmp: Path, data_config: dict[str, object] | None = None, **kwargs: object
) -> tuple[torch.nn.Module, Path]:
    model = timm.create_model(name, pretrained=False, depth=2, **kwargs).eval()
    randomise(model, seed)
    if save == "folder":  # timm's Hub layout: config.json (pretrained_cfg, model_args) + model.safetensors
        save_for_hf(model, tmp, safe_serialization=True, data_config=data_config)
        return model, tmp
    path = tmp / f"{name}{save}"
    save_file(model.state_dict(), path) if save == ".safetensors" else torch.save(model.state_dict(), path)
    return model, path


def _hf(
    model_class: type, config: transformers.PretrainedConfig, processor: object, seed: int, tmp: Path
) -> tuple[torch.nn.Module, Path]:
    model = model_class(config).eval()
    randomise(model, seed)
    model.save_pretrained(tmp, safe_serialization=True)
    processor.save_pretrained(tmp)  # type: ignore[attr-defined]
    return model, tmp


def _build_timm_deit_distilled(tmp: Path) -> tuple[torch.nn.Module, Path]:
    # deit_tiny_distilled_patch16_224: class and distillation tokens, two heads averaged.
    return _timm("deit_tiny_distilled_patch16_224", 11, "folder", tmp, num_classes=7)


def _build_timm_reg4_dinov2(tmp: Path) -> tuple[torch.nn.Module, Path]:
    # DINOv2 with 4 registers: LayerScale, no position rows for the prefix tokens, patch 14.
    return _timm(
        "vit_small_patch14_reg4_dinov2", 12, ".safetensors", tmp, img_size=56, embed_dim=128, num_heads=2, num_classes=5
    )


def _build_timm_dinov2(tmp: Path) -> tuple[torch.nn.Module, Path]:
    # DINOv2 without registers: LayerScale, patch 14, a position row for the class token.
    return _timm("vit_small_patch14_dinov2", 17, ".pth", tmp, img_size=42, embed_dim=128, num_heads=2, num_classes=3)


def _build_timm_deit3(tmp: Path) -> tuple[torch.nn.Module, Path]:
    # DeiT III: LayerScale and no_embed_class, one class token, a token head; saved with torch.save.
    return _timm("deit3_small_patch16_224", 13, ".pth", tmp, img_size=64, embed_dim=128, num_heads=2, num_classes=6)


def _build_timm_reg4_gap(tmp: Path) -> tuple[torch.nn.Module, Path]:
    # No class token: 4 registers, global average pooling with fc_norm, LayerScale. timm's own
    # crop_pct for it, 0.95, resizes to 235 and leaves an odd margin of 11 around the 224 crop.
    data_config = {"input_size": (3, 224, 224), "crop_pct": 0.95}
    return _timm(
        "vit_medium_patch16_reg4_gap_256",
        14,
        "folder",
        tmp,
        data_config=data_config,
        img_size=224,
        embed_dim=128,
        num_heads=2,
        num_classes=6,
    )


def _build_timm_gap(tmp: Path) -> tuple[torch.nn.Module, Path]:
    # No class token and no other prefix: the final norm on every token, then the patch mean.
    return _timm(
        "vit_medium_patch16_gap_256", 15, ".safetensors", tmp, img_size=64, embed_dim=128, num_heads=2, num_classes=4
    )


def _build_timm_avg_fc_norm(tmp: Path) -> tuple[torch.nn.Module, Path]:
    # A class token, but the head pools the patches and normalises after pooling (timm fc_norm).
    return _timm("vit_tiny_patch16_224", 16, ".safetensors", tmp, img_size=32, global_pool="avg", num_classes=5)


def _build_hf_deit(tmp: Path) -> tuple[torch.nn.Module, Path]:
    # DeiTForImageClassification: the distillation token is in the sequence, the head reads x[:, 0] only.
    config = transformers.DeiTConfig(
        image_size=64, patch_size=16, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=512, **_hf_labels(5),
    )  # fmt: skip
    processor = transformers.DeiTImageProcessor(size={"height": 72, "width": 72}, crop_size={"height": 64, "width": 64})
    return _hf(transformers.DeiTForImageClassification, config, processor, 21, tmp)


def _build_hf_deit_teacher(tmp: Path) -> tuple[torch.nn.Module, Path]:
    # DeiTForImageClassificationWithTeacher at the Hub models' 224 and processor (256 squash, crop 224).
    config = transformers.DeiTConfig(
        image_size=224, patch_size=16, hidden_size=192, num_hidden_layers=2, num_attention_heads=3,
        intermediate_size=768, **_hf_labels(7),
    )  # fmt: skip
    return _hf(transformers.DeiTForImageClassificationWithTeacher, config, transformers.DeiTImageProcessor(), 22, tmp)


def _dinov2_processor(shortest_edge: int, crop: int) -> object:
    # facebook/dinov2-*-imagenet1k-1-layer's processor: shorter side, centre crop, ImageNet statistics.
    return transformers.BitImageProcessor(
        size={"shortest_edge": shortest_edge},
        crop_size={"height": crop, "width": crop},
        resample=3,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )


def _build_hf_dinov2(tmp: Path) -> tuple[torch.nn.Module, Path]:
    # Dinov2ForImageClassification: LayerScale, patch 14, a head on concat([class], patch mean).
    # Trained at 98 px (a 7x7 grid), served at the processor's 56: transformers resamples the
    # position table on every call; the import resamples it once, the same way.
    config = transformers.Dinov2Config(
        image_size=98, patch_size=14, hidden_size=128, num_hidden_layers=2, num_attention_heads=2, **_hf_labels(4)
    )
    return _hf(transformers.Dinov2ForImageClassification, config, _dinov2_processor(64, 56), 23, tmp)


def _build_hf_dinov2_registers(tmp: Path) -> tuple[torch.nn.Module, Path]:
    # Dinov2WithRegistersForImageClassification: 4 registers without position rows, the class
    # token with one; trained at 112 px, served at 224 as its processor crops.
    config = transformers.Dinov2WithRegistersConfig(
        image_size=112, patch_size=14, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_register_tokens=4, **_hf_labels(6),
    )  # fmt: skip
    return _hf(transformers.Dinov2WithRegistersForImageClassification, config, _dinov2_processor(256, 224), 24, tmp)


REGISTERS = ["register"] * 4
# name -> (library, builder, the manifest's prefix_tokens, the manifest's head)
LAYOUTS: dict[str, tuple[str, Callable[[Path], tuple[torch.nn.Module, Path]], list[str], str]] = {
    "timm-deit-distilled": ("timm", _build_timm_deit_distilled, ["class", "distillation"], "distilled"),
    "timm-reg4-dinov2": ("timm", _build_timm_reg4_dinov2, ["class", *REGISTERS], "token"),
    "timm-dinov2": ("timm", _build_timm_dinov2, ["class"], "token"),
    "timm-deit3": ("timm", _build_timm_deit3, ["class"], "token"),
    "timm-reg4-gap": ("timm", _build_timm_reg4_gap, REGISTERS, "avg"),
    "timm-gap": ("timm", _build_timm_gap, [], "avg"),
    "timm-avg-fc-norm": ("timm", _build_timm_avg_fc_norm, ["class"], "avg"),
    "hf-deit": ("hf", _build_hf_deit, ["class", "distillation"], "token"),
    "hf-deit-teacher": ("hf", _build_hf_deit_teacher, ["class", "distillation"], "distilled"),
    "hf-dinov2": ("hf", _build_hf_dinov2, ["class"], "token+patch_mean"),
    "hf-dinov2-registers": ("hf", _build_hf_dinov2_registers, ["class", *REGISTERS], "token+patch_mean"),
}


def build(name: str, tmp: Path) -> Member:
    """Build the library's model, save it, import the saved copy and export it with its explain graph."""
    library, builder, prefix_tokens, head = LAYOUTS[name]
    saved_dir = tmp / "saved"
    saved_dir.mkdir()
    reference, saved = builder(saved_dir)
    member = Member(name, library, reference, saved, prefix_tokens, head)
    member.imported = import_checkpoint(saved)
    member.out = tmp / "export"
    cfg = member.imported.model.cfg
    manifest = Manifest(
        name=name,
        labels=member.imported.labels,
        preprocessing=member.imported.preprocessing,
        **graph_description(cfg),  # type: ignore[arg-type]
        opset=17,
        config=cfg.to_dict(),
        source=Source(checkpoint=saved.name, layout=member.imported.layout, sha256=member.imported.sha256),
    )
    member.manifest = write_artifact(member.imported.model, member.out, manifest)
    return member
