"""Import timm, torchvision and Hugging Face ViT checkpoints into `VisionTransformer`.

Each layout is a pure function `(state_dict, cfg) -> state_dict` in our (timm-like) names.
Files are read with safetensors or `torch.load(weights_only=True)`; nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import torch

from model_export.manifest import Head, Interpolation, Preprocessing
from model_export.vit import VisionTransformer, ViTConfig, resample_pos_embed

StateDict = dict[str, torch.Tensor]
Json = dict[str, Any]  # a config file as json.loads reads it
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message says which key and why."""


@dataclass
class ImportedCheckpoint:
    model: VisionTransformer
    layout: str
    labels: list[str]
    preprocessing: Preprocessing
    source: Path  # the weights file actually read
    sha256: str  # of that file


# --- reading files -------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_state_dict(path: Path) -> StateDict:
    """Tensors from a .safetensors or a weights-only torch file, wrapper prefixes stripped."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            raw: object = load_file(str(path))
        except Exception as exc:  # safetensors raises several unrelated types for bad files
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    elif path.suffix in (".pt", ".pth", ".bin"):
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # the weights-only unpickler refuses anything but tensors and containers
            raise CheckpointError(f"{path}: refused by torch.load(weights_only=True): {exc}") from exc
    else:
        raise CheckpointError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(WEIGHT_SUFFIXES)}")
    # Training scripts often save {"model": sd, "optimizer": ...} or {"state_dict": sd}.
    while isinstance(raw, Mapping) and not any(isinstance(v, torch.Tensor) for v in raw.values()):
        nested = [raw[k] for k in ("state_dict", "model", "model_state_dict", "module") if k in raw]
        if not nested:
            raise CheckpointError(f"{path}: no tensors found (top-level keys: {sorted(raw)[:10]})")
        raw = nested[0]
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"{path}: expected a mapping of tensors, found {type(raw).__name__}")
    return strip_wrapper_prefixes({k: v for k, v in raw.items() if isinstance(v, torch.Tensor)})


def strip_wrapper_prefixes(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Remove DataParallel's `module.` and torch.compile's `_orig_mod.`, however nested."""
    out = {}
    for key, value in sd.items():
        while key.startswith(WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


# --- layouts -------------------------------------------------------------------------------

# The base-model prefixes of Hugging Face classifiers (ViT, DeiT, DINOv2, DINOv2 with registers).
HF_BASE_PREFIXES = ("vit.", "deit.", "dinov2.", "dinov2_with_registers.")

# Keys of features this model does not have, and what to call them when refusing the checkpoint.
UNSUPPORTED_KEYS: dict[str, str] = {
    r"^attn_pool\.": "an attention-pooling head (timm global_pool='map')",
    r"^norm_pre\.": "a norm before the first block (timm pre_norm, as in CLIP)",
    r"^patch_embed\.norm\.": "a norm inside the patch embedding",
    r"\.attn\.(?:q_norm|k_norm|norm)\.": "query/key or attention-output norms (timm qk_norm, scale_attn_norm)",
    # SwiGLU: timm (w12/w3, fc1_g/fc1_x); DINOv2 files (weights_in/out) and transformers 5.x (gate/up/down_proj).
    r"\.mlp\.(?:norm|w12|w3|fc1_[gx]|weights_(?:in|out)|(?:gate|up|down)_proj)\.": "a SwiGLU or normed MLP",
    r"^head\.(?:fc|norm|pre_logits)\.": "a multi-layer head",
    r"^pooler\.": "Hugging Face's tanh pooler (a base model, not a classifier)",
}


def detect_layout(sd: Mapping[str, torch.Tensor]) -> str:
    if "pos_embed" in sd and ("patch_embed.proj.weight" in sd or "patch_embed.weight" in sd):
        return "timm"
    if "class_token" in sd and "encoder.pos_embedding" in sd:
        return "torchvision"
    if any(_strip_hf_base(key) == "embeddings.cls_token" for key in sd):
        return "hf"
    raise CheckpointError(
        "unknown checkpoint layout: expected timm (pos_embed, patch_embed.proj), torchvision (class_token, "
        "encoder.pos_embedding) or Hugging Face (vit./deit./dinov2.embeddings.cls_token) keys; "
        f"first keys: {list(sd)[:5]}"
    )


def _rename(sd: Mapping[str, torch.Tensor], rules: list[tuple[str, str]]) -> StateDict:
    """Apply the first matching regex rule to each key; keys no rule matches pass through unchanged."""
    out = {}
    for key, value in sd.items():
        for pattern, replacement in rules:
            new, hits = re.subn(pattern, replacement, key)
            if hits:
                key = new
                break
        out[key] = value
    return out


def from_timm(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """timm's names are ours but for the patch conv; DeiT III's original files name LayerScale gamma_1/2."""
    return _rename(
        sd,
        [(r"^patch_embed\.proj\.", "patch_embed."), (r"^blocks\.(\d+)\.gamma_([12])$", r"blocks.\1.ls\2.gamma")],
    )


def from_torchvision(sd: Mapping[str, torch.Tensor]) -> StateDict:
    block = r"^encoder\.layers\.encoder_layer_(\d+)\."
    return _rename(
        sd,
        [
            (r"^class_token$", "cls_token"),
            (r"^encoder\.pos_embedding$", "pos_embed"),
            (r"^conv_proj\.", "patch_embed."),
            (block + r"ln_1\.", r"blocks.\1.norm1."),
            (block + r"ln_2\.", r"blocks.\1.norm2."),
            (block + r"self_attention\.in_proj_(weight|bias)$", r"blocks.\1.attn.qkv.\2"),
            (block + r"self_attention\.out_proj\.", r"blocks.\1.attn.proj."),
            (block + r"mlp\.(0|linear_1)\.", r"blocks.\1.mlp.fc1."),
            (block + r"mlp\.(3|linear_2)\.", r"blocks.\1.mlp.fc2."),
            (r"^encoder\.ln\.", "norm."),
            (r"^heads\.head\.", "head."),
        ],
    )


def from_hf(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """ViT, DeiT (with or without teacher), DINOv2 and DINOv2-with-registers classifiers.

    Hub files use transformers 4.x names (`encoder.layer.N.attention.attention.query`); a 5.x
    model's in-memory state_dict uses `layers.N.attention.q_proj`. Both are accepted."""
    sd = {_strip_hf_base(k): v for k, v in sd.items()}
    sd.pop("embeddings.mask_token", None)  # DINOv2's masked-image-modelling token: never read at inference
    block = r"^(?:encoder\.layer|layers)\.(\d+)\."
    out = _rename(
        sd,
        [
            (r"^embeddings\.cls_token$", "cls_token"),
            (r"^embeddings\.distillation_token$", "dist_token"),
            (r"^embeddings\.register_tokens$", "reg_token"),
            (r"^embeddings\.position_embeddings$", "pos_embed"),
            (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed."),
            (block + r"(?:layernorm_before|norm1)\.", r"blocks.\1.norm1."),
            (block + r"(?:layernorm_after|norm2)\.", r"blocks.\1.norm2."),
            (block + r"layer_scale([12])\.lambda1$", r"blocks.\1.ls\2.gamma"),
            (block + r"attention\.(?:output\.dense|o_proj)\.", r"blocks.\1.attn.proj."),
            (block + r"(?:intermediate\.dense|mlp\.fc1)\.", r"blocks.\1.mlp.fc1."),
            (block + r"(?:output\.dense|mlp\.fc2)\.", r"blocks.\1.mlp.fc2."),
            (block + r"attention\.(?:attention\.(query|key|value)|(q|k|v)_proj)\.", r"blocks.\1.attn.\2\3."),
            (r"^layernorm\.", "norm."),
            (r"^(?:classifier|cls_classifier)\.", "head."),
            (r"^distillation_classifier\.", "head_dist."),
        ],
    )
    # Hugging Face keeps query, key and value apart; our block fuses them as [q; k; v] rows.
    separate = re.compile(r"^blocks\.(\d+)\.attn\.(query|key|value|q|k|v)\.(weight|bias)$")
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key in [k for k in out if separate.match(k)]:
        index, which, kind = separate.match(key).groups()  # type: ignore[union-attr]
        parts.setdefault((index, kind), {})[which[0]] = out.pop(key)
    for (index, kind), qkv in parts.items():
        if set(qkv) != {"q", "k", "v"}:
            raise CheckpointError(f"block {index}: attention {kind} has only {sorted(qkv)} of q, k, v")
        out[f"blocks.{index}.attn.qkv.{kind}"] = torch.cat([qkv["q"], qkv["k"], qkv["v"]], dim=0)
    if "reg_token" in out and "cls_token" in out and "pos_embed" in out:
        # DINOv2 with registers: the table has a row for the class token and none for the
        # registers. Adding that row to the token itself (as timm does) leaves a table of
        # patch rows only: the same sums, and one rule for every prefix token.
        out["cls_token"] = out["cls_token"] + out["pos_embed"][:, :1]
        out["pos_embed"] = out["pos_embed"][:, 1:]
    return out


def _strip_hf_base(key: str) -> str:
    for prefix in HF_BASE_PREFIXES:
        if key.startswith(prefix):
            return key.removeprefix(prefix)
    return key


CONVERTERS: dict[str, Callable[[Mapping[str, torch.Tensor]], StateDict]] = {
    "timm": from_timm,
    "torchvision": from_torchvision,
    "hf": from_hf,
    "native": from_timm,  # our parameter names are timm's, patch embedding aside
}


# --- configuration and loading ---------------------------------------------------------------


def refuse_unsupported(sd: Mapping[str, torch.Tensor]) -> None:
    """Name the first feature this model lacks, instead of a list of unexpected keys."""
    for pattern, feature in UNSUPPORTED_KEYS.items():
        keys = [k for k in sd if re.search(pattern, k)]
        if keys:
            raise CheckpointError(
                f"unsupported layout: the checkpoint has {feature}, which this ViT lacks (keys {keys[:3]})"
            )


def _is_square(n: int) -> bool:
    return n > 0 and math.isqrt(n) ** 2 == n


def _table_covers_prefix(rows: int, prefix: int, hint: bool | None) -> bool:
    """Whether a position table of `rows` rows has rows for the `prefix` tokens too (timm no_embed_class=False)."""
    if prefix == 0:
        return True  # nothing to cover: the two conventions coincide
    covers, patches_only = _is_square(rows - prefix), _is_square(rows)
    if covers and patches_only:
        if hint is None:
            raise CheckpointError(
                f"pos_embed has {rows} rows: both a {math.isqrt(rows)}^2 grid and a {math.isqrt(rows - prefix)}^2 "
                f"grid plus {prefix} prefix rows; say which with a timm config.json (model_args.no_embed_class)"
            )
        return hint
    if not (covers or patches_only):
        raise CheckpointError(
            f"pos_embed has {rows} rows: neither a square grid of patches nor one plus the {prefix} prefix tokens"
        )
    return covers


def infer_shapes(sd: Mapping[str, torch.Tensor], no_embed_class: bool | None = None) -> Json:
    """ViTConfig fields that the tensors' shapes determine (all but heads and eps).

    The head kind follows from the head's tensors (`head_dist`: distilled; a (C, 2D) head:
    DINOv2's token+patch_mean); a model without a class token pools the patches, and so does
    one with `fc_norm` (timm puts the norm after the pooling only with global average pooling)."""
    try:
        patch_w = sd["patch_embed.weight"]
        pos_rows = sd["pos_embed"].shape[1]
        mlp = sd["blocks.0.mlp.fc1.weight"]
    except KeyError as exc:
        raise CheckpointError(f"checkpoint lacks {exc.args[0]!r}, which is needed to infer the model shape") from None
    if "head.weight" not in sd:
        raise CheckpointError("checkpoint has no classifier ('head.weight'): a backbone without a head cannot classify")
    d, head = patch_w.shape[0], sd["head.weight"]
    class_token, distillation_token = "cls_token" in sd, "dist_token" in sd
    reg_tokens = sd["reg_token"].shape[1] if "reg_token" in sd else 0
    prefix = int(class_token) + int(distillation_token) + reg_tokens
    covers = _table_covers_prefix(pos_rows, prefix, None if no_embed_class is None else not no_embed_class)
    grid = math.isqrt(pos_rows - prefix if covers else pos_rows)
    fc_norm = "fc_norm.weight" in sd
    if "head_dist.weight" in sd:
        head_kind = "distilled"
    elif head.shape[1] == 2 * d:
        head_kind = "token+patch_mean"
    elif not class_token or fc_norm:
        head_kind = "avg"
    else:
        head_kind = "token"
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"^blocks\.(\d+)\.", k)))
    return {
        "img_size": grid * patch_w.shape[-1],
        "patch_size": patch_w.shape[-1],
        "in_chans": patch_w.shape[1],
        "num_classes": head.shape[0],
        "embed_dim": d,
        "depth": depth,
        "mlp_dim": mlp.shape[0],
        "qkv_bias": "blocks.0.attn.qkv.bias" in sd,
        "class_token": class_token,
        "distillation_token": distillation_token,
        "reg_tokens": reg_tokens,
        "no_embed_class": not covers and prefix > 0,
        "layer_scale": "blocks.0.ls1.gamma" in sd,
        "fc_norm": fc_norm,
        "head": head_kind,
    }


def load_strict(model: VisionTransformer, sd: Mapping[str, torch.Tensor], antialias: bool = True) -> None:
    """Load every tensor or fail naming the key(s); position embeddings are resampled to the
    model's grid (antialias as the checkpoint's library does it)."""
    sd = dict(sd)
    if "pos_embed" in sd and sd["pos_embed"].shape != model.pos_embed.shape:
        sd["pos_embed"] = resample_pos_embed(
            sd["pos_embed"], model.cfg.grid_size, model.cfg.pos_embed_prefix_rows, antialias=antialias
        )
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint does not fit the model: missing keys {missing}, unexpected keys {unexpected}"
        )
    for key, tensor in expected.items():
        if sd[key].shape != tensor.shape:
            raise CheckpointError(
                f"shape mismatch for {key}: checkpoint has {tuple(sd[key].shape)}, model expects {tuple(tensor.shape)}"
            )
    model.load_state_dict(sd, strict=True)


