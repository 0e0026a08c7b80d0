"""Import timm, torchvision and Hugging Face ViT checkpoints into `VisionTransformer`.

Each layout is a pure function `(state_dict, cfg) -> state_dict` in our (timm-like) names.
Files are read with safetensors or `torch.load(weights_only=True)`; nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from model_export.manifest import Preprocessing
from model_export.vit import VisionTransformer, ViTConfig, resample_pos_embed

StateDict = dict[str, torch.Tensor]
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


def detect_layout(sd: Mapping[str, torch.Tensor]) -> str:
    if "cls_token" in sd and "pos_embed" in sd:
        return "timm"
    if "class_token" in sd and "encoder.pos_embedding" in sd:
        return "torchvision"
    if "vit.embeddings.cls_token" in sd or "embeddings.cls_token" in sd:
        return "hf"
    raise CheckpointError(
        "unknown checkpoint layout: expected timm (cls_token, pos_embed), torchvision (class_token, "
        f"encoder.pos_embedding) or Hugging Face (vit.embeddings.cls_token) keys; first keys: {list(sd)[:5]}"
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
    return _rename(sd, [(r"^patch_embed\.proj\.", "patch_embed.")])


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
    """Hub files use transformers 4.x names (`encoder.layer.N.attention.attention.query`); a 5.x
    model's in-memory state_dict uses `layers.N.attention.q_proj`. Both are accepted."""
    sd = {k.removeprefix("vit."): v for k, v in sd.items()}
    block = r"^(?:encoder\.layer|layers)\.(\d+)\."
    out = _rename(
        sd,
        [
            (r"^embeddings\.cls_token$", "cls_token"),
            (r"^embeddings\.position_embeddings$", "pos_embed"),
            (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed."),
            (block + r"layernorm_before\.", r"blocks.\1.norm1."),
            (block + r"layernorm_after\.", r"blocks.\1.norm2."),
            (block + r"attention\.(?:output\.dense|o_proj)\.", r"blocks.\1.attn.proj."),
            (block + r"(?:intermediate\.dense|mlp\.fc1)\.", r"blocks.\1.mlp.fc1."),
            (block + r"(?:output\.dense|mlp\.fc2)\.", r"blocks.\1.mlp.fc2."),
            (block + r"attention\.(?:attention\.(query|key|value)|(q|k|v)_proj)\.", r"blocks.\1.attn.\2\3."),
            (r"^layernorm\.", "norm."),
            (r"^classifier\.", "head."),
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
    return out


CONVERTERS: dict[str, Callable[[Mapping[str, torch.Tensor]], StateDict]] = {
    "timm": from_timm,
    "torchvision": from_torchvision,
    "hf": from_hf,
    "native": from_timm,  # our parameter names are timm's, patch embedding aside
}


# --- configuration and loading ---------------------------------------------------------------


def infer_shapes(sd: Mapping[str, torch.Tensor]) -> dict[str, object]:
    """ViTConfig fields that the tensors' shapes determine (all but heads, eps and pooling)."""
    try:
        d = sd["cls_token"].shape[-1]
        patch_w = sd["patch_embed.weight"]
        grid_rows = sd["pos_embed"].shape[1] - VisionTransformer.num_prefix_tokens
        head = sd["head.weight"]
        mlp = sd["blocks.0.mlp.fc1.weight"]
    except KeyError as exc:
        raise CheckpointError(f"checkpoint lacks {exc.args[0]!r}, which is needed to infer the model shape") from None
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"^blocks\.(\d+)\.", k)))
    return {
        "img_size": round(grid_rows**0.5) * patch_w.shape[-1],
        "patch_size": patch_w.shape[-1],
        "in_chans": patch_w.shape[1],
        "num_classes": head.shape[0],
        "embed_dim": d,
        "depth": depth,
        "mlp_dim": mlp.shape[0],
        "qkv_bias": "blocks.0.attn.qkv.bias" in sd,
    }


def load_strict(model: VisionTransformer, sd: Mapping[str, torch.Tensor]) -> None:
    """Load every tensor or fail naming the key(s); position embeddings are resampled to the model's grid."""
    sd = dict(sd)
    if "pos_embed" in sd and sd["pos_embed"].shape != model.pos_embed.shape:
        sd["pos_embed"] = resample_pos_embed(sd["pos_embed"], model.cfg.grid_size, model.num_prefix_tokens)
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

_PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic", 1: "lanczos"}


TRAINING_RECORD = "training_record.json"


def _native_directory(path: Path) -> tuple[Path, dict[str, object]]:
    """A folder written by `model_export.train_fashion_mnist`: weights plus the training record."""
    weights = path / "weights.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{path}: {TRAINING_RECORD} found but no weights.safetensors beside it")
    return weights, json.loads((path / TRAINING_RECORD).read_text())


def _native_preprocessing(record: Mapping[str, object], cfg: ViTConfig) -> Preprocessing:
    norm = record["normalisation"]
    return Preprocessing(
        image_size=cfg.img_size,
        resize_size=cfg.img_size,
        interpolation="bilinear",
        mean=list(norm["mean"]),  # type: ignore[index]
        std=list(norm["std"]),  # type: ignore[index]
        color_mode="L" if cfg.in_chans == 1 else "RGB",
    )


