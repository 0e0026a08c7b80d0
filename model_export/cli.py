"""`vit-export`: import a checkpoint, export it to ONNX, verify it, write the manifest."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import onnx
import torch

from model_export.checkpoints import CheckpointError, ImportedCheckpoint, default_preprocessing, import_checkpoint
from model_export.manifest import Manifest, Source
from model_export.onnx_export import DEFAULT_OPSET, ExportError, Precision, graph_description, write_artifact
from model_export.vit import HEADS, PRESETS, VisionTransformer, ViTConfig, preset


def _read_labels(path: Path) -> list[str]:
    """One label per line, or a JSON list, or a JSON {index: label} object."""
    text = path.read_text()
    if path.suffix == ".json":
        data = json.loads(text)
        if isinstance(data, dict):
            return [str(data[k]) for k in sorted(data, key=int)]
        return [str(label) for label in data]
    return [line.strip() for line in text.splitlines() if line.strip()]


def _random_init(preset_name: str, img_size: int | None, seed: int) -> ImportedCheckpoint:
    cfg = preset(preset_name, **({"img_size": img_size} if img_size else {}))
    torch.manual_seed(seed)
    model = VisionTransformer(cfg).eval()
    # A zero-initialised head would make every output equal; give benchmarks a real classifier.
    torch.nn.init.trunc_normal_(model.head.weight, std=0.02)
    labels = [f"LABEL_{i}" for i in range(cfg.num_classes)]
    preprocessing = default_preprocessing("timm", cfg.img_size, cfg.in_chans)
    return ImportedCheckpoint(model, "random-init", labels, preprocessing, Path(f"random-init-seed{seed}"), "")


def _rows(check: dict[str, int]) -> str:
    return f"{check['batch']} uint8 images + {check['tensor_batch']} normalised tensors"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vit-export",
        description="Import a ViT checkpoint (timm, torchvision, Hugging Face, or this project's training output), "
        "export it to ONNX with a dynamic batch axis, verify ONNX Runtime against PyTorch and write manifest.json.",
    )
    parser.add_argument("checkpoint", nargs="?", type=Path, help=".safetensors/.pt/.pth/.bin file or model folder")
    parser.add_argument("--out", type=Path, required=True, help="output folder for model.onnx and manifest.json")
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), help="architecture to expect (or build, with --random-init)"
    )
    parser.add_argument("--random-init", action="store_true", help="export the preset with random weights (benchmarks)")
    parser.add_argument("--seed", type=int, default=0, help="seed for --random-init")
    parser.add_argument("--img-size", type=int, help="serve at this resolution; position embeddings are resampled")
    parser.add_argument("--num-heads", type=int, help="attention heads, when not the standard embed_dim/64")
    parser.add_argument(
        "--head",
        choices=HEADS,
        help="what the classifier reads, where the shapes leave a choice (a timm file pooled by token or avg)",
    )
    parser.add_argument("--labels", type=Path, help="labels file: one per line, or JSON list / {index: label}")
    parser.add_argument("--name", help="model name reported by the server (default: the output folder's name)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    parser.add_argument(
        "--no-explain", action="store_true", help="skip model_explain.onnx, the graph that also outputs attention maps"
    )
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument("--int8", action="store_true", help="quantize the verified graphs to int8 (dynamic; CPU)")
    precision.add_argument(
        "--fp16", action="store_true", help="convert the verified graphs to fp16, LayerNorm and softmax kept fp32 (GPU)"
    )
    parser.add_argument(
        "--fused-attention",
        action="store_true",
        help="write one onnxruntime Attention operator per block in model.onnx (wins on GPU; let vit-bench decide)",
    )
    parser.add_argument(
        "--gate",
        choices=["fashion-mnist"],
        help="with --int8 or --fp16: refuse the variant unless it passes this accuracy gate",
    )
    return parser


def _note_what_a_bare_file_cannot_say(cfg: ViTConfig, layout: str, told: bool) -> None:
    plural = "s" if cfg.num_heads > 1 else ""
    heads = "" if told else f"{cfg.num_heads} head{plural} of {cfg.embed_dim // cfg.num_heads}, "
    print(
        f"vit-export: note: a bare {layout} weights file does not record its head count, activation, block order"
        f" or pooling; read as {heads}exact GELU, pre-norm blocks and a {cfg.head} head. A model made otherwise"
        " answers differently: export the folder its library saves (timm's save_for_hf, transformers'"
        " save_pretrained), or give --num-heads and --head.",
        file=sys.stderr,
    )


def run(args: argparse.Namespace) -> Manifest:
    if args.random_init:
        if not args.preset:
            raise CheckpointError("--random-init needs --preset")
        imported = _random_init(args.preset, args.img_size, args.seed)
    else:
        if args.checkpoint is None:
            raise CheckpointError("give a checkpoint path, or --random-init --preset NAME")
        if not args.checkpoint.exists():
            raise CheckpointError(f"checkpoint not found: {args.checkpoint}")
        imported = import_checkpoint(
            args.checkpoint,
            base=PRESETS[args.preset] if args.preset else None,
            img_size=args.img_size,
            num_heads=args.num_heads,
            head=args.head,
            labels=_read_labels(args.labels) if args.labels else None,
        )
        if not args.checkpoint.is_dir() and imported.layout in ("timm", "hf") and not args.preset:
            _note_what_a_bare_file_cannot_say(imported.model.cfg, imported.layout, told=args.num_heads is not None)
    cfg = imported.model.cfg
    manifest = Manifest(
        name=args.name or args.out.resolve().name,
        labels=imported.labels,
        preprocessing=imported.preprocessing,
        **graph_description(cfg),
        opset=args.opset,
        config=cfg.to_dict(),
        source=Source(checkpoint=imported.source.name, layout=imported.layout, sha256=imported.sha256 or None),
        verification={},
    )
    precision: Precision = "int8" if args.int8 else "fp16" if args.fp16 else "fp32"
    if args.gate and precision == "fp32":
        raise CheckpointError("--gate applies to --int8 or --fp16")
    return write_artifact(
        imported.model,
        args.out,
        manifest,
        args.opset,
        explain=not args.no_explain,
        precision=precision,
        fused_attention=args.fused_attention,
        gate=args.gate,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        manifest = run(args)
    except (CheckpointError, ExportError, onnx.checker.ValidationError, OSError, ValueError) as exc:
        errors = getattr(exc, "errors", None)  # pydantic: one line per problem, not its multi-line report
        message = "; ".join(str(e["msg"]) for e in errors()) if callable(errors) else " ".join(str(exc).split())
        print(f"vit-export: error: {message}", file=sys.stderr)
        return 1
    cfg = manifest.config
    print(f"imported {manifest.source.layout} checkpoint {manifest.source.checkpoint}")
    print(
        f"model: {cfg['depth']} blocks, width {cfg['embed_dim']}, {cfg['num_heads']} heads, "
        f"{cfg['img_size']}px / patch {cfg['patch_size']}, {manifest.num_classes} classes, {manifest.head} head"
    )
    print(f"prefix tokens: {', '.join(manifest.prefix_tokens) or 'none'}; embedding: {manifest.embedding}")
    print("verified: onnx.checker passed")
    for check in manifest.verification["batches"]:  # type: ignore[attr-defined]
        print(
            f"verified: {_rows(check)}: max |ORT - PyTorch| = {check['max_abs_diff']:.2e} "
            f"(<= {manifest.verification['tolerance']}), top-1 agreement {check['top1_agreement']:.0%}"
        )
    for check in manifest.verification.get("variant_batches", []):  # type: ignore[attr-defined]
        print(
            f"{manifest.variant}: {_rows(check)}: max |ORT - PyTorch fp32| = {check['max_abs_diff']:.2e}, "
            f"top-1 agreement {check['top1_agreement']:.0%}"
        )
    if "variant_gate" in manifest.verification:
        gate = manifest.verification["variant_gate"]
        print(
            f"{manifest.variant} gate passed on {gate['dataset']}: top-1 {gate['fp32_accuracy']:.4f} fp32 -> "  # type: ignore[index]
            f"{gate['variant_accuracy']:.4f} (drop {gate['drop_points']} points), "  # type: ignore[index]
            f"agreement {gate['top1_agreement']:.2%}"  # type: ignore[index]
        )
    for check in manifest.verification.get("explain_batches", []):  # type: ignore[attr-defined]
        print(f"verified: explain graph, {_rows(check)}: max |ORT - PyTorch| = {check['max_abs_diff']:.2e}")
    print(f"wrote {args.out / manifest.onnx_file} (sha256 {manifest.onnx_sha256}) and manifest.json")
    if manifest.explain_onnx_file:
        print(f"wrote {args.out / manifest.explain_onnx_file} (sha256 {manifest.explain_onnx_sha256})")
    elif not args.no_explain:
        print("no explain graph: the model has no [class] token whose attention it would map")
    return 0


if __name__ == "__main__":
    sys.exit(main())
