"""`vit-bench reproduce`: the README's performance table from nothing but this package."""

from __future__ import annotations

from pathlib import Path

from bench.throughput import BenchResult
from model_export.cli import main as vit_export

TI, B = "vit_tiny_patch16_224", "vit_base_patch16_224"
# Per device: (folder name, preset, vit-export flags) of each benched model.
BENCH_MODELS = {
    "cpu": [("vit-ti", TI, []), ("vit-ti-int8", TI, ["--int8"]), ("vit-b", B, []), ("vit-b-int8", B, ["--int8"])],
    "cuda": [
        ("vit-b", B, []),
        ("vit-b-fp16", B, ["--fp16"]),
        ("vit-b-fp16-fused", B, ["--fp16", "--fused-attention"]),
    ],
}


def export_bench_models(folder: Path, device: str) -> list[Path]:
    """Export each benched model (random weights: speed does not depend on them) unless already there."""
    exported = []
    for name, preset, flags in BENCH_MODELS[device]:
        out = folder / name
        if not (out / "manifest.json").is_file():
            argv = ["--random-init", "--preset", preset, "--no-explain", "--name", name, "--out", str(out), *flags]
            if vit_export(argv) != 0:
                raise RuntimeError(f"vit-export {' '.join(argv)} failed")
        exported.append(out)
    return exported


def summary_table(results: list[BenchResult]) -> str:
    """Markdown: one row per model, best figures at saturation, overhead at concurrency 1."""
    machine = results[0].machine
    peaks = ", ".join(f"{precision} {value:.0f}" for precision, value in machine.peaks.items())
    device = f"{machine.gpu} (onnxruntime CUDA), host {machine.cpu}" if machine.gpu else machine.cpu
    lines = [
        f"Machine: {device}, {machine.cores} cores, kernel flags {', '.join(machine.kernel_flags) or 'none of note'}; "
        f"GEMM peaks (G op/s): {peaks}; {machine.python}.",
        "",
        "| model | raw limit (layout) | service (its level, mean batch, front-ends' loop lag) | baseline "
        "| service / limit | service / baseline | overhead at c=1 | limit / peak |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        ratios = result.ratios()
        best, service = result.limit[0], result.best("service")
        # Below the limit, these say why: small batches (the batcher), or a long lag (the front-ends).
        batch = f"{service.mean_batch:.1f}" if service.mean_batch is not None else "-"
        lag = f"{service.mean_loop_lag_ms:.1f} ms" if service.mean_loop_lag_ms is not None else "-"
        lines.append(
            f"| {result.model} ({result.variant}) "
            f"| {best.images_per_s:.1f} img/s ({best.sessions} × {best.threads}, b{best.batch}) "
            f"| {service.images_per_s:.1f} img/s (c={service.concurrency}, batch {batch}, lag {lag}) "
            f"| {result.best('baseline').images_per_s:.1f} img/s "
            f"| {ratios['service_over_limit']:.2f}× | {ratios['service_over_baseline']:.2f}× "
            f"| {ratios['overhead_ms']:.2f} ms | {ratios['limit_over_peak']:.2f} |"
        )
    return "\n".join(lines) + "\n"