def _hf_directory(path: Path) -> tuple[Path, dict[str, object], dict[str, object]]:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{path} is a directory but has no config.json (expected a Hugging Face model folder)")
    weights = next((path / name for name in HF_WEIGHT_FILES if (path / name).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{path}: none of {', '.join(HF_WEIGHT_FILES)} found beside config.json")
    processor_path = path / "preprocessor_config.json"
    processor = json.loads(processor_path.read_text()) if processor_path.is_file() else {}
    return weights, json.loads(config_path.read_text()), processor


def _hf_overrides(config: Mapping[str, object]) -> dict[str, object]:
    if config.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"unsupported hidden_act {config['hidden_act']!r}: this ViT uses exact GELU")
    keys = {
        "num_heads": "num_attention_heads",
        "layer_norm_eps": "layer_norm_eps",
        "img_size": "image_size",
        "qkv_bias": "qkv_bias",
    }
    return {ours: config[theirs] for ours, theirs in keys.items() if theirs in config}


def _hf_preprocessing(processor: Mapping[str, object], image_size: int, in_chans: int) -> Preprocessing:
    size = processor.get("size", image_size)
    side = size.get("height", image_size) if isinstance(size, Mapping) else size
    return Preprocessing(
        image_size=image_size,
        resize_size=int(side),  # type: ignore[arg-type]
        resize_mode="squash",  # ViTImageProcessor resizes straight to (height, width), no crop
        interpolation=_PIL_RESAMPLE.get(int(processor.get("resample", 2)), "bilinear"),  # type: ignore[call-overload]
        mean=list(processor.get("image_mean", [0.5] * in_chans)),  # type: ignore[call-overload]
        std=list(processor.get("image_std", [0.5] * in_chans)),  # type: ignore[call-overload]
        color_mode="L" if in_chans == 1 else "RGB",
    )


def default_preprocessing(layout: str, image_size: int, in_chans: int) -> Preprocessing:
    """What each library's own inference transform does for a ViT."""
    color_mode = "L" if in_chans == 1 else "RGB"
    if layout == "torchvision":  # ViT_B_16_Weights.IMAGENET1K_V1.transforms()
        return Preprocessing(
            image_size=image_size,
            resize_size=round(image_size * 256 / 224),
            interpolation="bilinear",
            mean=[0.485, 0.456, 0.406][:in_chans],
            std=[0.229, 0.224, 0.225][:in_chans],
            color_mode=color_mode,
        )
    # timm's ViT default_cfg: crop_pct 0.9, bicubic, mean/std 0.5.
    return Preprocessing(
        image_size=image_size,
        resize_size=int(image_size / 0.9),
        interpolation="bicubic",
        mean=[0.5] * in_chans,
        std=[0.5] * in_chans,
        color_mode=color_mode,
    )


def import_checkpoint(
    path: Path,
    *,
    base: ViTConfig | None = None,
    img_size: int | None = None,
    num_heads: int | None = None,
    labels: list[str] | None = None,
) -> ImportedCheckpoint:
    """Read a file or Hugging Face folder, detect its layout, build the model and load it strictly.

    `base` (a preset) fixes what shapes cannot tell, such as the head count; `img_size`
    serves the model at another resolution, resampling the position embeddings.
    """
    path = Path(path)
    hf_config: dict[str, object] = {}
    processor: dict[str, object] = {}
    record: dict[str, object] = {}
    if path.is_dir() and (path / TRAINING_RECORD).is_file():
        path, record = _native_directory(path)
    elif path.is_dir():
        path, hf_config, processor = _hf_directory(path)
    raw = read_state_dict(path)
    layout = "native" if record else detect_layout(raw)
    sd = CONVERTERS[layout](raw)
    fields = infer_shapes(sd)
    # Shapes cannot tell the head count: the standard 64 dimensions per head, unless told.
    fields["num_heads"] = max(1, int(fields["embed_dim"]) // 64)  # type: ignore[call-overload]
    if base is not None:
        checked = ("patch_size", "in_chans", "embed_dim", "depth", "mlp_dim")
        differing = {f: (fields[f], getattr(base, f)) for f in checked if fields[f] != getattr(base, f)}
        if differing:
            raise CheckpointError(f"checkpoint does not match the preset: {differing} (checkpoint, preset)")
        fields.update(num_heads=base.num_heads, layer_norm_eps=base.layer_norm_eps, pool=base.pool)
    if layout == "hf":
        fields.update(_hf_overrides(hf_config))
    if record:
        fields.update(record["config"])  # type: ignore[arg-type]
    if num_heads is not None:
        fields["num_heads"] = num_heads
    checkpoint_img = fields["img_size"]
    if img_size is not None:
        fields["img_size"] = img_size
    cfg = ViTConfig(**fields)  # type: ignore[arg-type]
    model = VisionTransformer(cfg)
    load_strict(model, sd)
    model.eval()

    if labels is None:
        id2label = hf_config.get("id2label") or dict(enumerate(record.get("labels", [])))
        if isinstance(id2label, Mapping) and len(id2label) == cfg.num_classes:
            labels = [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(cfg.num_classes)]  # type: ignore[call-overload]
        else:
            labels = [f"LABEL_{i}" for i in range(cfg.num_classes)]
    if len(labels) != cfg.num_classes:
        raise CheckpointError(f"{len(labels)} labels given for a head with {cfg.num_classes} classes")

    if record:
        preprocessing = _native_preprocessing(record, cfg)
    elif layout == "hf":
        preprocessing = _hf_preprocessing(processor, cfg.img_size, cfg.in_chans)
        if cfg.img_size != checkpoint_img:
            preprocessing = preprocessing.model_copy(update={"resize_size": cfg.img_size})
    else:
        preprocessing = default_preprocessing(layout, cfg.img_size, cfg.in_chans)
    return ImportedCheckpoint(model, layout, labels, preprocessing, path, sha256_file(path))