# --- whole checkpoints ---------------------------------------------------------------------

_PIL_RESAMPLE: dict[int, Interpolation] = {0: "nearest", 2: "bilinear", 3: "bicubic", 1: "lanczos"}
TRAINING_RECORD = "training_record.json"
# timm's defaults where a pretrained_cfg leaves a field out (timm.data.constants).
TIMM_DEFAULT_CROP_PCT = 0.875
TIMM_DEFAULT_MEAN, TIMM_DEFAULT_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@dataclass
class _Source:
    """The weights file and what lies beside it: which library wrote the folder, and its settings."""

    weights: Path
    kind: str  # "file" (weights alone), "native" (our training output), "hf" or "timm" (a model folder)
    config: Json  # HF or timm config.json, or our training record
    processor: Json  # HF preprocessor_config.json


def _open(path: Path) -> _Source:
    if not path.is_dir():
        return _Source(path, "file", {}, {})
    if (path / TRAINING_RECORD).is_file():
        weights = path / "weights.safetensors"
        if not weights.is_file():
            raise CheckpointError(f"{path}: {TRAINING_RECORD} found but no weights.safetensors beside it")
        return _Source(weights, "native", json.loads((path / TRAINING_RECORD).read_text()), {})
    config_path = path / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{path} is a directory but has no config.json (expected a Hugging Face model folder)")
    found = next((path / name for name in HF_WEIGHT_FILES if (path / name).is_file()), None)
    if found is None:
        raise CheckpointError(f"{path}: none of {', '.join(HF_WEIGHT_FILES)} found beside config.json")
    config = json.loads(config_path.read_text())
    if "architecture" in config and "pretrained_cfg" in config:  # timm's save_for_hf / Hub layout
        return _Source(found, "timm", config, {})
    processor_path = path / "preprocessor_config.json"
    processor = json.loads(processor_path.read_text()) if processor_path.is_file() else {}
    return _Source(found, "hf", config, processor)


