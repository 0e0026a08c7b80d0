"""Trace a `VisionTransformer` to ONNX, verify it against PyTorch, and write the manifest."""

from __future__ import annotations

import logging
import math
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from model_export.checkpoints import sha256_file
from model_export.fused_attention import CONTRIB_DOMAIN, with_fused_attention
from model_export.gate import fashion_mnist_gate
from model_export.half_precision import to_fp16_in_place
from model_export.manifest import (
    BATCH_AXES,
    EXPLAIN_ONNX_FILE,
    EXPLAIN_OUTPUT_NAMES,
    INPUT_NAMES,
    MANIFEST_FILENAME,
    MANIFEST_METADATA_KEY,
    OUTPUT_NAMES,
    PIXEL_VALUES_NAME,
    PIXELS_NAME,
    ROWS_AXIS,
    Manifest,
    Preprocessing,
)
from model_export.quantize import quantize_in_place
from model_export.vit import VisionTransformer, ViTConfig, class_token_attention

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 17
# (pixels rows, pixel_values rows) traced: different sizes, so the tracer cannot tie the two axes.
TRACE_BATCHES = (2, 1)
# Pixels alone at batch 1, the traced batch, an odd size and a larger one never traced; then
# both inputs at once, and already-normalised rows alone.
VERIFY_BATCHES = ((1, 0), (2, 0), (3, 0), (8, 0), (2, 1), (0, 2))
FP32_TOLERANCE = 1e-4

Precision = Literal["fp32", "int8", "fp16"]
# How each reduced precision rewrites a verified fp32 graph in place.
PRECISION_PASSES: dict[str, Callable[[Path], None]] = {"int8": quantize_in_place, "fp16": to_fp16_in_place}


class ExportError(RuntimeError):
    """The exported graph failed a check; the message says which and by how much."""


@dataclass(frozen=True)
class BatchCheck:
    batch: int  # uint8 pixel rows
    tensor_batch: int  # already-normalised rows
    max_abs_diff: float  # over every output
    top1_agreement: float


