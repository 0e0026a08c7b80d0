"""The manifest: everything the server needs to know about an exported model, in one place.

It is written beside the `.onnx` file as `manifest.json` and embedded in the ONNX metadata
under `MANIFEST_METADATA_KEY`. Torch-free, because the server reads it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MANIFEST_FILENAME = "manifest.json"
MANIFEST_METADATA_KEY = "vit_serve.manifest"
# 2: the graph takes uint8 pixels and normalises them itself (1 took normalised float32 only).
FORMAT_VERSION = 2

# Graph names, used both to name the ONNX inputs/outputs and to declare their dynamic axes.
# Every graph takes both inputs and answers one row per image: the `pixels` rows first, then the
# `pixel_values` rows. A caller with only one kind feeds the other with a batch of 0.
PIXELS_NAME = "pixels"  # uint8 (batch, H, W, C): resized and cropped; the graph casts and normalises
PIXEL_VALUES_NAME = "pixel_values"  # float32 (tensor_batch, C, H, W), already normalised
INPUT_NAMES = [PIXELS_NAME, PIXEL_VALUES_NAME]
LOGITS_NAME = "logits"
# (rows, D): the final [class] token before the head, or without one the pooled vector the
# head reads; the manifest's `embedding` says which, in words.
EMBEDDING_NAME = "embedding"
OUTPUT_NAMES = [LOGITS_NAME, EMBEDDING_NAME]
# The explain graph's extra outputs: (rows, grid, grid) maps of where the [class] token looked,
# over the patches only and each summing to 1; then (rows, num_prefix_tokens): the share of the
# class token's last-layer head-mean attention that went to each prefix row (manifest
# `prefix_tokens` names their kinds), so that those shares and the patches' share sum to 1.
LAST_LAYER_ATTENTION_NAME = "cls_attention_last_layer"
ROLLOUT_ATTENTION_NAME = "cls_attention_rollout"
PREFIX_ATTENTION_NAME = "cls_attention_prefix"
EXPLAIN_OUTPUT_NAMES = [*OUTPUT_NAMES, LAST_LAYER_ATTENTION_NAME, ROLLOUT_ATTENTION_NAME, PREFIX_ATTENTION_NAME]
EXPLAIN_ONNX_FILE = "model_explain.onnx"
BATCH_AXES = {PIXELS_NAME: "batch", PIXEL_VALUES_NAME: "tensor_batch"}
ROWS_AXIS = "rows"  # batch + tensor_batch

Interpolation = Literal["nearest", "bilinear", "bicubic", "lanczos"]
PrefixToken = Literal["class", "distillation", "register"]
Head = Literal["token", "avg", "distilled", "token+patch_mean"]


class Preprocessing(BaseModel):
    """How raw pixels become the model input: resize, crop, scale to [0, 1], normalise."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    image_size: int = Field(gt=0, description="side of the square model input")
    resize_size: int = Field(gt=0, description="shorter side after resize (shorter_side) or both sides (squash)")
    resize_mode: Literal["shorter_side", "squash"] = Field(
        "shorter_side", description="shorter_side: keep aspect then centre-crop; squash: resize to a square"
    )
    crop: Literal["center"] = "center"
    # Where an odd margin puts the centre crop: Hugging Face floors half of it; torchvision and
    # timm round it, half to even (Python's round). A pixel apart, but a pixel is a pixel.
    crop_rounding: Literal["floor", "half_even"] = "floor"
    interpolation: Interpolation = "bicubic"
    mean: list[float]
    std: list[float]
    color_mode: Literal["RGB", "L"] = "RGB"

    @model_validator(mode="after")
    def _consistent(self) -> Preprocessing:
        channels = 1 if self.color_mode == "L" else 3
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(f"mean/std need {channels} values for colour mode {self.color_mode}")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be positive")
        if self.resize_size < self.image_size:
            raise ValueError("resize_size must be at least image_size, or the crop would not fit")
        return self

    @property
    def channels(self) -> int:
        return 1 if self.color_mode == "L" else 3


class Source(BaseModel):
    model_config = ConfigDict(frozen=True)

    checkpoint: str = Field(description="file name of the imported weights")
    layout: str = Field(description="timm, torchvision, hf or random-init")
    sha256: str | None = Field(description="sha256 of the weights file; None for random init")


class Manifest(BaseModel):
    model_config = ConfigDict(frozen=True, protected_namespaces=())

    format_version: int = FORMAT_VERSION
    name: str
    labels: list[str]
    preprocessing: Preprocessing
    pooling: Literal["token", "avg"] = Field(
        description="token: the head reads the [class] token (alone, with the distillation token, or beside the "
        "patch mean; `head` says which); avg: it reads only the mean of the patch tokens"
    )
    # The defaults describe the plain ViT, which every earlier export was.
    prefix_tokens: list[PrefixToken] = Field(
        default_factory=lambda: list[PrefixToken](["class"]),
        description="the kind of each row before the patches, in order",
    )
    head: Head = Field(
        "token",
        description="token: x[:, 0]; avg: patch mean; distilled: mean of the class head on x[:, 0] and the "
        "distillation head on x[:, 1]; token+patch_mean: one linear layer on concat(x[:, 0], patch mean) (DINOv2)",
    )
    embedding: str = Field(
        "the [class] token's final output after the final norm: the vector the head reads",
        description="what the `embedding` output is, in words",
    )
    input_names: list[str] = INPUT_NAMES
    output_names: list[str] = OUTPUT_NAMES
    opset: int
    variant: str = "fp32"
    config: dict[str, object]
    source: Source
    verification: dict[str, object] = Field(default_factory=dict, description="what the export checked, with figures")
    onnx_file: str = "model.onnx"
    onnx_sha256: str | None = Field(None, description="only in manifest.json: a file cannot hold its own hash")
    explain_onnx_file: str | None = Field(
        None, description="graph that also outputs the [class] token's attention; None without a [class] token"
    )
    explain_onnx_sha256: str | None = None

    @field_validator("onnx_file", "explain_onnx_file")
    @classmethod
    def _in_the_folder(cls, name: str | None) -> str | None:
        # A folder may come from someone else: its manifest must not point the server at files outside it.
        if name is not None and (not name or Path(name).name != name or name in (".", "..")):
            raise ValueError(f"graph file {name!r} must be a file name in the model folder, not a path")
        return name

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def to_json(self) -> str:
        return self.model_dump_json(indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        return cls.model_validate(json.loads(text))

    @classmethod
    def read(cls, model_dir: Path) -> Manifest:
        return cls.from_json((Path(model_dir) / MANIFEST_FILENAME).read_text())