def _native_config(record: Json) -> Json:
    config = dict(record["config"])
    if "pool" in config:  # records written before the head kinds had their own field
        config["head"] = config.pop("pool")
    return config


def _color_mode(in_chans: int) -> Literal["RGB", "L"]:
    return "L" if in_chans == 1 else "RGB"


def _native_preprocessing(record: Json, image_size: int, in_chans: int) -> Preprocessing:
    norm = record["normalisation"]
    return Preprocessing(
        image_size=image_size,
        resize_size=image_size,
        resize_mode="shorter_side",
        interpolation="bilinear",
        mean=list(norm["mean"]),
        std=list(norm["std"]),
        color_mode=_color_mode(in_chans),
    )


def _hf_overrides(config: Json) -> Json:
    if config.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"unsupported hidden_act {config['hidden_act']!r}: this ViT uses exact GELU")
    keys = {"num_heads": "num_attention_heads", "layer_norm_eps": "layer_norm_eps", "qkv_bias": "qkv_bias"}
    return {ours: config[theirs] for ours, theirs in keys.items() if theirs in config}


def _side(size: Any, what: str) -> int:
    """The side of a square {height, width}, [height, width] or bare int in a processor or model config."""
    if isinstance(size, Mapping):
        if set(size) - {"height", "width"} or "height" not in size:
            raise CheckpointError(f"{what} {dict(size)} is not a {{height, width}} size this service can reproduce")
        size = (size["height"], size["width"])
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise CheckpointError(f"{what} {list(size)} is not square: this service crops square inputs")
        size = size[0]
    if not isinstance(size, int) or size <= 0:
        raise CheckpointError(f"{what} {size!r} is not a positive integer side")
    return size