class _Graph(nn.Module):
    """What is traced: uint8 pixels normalised in the graph, then joined by already-normalised
    rows; out come the logits and the embedding, and with explain=True the [class] token's
    attention maps over the patches and its attention shares on the prefix rows."""

    pixel_scale: torch.Tensor
    pixel_shift: torch.Tensor

    def __init__(self, model: VisionTransformer, preprocessing: Preprocessing, explain: bool) -> None:
        super().__init__()
        self.model = model
        self.explain = explain
        std = torch.tensor(preprocessing.std).reshape(1, -1, 1, 1)
        mean = torch.tensor(preprocessing.mean).reshape(1, -1, 1, 1)
        # (x / 255 - mean) / std as one multiply-add per channel.
        self.register_buffer("pixel_scale", 1.0 / (255.0 * std))
        self.register_buffer("pixel_shift", -mean / std)

    def forward(self, pixels: torch.Tensor, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = pixels.permute(0, 3, 1, 2).float() * self.pixel_scale + self.pixel_shift  # (B, C, H, W)
        x = torch.cat([x, pixel_values], dim=0)  # (B + B2, C, H, W)
        if not self.explain:
            features = self.model.forward_features(x)
            return self.model.forward_head(features), self.model.embedding(features)
        features, attentions = self.model.forward_features_with_attention(x)
        maps = class_token_attention(attentions, self.model.cfg.grid_size, self.model.num_prefix_tokens)
        return self.model.forward_head(features), self.model.embedding(features), *maps


def output_names(explain: bool) -> list[str]:
    return EXPLAIN_OUTPUT_NAMES if explain else OUTPUT_NAMES


def graph_description(cfg: ViTConfig) -> dict[str, object]:
    """The manifest fields that say what the graph's rows and outputs are, from the traced model's config."""
    if not cfg.class_token:
        norm = "then normed (fc_norm)" if cfg.fc_norm else "after the final norm"
        embedding = f"the mean of the patch tokens, {norm}: the vector the head reads (this model has no [class] token)"
    else:
        reads = {
            "token": "the vector the head reads",
            "avg": "the head reads the patch mean instead",
            "distilled": "the class head reads it; the distillation head reads row 1",
            "token+patch_mean": "the head reads it beside the patch mean",
        }[cfg.head]
        normed = "after the final norm"
        if cfg.fc_norm and cfg.head == "avg":  # the norm follows the pooling and never sees the class token
            normed = "without a norm (this model's norm follows the patch pooling)"
        embedding = f"the [class] token's final output {normed}: {reads}"
    return {
        "pooling": "avg" if cfg.head == "avg" else "token",
        "prefix_tokens": cfg.prefix_tokens,
        "head": cfg.head,
        "embedding": embedding,
    }


def random_inputs(
    cfg: ViTConfig, batch: int, tensor_batch: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 pixels (batch, H, W, C) and normalised-looking float rows (tensor_batch, C, H, W)."""
    side = cfg.img_size
    pixels = torch.randint(0, 256, (batch, side, side, cfg.in_chans), dtype=torch.uint8, generator=generator)
    return pixels, torch.randn(tensor_batch, cfg.in_chans, side, side, generator=generator)


def normalise(pixels: torch.Tensor, preprocessing: Preprocessing) -> torch.Tensor:
    """The textbook (x / 255 - mean) / std in (B, C, H, W): what the graph must compute itself."""
    mean = torch.tensor(preprocessing.mean).reshape(1, -1, 1, 1)
    std = torch.tensor(preprocessing.std).reshape(1, -1, 1, 1)
    return (pixels.permute(0, 3, 1, 2).float() / 255.0 - mean) / std


def export_onnx(
    model: VisionTransformer,
    onnx_path: Path,
    preprocessing: Preprocessing,
    opset: int = DEFAULT_OPSET,
    explain: bool = False,
    fused_attention: bool = False,
) -> None:
    """Trace to `onnx_path` with a dynamic batch axis (the manifest is embedded by write_artifact).

    fused_attention writes one onnxruntime Attention operator per block (not for explain graphs,
    which must output the attention weights the operator keeps to itself)."""
    if opset < 17:
        raise ExportError(f"opset {opset} is too old: LayerNormalization needs opset >= 17")
    dummy = random_inputs(model.cfg, *TRACE_BATCHES, torch.Generator().manual_seed(0))
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of dynamo, but its graphs are the
        # ones onnxruntime's transformer optimizer recognises; the warning is expected.
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        names = output_names(explain)
        torch.onnx.export(
            _Graph((with_fused_attention(model) if fused_attention else model).eval(), preprocessing, explain),
            dummy,
            str(onnx_path),
            input_names=INPUT_NAMES,
            output_names=names,
            dynamic_axes={
                **{name: {0: axis} for name, axis in BATCH_AXES.items()},
                **dict.fromkeys(names, {0: ROWS_AXIS}),
            },
            opset_version=opset,
            do_constant_folding=True,
            custom_opsets={CONTRIB_DOMAIN: 1} if fused_attention else None,
            dynamo=False,
        )


def _embed_manifest(onnx_path: Path, manifest: Manifest) -> None:
    graph = onnx.load(str(onnx_path))
    onnx.helper.set_model_props(graph, {MANIFEST_METADATA_KEY: manifest.model_dump_json()})
    graph.doc_string = f"{manifest.name}: Vision Transformer, {manifest.pooling} pooling"
    onnx.save(graph, str(onnx_path))


def verify_onnx(
    model: VisionTransformer,
    onnx_path: Path,
    preprocessing: Preprocessing,
    tolerance: float = FP32_TOLERANCE,
    explain: bool = False,
) -> list[BatchCheck]:
    """onnx.checker, then ONNX Runtime against PyTorch on random input at each of VERIFY_BATCHES:
    uint8 pixels into the graph, the same pixels normalised outside it into PyTorch."""
    try:
        onnx.checker.check_model(str(onnx_path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"onnx.checker rejected {onnx_path}: {exc}") from exc
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    for graph_input in session.get_inputs():
        if not isinstance(graph_input.shape[0], str):
            raise ExportError(f"batch axis is not dynamic: {graph_input.name} has shape {graph_input.shape}")
    # The traced module itself, fed rows normalised outside it (no uint8 rows), so the
    # outputs and their order are the export's while the in-graph normalisation stays checked.
    graph = _Graph(model.eval(), preprocessing, explain).eval()
    generator = torch.Generator().manual_seed(0)
    checks = []
    for batch, tensor_batch in VERIFY_BATCHES:
        pixels, tensors = random_inputs(model.cfg, batch, tensor_batch, generator)
        with torch.no_grad():
            reference = graph(pixels[:0], torch.cat([normalise(pixels, preprocessing), tensors]))
        expected = [t.numpy() for t in reference]
        actual = session.run(output_names(explain), {PIXELS_NAME: pixels.numpy(), PIXEL_VALUES_NAME: tensors.numpy()})
        diff = 0.0
        for name, got, want in zip(output_names(explain), actual, expected, strict=True):
            if got.shape != want.shape:
                raise ExportError(f"batch {batch}: ONNX {name} has shape {got.shape}, PyTorch {want.shape}")
            diff = max(diff, float(np.abs(got - want).max()))
        agreement = float((actual[0].argmax(1) == expected[0].argmax(1)).mean())
        if not diff <= tolerance:  # written so that NaN fails too
            raise ExportError(
                f"batch {batch} + {tensor_batch}: ONNX Runtime differs from PyTorch by {diff:.3g} > {tolerance:g}"
            )
        checks.append(BatchCheck(batch, tensor_batch, diff, agreement))
    return checks


def variant_name(precision: Precision, fused_attention: bool) -> str:
    return precision + ("+fused-attention" if fused_attention else "")


def write_artifact(
    model: VisionTransformer,
    out_dir: Path,
    manifest: Manifest,
    opset: int = DEFAULT_OPSET,
    explain: bool = True,
    precision: Precision = "fp32",
    fused_attention: bool = False,
    gate: str | None = None,
) -> Manifest:
    """Export, verify and write `model.onnx` (and, with explain, `model_explain.onnx`) plus
    `manifest.json` into out_dir; returns the final manifest.

    Each graph is verified in fp32 first. An int8 or fp16 variant is then made from it; its
    distance from PyTorch is recorded, and with gate="fashion-mnist" its accuracy must pass.
    The manifest's pooling, prefix_tokens, head and embedding are set from the model itself. A
    model without a [class] token gets no explain graph: its maps are the class token's."""
    if explain and not model.cfg.class_token:
        logger.info("no %s: the model has no [class] token whose attention it would map", EXPLAIN_ONNX_FILE)
        explain = False
    manifest = manifest.model_copy(update=graph_description(model.cfg))
    graphs = {manifest.onnx_file: False, **({EXPLAIN_ONNX_FILE: True} if explain else {})}
    variant = variant_name(precision, fused_attention)
    verification: dict[str, object] = {
        "onnx_checker": "passed",
        "onnxruntime": ort.__version__,
        "tolerance": FP32_TOLERANCE,
    }
    for filename, with_maps in graphs.items():
        export_onnx(
            model,
            out_dir / filename,
            manifest.preprocessing,
            opset,
            explain=with_maps,
            fused_attention=fused_attention and not with_maps,
        )
        checks = verify_onnx(model, out_dir / filename, manifest.preprocessing, explain=with_maps)
        verification["explain_batches" if with_maps else "batches"] = [check.__dict__ for check in checks]
    if precision != "fp32":
        fp32_copy = out_dir / "model.fp32.onnx"
        shutil.copyfile(out_dir / manifest.onnx_file, fp32_copy)
        try:
            for filename in graphs:
                PRECISION_PASSES[precision](out_dir / filename)
            # Not held to the fp32 tolerance: recorded, and judged by the gate.
            verification["variant_batches"] = [
                c.__dict__
                for c in verify_onnx(model, out_dir / manifest.onnx_file, manifest.preprocessing, tolerance=math.inf)
            ]
            if gate == "fashion-mnist":
                verification["variant_gate"] = figures = fashion_mnist_gate(
                    fp32_copy, out_dir / manifest.onnx_file, manifest, variant
                )
                if not figures["passed"]:
                    raise ExportError(f"{variant} variant failed its accuracy gate: {figures}")
        finally:
            fp32_copy.unlink()
    final = manifest.model_copy(
        update={
            "verification": verification,
            "explain_onnx_file": EXPLAIN_ONNX_FILE if explain else None,
            "variant": variant,
        }
    )
    # Embedded once, when the verification figures are known; then hash the final bytes.
    for filename in graphs:
        _embed_manifest(out_dir / filename, final)
    final = final.model_copy(
        update={
            "onnx_sha256": sha256_file(out_dir / manifest.onnx_file),
            "explain_onnx_sha256": sha256_file(out_dir / EXPLAIN_ONNX_FILE) if explain else None,
        }
    )
    (out_dir / MANIFEST_FILENAME).write_text(final.to_json())
    return final