# Processors whose bare-int `size` transformers reads as the shorter side (default_to_square=False).
_HF_INT_SIZE_SQUARE = ("ViTImageProcessor", "DeiTImageProcessor")


def _hf_preprocessing(processor: Json, image_size: int, in_chans: int) -> Preprocessing:
    """The image processor's own steps: ViTImageProcessor squashes to (height, width); DeiT's squashes
    then centre-crops; DINOv2's (BitImageProcessor) resizes the shorter side, then centre-crops."""
    if processor.get("do_resize", True) is False or processor.get("do_rescale", True) is False:
        raise CheckpointError("the image processor does not resize or rescale; this service always does both")
    if abs(float(processor.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-9:
        raise CheckpointError(f"rescale_factor {processor['rescale_factor']} is not 1/255")
    size = processor.get("size", image_size)
    mode: Literal["shorter_side", "squash"] = "squash"
    kind = str(processor.get("image_processor_type", "")).removesuffix("Fast").removesuffix("Pil")
    if isinstance(size, int) and "size" in processor and kind not in _HF_INT_SIZE_SQUARE:
        raise CheckpointError(
            f"size {size}: a bare int means the shorter side or a square, by processor ({kind or 'unnamed'});"
            " write it as {height, width} or {shortest_edge}"
        )
    if isinstance(size, Mapping) and "shortest_edge" in size:
        if set(size) != {"shortest_edge"}:
            raise CheckpointError(f"size {dict(size)}: only a shortest_edge alone is reproduced (longest_edge caps it)")
        mode, side = "shorter_side", int(size["shortest_edge"])
    else:
        side = _side(size, "size")
    resample = int(processor.get("resample", 2))
    if resample not in _PIL_RESAMPLE:
        raise CheckpointError(f"resample {resample} is not supported ({', '.join(map(str, _PIL_RESAMPLE))})")
    crop = processor.get("crop_size") if processor.get("do_center_crop", False) else None
    if crop is None and mode == "shorter_side":
        raise CheckpointError("the image processor resizes the shorter side without a crop: the input is not square")
    normalise = processor.get("do_normalize", True)
    return Preprocessing(
        image_size=side if crop is None else _side(crop, "crop_size"),
        resize_size=side,
        resize_mode=mode,
        interpolation=_PIL_RESAMPLE[resample],
        mean=list(processor.get("image_mean", [0.5] * in_chans)) if normalise else [0.0] * in_chans,
        std=list(processor.get("image_std", [0.5] * in_chans)) if normalise else [1.0] * in_chans,
        color_mode=_color_mode(in_chans),
    )


def _timm_preprocessing(pretrained_cfg: Json, in_chans: int) -> Preprocessing:
    """What timm's resolve_data_config + create_transform do at inference for this pretrained_cfg."""
    height, width = (int(side) for side in pretrained_cfg["input_size"][1:])
    if height != width:
        raise CheckpointError(f"timm input_size {height}x{width} is not square: this service crops square inputs")
    modes: dict[str, Literal["shorter_side", "squash"]] = {"center": "shorter_side", "squash": "squash"}
    crop_mode = pretrained_cfg.get("crop_mode", "center")
    if crop_mode not in modes:
        raise CheckpointError(f"timm crop_mode {crop_mode!r} is not supported (center or squash)")
    interpolation = pretrained_cfg.get("interpolation", "bicubic")
    if interpolation not in _PIL_RESAMPLE.values():
        supported = ", ".join(_PIL_RESAMPLE.values())
        raise CheckpointError(f"timm interpolation {interpolation!r} is not supported ({supported})")
    crop_pct = float(pretrained_cfg.get("crop_pct") or TIMM_DEFAULT_CROP_PCT)
    return Preprocessing(
        image_size=height,
        resize_size=math.floor(height / crop_pct),  # timm: scale_size = floor(img_size / crop_pct)
        resize_mode=modes[crop_mode],
        crop_rounding="half_even",  # timm's CenterCrop is torchvision's
        interpolation=cast(Interpolation, interpolation),
        mean=list(pretrained_cfg.get("mean", TIMM_DEFAULT_MEAN)),
        std=list(pretrained_cfg.get("std", TIMM_DEFAULT_STD)),
        color_mode=_color_mode(in_chans),
    )


# model_args this ViT reproduces whatever their value: the tensors' shapes, or the model timm builds, decide.
_TIMM_ARGS_ANY = {
    "img_size",
    "patch_size",
    "in_chans",
    "num_classes",
    "global_pool",
    "embed_dim",
    "depth",
    "num_heads",
    "mlp_ratio",
    "qkv_bias",
    "init_values",
    "class_token",
    "no_embed_class",
    "reg_tokens",
    "fc_norm",
    "dynamic_img_size",
    "drop_rate",
    "pos_drop_rate",
    "proj_drop_rate",
    "attn_drop_rate",
    "drop_path_rate",
    "patch_drop_rate",
    "weight_init",
    "fix_init",
}
# model_args reproduced only at these values.
_TIMM_ARGS_AT = {
    "act_layer": (None, "gelu"),
    "pool_include_prefix": (False,),
    "pre_norm": (False,),
    "qk_norm": (False,),
    "final_norm": (True,),
    "pos_embed": ("learn",),
}


def _timm_architecture(config: Json) -> Json:
    """What a timm folder's model does that its tensors cannot show, read from the model timm builds
    for its architecture and model_args (on the meta device: no memory, no weights): the head count,
    the LayerNorm eps, pre-norm blocks, exact GELU and the pooling. A folder records only the
    arguments given explicitly; the architecture's defaults (ViT-H's 16 heads of 80) live in timm."""
    args = dict(config.get("model_args") or {})
    for key, value in args.items():
        if key not in _TIMM_ARGS_ANY and value not in _TIMM_ARGS_AT.get(key, ()):
            raise CheckpointError(f"unsupported layout: timm model_args {key}={value!r}, which this ViT lacks")
    try:
        import timm
    except ImportError:
        raise CheckpointError(
            "a timm folder records only the arguments its model was made with, and the architecture's defaults"
            " (such as its head count) are timm's: install timm to import it"
        ) from None
    architecture = config["architecture"]
    try:
        with torch.device("meta"):
            model = timm.create_model(architecture, pretrained=False, **args)
    except Exception as exc:  # an architecture this timm does not know, or arguments it refuses
        raise CheckpointError(f"timm cannot build {architecture!r} to read its layout: {exc}") from exc
    block = getattr(model, "blocks", [None])[0]
    if (
        type(model).__name__ not in ("VisionTransformer", "VisionTransformerDistilled")
        or type(block).__name__ != "Block"
    ):
        kind = f"{type(model).__name__} of {type(block).__name__}s"
        raise CheckpointError(f"unsupported layout: timm {architecture} is a {kind}, not pre-norm ViT blocks")
    activation = getattr(getattr(block, "mlp", None), "act", None)
    if not (isinstance(activation, torch.nn.GELU) and activation.approximate == "none"):
        raise CheckpointError(f"unsupported layout: timm {architecture} uses {activation!r}; this ViT uses exact GELU")
    if getattr(model, "pool_include_prefix", False):
        raise CheckpointError("unsupported layout: timm pool_include_prefix=True (the mean includes the prefix tokens)")
    if getattr(model, "global_pool", None) == "":
        raise CheckpointError("unsupported layout: timm global_pool='' answers a row per token, not one per image")
    eps = next((n.eps for n in (model.norm, model.fc_norm) if isinstance(n, torch.nn.LayerNorm)), None)
    if eps is None:
        raise CheckpointError(f"unsupported layout: timm {architecture} has no LayerNorm before its head")
    return {"num_heads": block.attn.num_heads, "layer_norm_eps": eps}


def _timm_head(config: Json, inferred: Head) -> Head:
    """timm's global_pool decides token against avg where the shapes cannot; other pools are refused."""
    pool = config.get("global_pool", (config.get("model_args") or {}).get("global_pool"))
    if pool in (None, ""):
        return inferred
    if pool not in ("token", "avg"):
        raise CheckpointError(f"unsupported layout: timm global_pool={pool!r} (this ViT pools by token or avg)")
    return cast(Head, pool) if inferred in ("token", "avg") else inferred


# torchvision's weights that do not resize to 256/224 of the crop, bilinear, by their width, patch and input
# side: the SWAG ones (bicubic, straight to the crop: end-to-end at 384, 512 and 518, and vit_h_14's linear
# probe at 224) and vit_l_16's IMAGENET1K_V1 (242). b_16 and l_16's SWAG linear probes at 224 read as V1.
_TORCHVISION_RESIZE: dict[tuple[int, int, int], tuple[float, Interpolation]] = {
    (768, 16, 384): (1.0, "bicubic"),
    (1024, 16, 512): (1.0, "bicubic"),
    (1280, 14, 518): (1.0, "bicubic"),
    (1280, 14, 224): (1.0, "bicubic"),
    (1024, 16, 224): (242 / 224, "bilinear"),
}


def default_preprocessing(
    layout: str, image_size: int, in_chans: int, weights: tuple[int, int, int] | None = None
) -> Preprocessing:
    """What each library's own inference transform does for a ViT, served at `image_size`. torchvision's
    differs by weights, which their (width, patch, input side) tell apart."""
    if layout == "torchvision":  # ViT_*_Weights.*.transforms()
        ratio, interpolation = _TORCHVISION_RESIZE.get(weights or (0, 0, 0), (256 / 224, "bilinear"))
        return Preprocessing(
            image_size=image_size,
            resize_size=round(image_size * ratio),
            resize_mode="shorter_side",
            crop_rounding="half_even",
            interpolation=interpolation,
            mean=TIMM_DEFAULT_MEAN[:in_chans],
            std=TIMM_DEFAULT_STD[:in_chans],
            color_mode=_color_mode(in_chans),
        )
    # timm's ViT default_cfg: crop_pct 0.9, bicubic, mean/std 0.5.
    return Preprocessing(
        image_size=image_size,
        resize_size=int(image_size / 0.9),
        resize_mode="shorter_side",
        crop_rounding="half_even",
        interpolation="bicubic",
        mean=[0.5] * in_chans,
        std=[0.5] * in_chans,
        color_mode=_color_mode(in_chans),
    )


def _served_at(preprocessing: Preprocessing, img_size: int) -> Preprocessing:
    """The same steps for another input side: the resize scales with it, so the crop keeps its share."""
    if img_size == preprocessing.image_size:
        return preprocessing
    resize = round(preprocessing.resize_size * img_size / preprocessing.image_size)
    return preprocessing.model_copy(update={"image_size": img_size, "resize_size": resize})


def _labels(source: _Source, num_classes: int) -> list[str]:
    id2label: Any
    if source.kind == "timm":
        names = source.config.get("label_names") or source.config["pretrained_cfg"].get("label_names")
        id2label = dict(enumerate(names)) if names else {}
    elif source.kind == "native":
        id2label = dict(enumerate(source.config.get("labels", [])))
    else:
        id2label = source.config.get("id2label")
    if isinstance(id2label, Mapping) and len(id2label) == num_classes:
        return [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(num_classes)]
    return [f"LABEL_{i}" for i in range(num_classes)]


def import_checkpoint(
    path: Path,
    *,
    base: ViTConfig | None = None,
    img_size: int | None = None,
    num_heads: int | None = None,
    head: Head | None = None,
    labels: list[str] | None = None,
) -> ImportedCheckpoint:
    """Read a file or a Hugging Face / timm model folder, detect its layout, build the model and load it strictly.

    `base` (a preset) fixes what shapes cannot tell, such as the head count; `img_size`
    serves the model at another resolution, resampling the position embeddings; `head`
    names the head kind where the shapes leave a choice (token or avg)."""
    source = _open(Path(path))
    raw = read_state_dict(source.weights)
    layout = "native" if source.kind == "native" else detect_layout(raw)
    sd = CONVERTERS[layout](raw)
    refuse_unsupported(sd)
    timm_args: Json = (source.config.get("model_args") or {}) if source.kind == "timm" else {}
    fields = infer_shapes(sd, no_embed_class=timm_args.get("no_embed_class"))
    # Shapes cannot tell the head count: the standard 64 dimensions per head, unless told.
    fields["num_heads"] = timm_args.get("num_heads", max(1, fields["embed_dim"] // 64))
    if layout == "torchvision" and fields["embed_dim"] == 1280:
        fields["num_heads"] = 16  # vit_h_14's heads are 80 wide
    if base is not None:
        checked = ("patch_size", "in_chans", "embed_dim", "depth", "mlp_dim")
        differing = {f: (fields[f], getattr(base, f)) for f in checked if fields[f] != getattr(base, f)}
        if differing:
            raise CheckpointError(f"checkpoint does not match the preset: {differing} (checkpoint, preset)")
        fields.update(num_heads=base.num_heads, layer_norm_eps=base.layer_norm_eps)
    if source.kind == "timm":
        fields["head"] = _timm_head(source.config, fields["head"])
        fields.update(_timm_architecture(source.config))
    if layout == "hf":
        fields.update(_hf_overrides(source.config))
    if source.kind == "native":
        fields.update(_native_config(source.config))
    if head is not None:
        fields["head"] = head
    if num_heads is not None:
        fields["num_heads"] = num_heads

    # The size the library's own pipeline feeds the model; the checkpoint's grid is resampled to it.
    checkpoint_img, in_chans = int(fields["img_size"]), int(fields["in_chans"])
    if source.kind == "native":
        preprocessing = _native_preprocessing(source.config, checkpoint_img, in_chans)
    elif source.kind == "hf":
        side = _side(source.config.get("image_size", checkpoint_img), "image_size")
        preprocessing = _hf_preprocessing(source.processor, side, in_chans)
    elif source.kind == "timm":
        preprocessing = _timm_preprocessing(source.config["pretrained_cfg"], in_chans)
    else:
        weights = (int(fields["embed_dim"]), int(fields["patch_size"]), checkpoint_img)
        preprocessing = default_preprocessing(layout, img_size or checkpoint_img, in_chans, weights)
    preprocessing = _served_at(preprocessing, img_size or preprocessing.image_size)
    fields["img_size"] = preprocessing.image_size
    try:
        cfg = ViTConfig(**fields)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint does not describe a supported ViT: {exc}") from exc
    model = VisionTransformer(cfg)
    # transformers' ViT, DeiT and DINOv2 resample the table without antialiasing; timm and
    # DINOv2-with-registers antialias. The same call keeps the served logits the library's.
    plain_bicubic = (
        layout == "hf" and source.config.get("model_type", "") != "dinov2_with_registers" and not cfg.reg_tokens
    )
    load_strict(model, sd, antialias=not plain_bicubic)
    model.eval()

    labels = labels if labels is not None else _labels(source, cfg.num_classes)
    if len(labels) != cfg.num_classes:
        raise CheckpointError(f"{len(labels)} labels given for a head with {cfg.num_classes} classes")
    return ImportedCheckpoint(model, layout, labels, preprocessing, source.weights, sha256_file(source.weights))
