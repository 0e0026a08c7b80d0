"""`vit-bench`: benchmarks that print figures and ratios against a baseline measured in the same run."""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
from pathlib import Path

from PIL import Image

from bench.explain_cost import measure
from bench.machine import Machine
from bench.plot import plot_result
from bench.preprocess_speed import measure as measure_preprocessing
from bench.raw_limit import best_layout, device_of, provider_for
from bench.reproduce import export_bench_models, summary_table
from bench.soak import soak
from bench.throughput import BenchResult, run_bench
from model_export.manifest import Manifest
from service.settings import DEFAULT_MODEL_DIR, available_cores


def _photo_jpeg(name: str, size: tuple[int, int]) -> bytes:
    """One of scikit-image's sample photos, resized to `size` and encoded as a quality-90 JPEG."""
    from skimage import data

    buffer = io.BytesIO()
    photo = Image.fromarray(getattr(data, name)())
    photo.resize(size, Image.Resampling.BILINEAR).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _sample_images() -> list[bytes]:
    """Real photos as 1024x768 JPEGs, a typical upload."""
    return [_photo_jpeg(name, (1024, 768)) for name in ("astronaut", "coffee", "chelsea", "rocket")]


def print_machine(machine: Machine) -> None:
    flags = ", ".join(machine.kernel_flags) or "none of note"
    print(f"machine: {machine.cpu}, {machine.cores} cores; kernel flags: {flags}")
    peaks = ", ".join(f"{precision} {value:.0f} G op/s" for precision, value in machine.peaks.items())
    if machine.gpu:
        print(f"GPU: {machine.gpu}; GEMM peaks (onnxruntime CUDA, one session): {peaks}")
    else:
        vnni = "VNNI" if machine.has_vnni else "no VNNI"
        print(f"GEMM peaks (onnxruntime, {machine.cores} x 1 thread): {peaks} ({vnni})")


def print_result(result: BenchResult) -> None:
    print_machine(result.machine)
    print(
        f"model {result.model} ({result.variant}), upload {result.image_bytes} bytes (JPEG), "
        f"{result.images_per_request} per service request"
    )
    print("limit: raw onnxruntime, no HTTP (sessions x threads, batch -> images/s)")
    for layout in result.limit:
        print(f"  {layout.sessions} x {layout.threads}, batch {layout.batch:3d}: {layout.images_per_s:8.1f}")
    if result.limit_device_input is not None:
        print(f"  the same best batch with its input already on the GPU: {result.limit_device_input:8.1f}")
    print(f"{'system':9} {'conc':>4} {'img/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'batch':>6} {'errors':>6}")
    for r in result.http:
        batch = f"{r.mean_batch:6.2f}" if r.mean_batch is not None else f"{'-':>6}"
        print(
            f"{r.system:9} {r.concurrency:4d} {r.images_per_s:8.1f} {r.p50_ms:8.2f} {r.p95_ms:8.2f} "
            f"{r.p99_ms:8.2f} {batch} {r.errors:6d}"
        )
    if result.skipped_levels:
        print(f"skipped concurrency {result.skipped_levels}: a round trip would exceed half the window")
    ratios = result.ratios()
    print(f"service / limit:    {ratios['service_over_limit']:.2f}x")
    print(f"service / baseline: {ratios['service_over_baseline']:.2f}x")
    print(
        f"overhead at concurrency 1: {ratios['overhead_ms']:.2f} ms "
        f"(p50 over HTTP minus {result.lone_ms:.2f} ms for the image alone in one session)"
    )
    print(f"limit / the machine's {result.variant.split('+')[0]} GEMM peak: {ratios['limit_over_peak']:.2f}")


def _bench_and_save(
    model_dir: Path, image: bytes, levels: list[int], seconds: float, device: str, out: Path, per_request: int = 1
) -> BenchResult:
    result = run_bench(model_dir, image, levels, seconds, device, per_request)
    print_result(result)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{result.model}.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    plot_result(result, out / f"{result.model}.png")
    print(f"wrote {out / (result.model + '.json')} and {result.model}.png")
    return result


def _levels(text: str) -> list[int]:
    return [int(level) for level in text.split(",")]


def run_command(args: argparse.Namespace) -> int:
    manifest = Manifest.read(args.model)
    side = args.upload_side or manifest.preprocessing.resize_size
    image = _photo_jpeg("astronaut", (side, side))
    _bench_and_save(
        args.model, image, _levels(args.concurrency), args.seconds, args.device, args.out, args.images_per_request
    )
    return 0


def reproduce_command(args: argparse.Namespace) -> int:
    """Export the device's bench models (random weights: speed does not depend on them) and bench
    each; then one summary table."""
    device = device_of(provider_for(args.device))
    results = []
    for model_dir in export_bench_models(args.out / "models", device):
        side = Manifest.read(model_dir).preprocessing.resize_size
        image = _photo_jpeg("astronaut", (side, side))
        results.append(_bench_and_save(model_dir, image, _levels(args.concurrency), args.seconds, device, args.out))
    summary = summary_table(results)
    (args.out / "summary.md").write_text(summary)
    print(summary)
    return 0


def variants_command(args: argparse.Namespace) -> int:
    """The raw limit of each exported variant on this machine; the fastest is the one to serve."""
    provider = provider_for(args.device)
    results = []
    for model_dir in args.models:
        manifest = Manifest.read(model_dir)
        prep = manifest.preprocessing
        shape = (prep.image_size, prep.image_size, prep.channels)
        best = best_layout(model_dir / manifest.onnx_file, shape, available_cores(), args.seconds, provider)[0]
        results.append((best.images_per_s, manifest, model_dir, best))
    where = "one CUDA device" if device_of(provider) == "cuda" else f"{available_cores()} cores"
    print(f"raw onnxruntime limit per variant on {where} (best layout each)")
    print(f"{'variant':24} {'img/s':>8} {'layout':>16} {'gate':>22}  folder")
    for images_per_s, manifest, model_dir, best in results:
        gate = manifest.verification.get("variant_gate")
        gate_text = f"top-1 {gate['variant_accuracy']:.4f}" if isinstance(gate, dict) else "-"
        layout = f"{best.sessions} x {best.threads}, b{best.batch}"
        print(f"{manifest.variant:24} {images_per_s:8.1f} {layout:>16} {gate_text:>22}  {model_dir}")
    fastest = max(results, key=lambda r: r[0])
    print(f"fastest here: {fastest[1].variant} -> vit-serve --model {fastest[2]}")
    return 0


def peers_command(args: argparse.Namespace) -> int:
    """The service beside LitServe, BentoML, Ray Serve, PyTriton and mosec serving the same graph."""
    from bench.peers import NAMES
    from bench.peers.report import plot
    from bench.peers.run import Uploads, fashion_mnist_gate, run_peers

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    only = [name for name in args.only.split(",") if name] if args.only else None
    unknown = sorted(set(only or []) - set(NAMES))
    if unknown:
        print(f"unknown peer(s) {unknown}; the peers are {', '.join(NAMES)}")
        return 2
    if args.model.resolve() == DEFAULT_MODEL_DIR.resolve():
        gate = fashion_mnist_gate()
    else:  # real photos at the model's resize size: top-1 must match the service's, whatever it is
        side = Manifest.read(args.model).preprocessing.resize_size
        photos = ("astronaut", "coffee", "chelsea", "rocket")
        gate = Uploads([_photo_jpeg(name, (side, side)) for name in photos], "image/jpeg")
    image = _photo_jpeg("astronaut", (args.upload_side, args.upload_side))
    words = f"{args.upload_side}x{args.upload_side} JPEG ({len(image)} bytes)"
    result = run_peers(
        args.model,
        args.device,
        _levels(args.concurrency),
        args.seconds,
        image,
        words,
        gate,
        args.images_per_request,
        only,
        args.out / "logs",
    )
    table = result.markdown()
    print(table)
    name = f"peers-{result.model}-{result.device}"
    (args.out / f"{name}.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    (args.out / f"{name}.md").write_text(table)
    plot(result, args.out / f"{name}.png")
    print(f"wrote {args.out / name}.json, .md and .png; each server's log in {args.out / 'logs'}")
    failed = [s.name for s in result.systems if s.gate is not None and not s.gate.passed]
    return 1 if failed else 0


def preprocess_command(args: argparse.Namespace) -> int:
    """One core, as each decode thread uses one."""
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    print("bytes -> uint8 (224, 224, 3) model input for ViT-B/16, one core, best of 10")
    print(f"{'upload':22} {'service ms':>10} {'Pillow draft ms':>16} {'full decode ms':>15}")
    sizes = (("12 MP JPEG (4032x3024)", (4032, 3024)), ("1024x768 JPEG", (1024, 768)), ("248x248 JPEG", (248, 248)))
    for label, size in sizes:
        t = measure_preprocessing(label, _photo_jpeg("astronaut", size))
        print(f"{t.label:22} {t.service_ms:10.2f} {t.pillow_draft_ms:16.2f} {t.full_decode_ms:15.2f}")
    return 0


def explain_cost(args: argparse.Namespace) -> int:
    result = measure(args.model, _sample_images(), args.requests)
    print(f"model {result.model}: {result.requests} sequential requests each way, one 1024x768 JPEG per request")
    print(f"{'':10} {'p50 ms':>8} {'p95 ms':>8}")
    print(f"{'plain':10} {result.plain_p50_ms:8.2f} {result.plain_p95_ms:8.2f}")
    print(f"{'explain':10} {result.explain_p50_ms:8.2f} {result.explain_p95_ms:8.2f}")
    print(f"explain / plain latency (p50): {result.ratio_p50:.2f}x (target <= 1.25x)")
    return 0


def soak_command(args: argparse.Namespace) -> int:
    report = soak(args.model, _sample_images(), args.duration, args.clients)
    print(f"soak: {report.requests} requests in {report.duration_s:.0f} s from {args.clients} clients")
    print("status counts: " + ", ".join(f"{status or 'failed'}: {n}" for status, n in sorted(report.by_status.items())))
    print(f"{'t (s)':>7} {'RSS (MB)':>9}")
    for seconds, mb in report.rss_mb[:: max(1, len(report.rss_mb) // 20)]:
        print(f"{seconds:7.0f} {mb:9.1f}")
    print(f"RSS growth after warm-up: {report.rss_growth_mb:+.1f} MB; errors: {report.errors}")
    return 1 if report.errors else 0


DEVICE_OPTION: dict[str, object] = {
    "choices": ["auto", "cpu", "cuda"],
    "default": "auto",
    "help": "auto: CUDA when onnxruntime has it (as VIT_PROVIDERS)",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vit-bench", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="the limit, the service and the baseline, side by side")
    run.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR, help="exported model folder")
    run.add_argument("--seconds", type=float, default=5.0, help="seconds per measurement")
    run.add_argument("--concurrency", default="1,4,16,64", help="comma-separated client counts")
    run.add_argument(
        "--upload-side", type=int, help="side of the square uploaded JPEG (default: the model's resize size)"
    )
    run.add_argument("--out", type=Path, default=Path("bench-results"), help="folder for the JSON and PNG")
    run.add_argument("--device", **DEVICE_OPTION)
    run.add_argument(
        "--images-per-request", type=int, default=1, help="images in each service request (the baseline takes one)"
    )
    run.set_defaults(run=run_command)
    variants = commands.add_parser("variants", help="raw limit of each exported variant here: which to serve")
    variants.add_argument("models", type=Path, nargs="+", help="exported model folders (one per variant)")
    variants.add_argument("--seconds", type=float, default=5.0, help="seconds per measured layout")
    variants.add_argument("--device", **DEVICE_OPTION)
    variants.set_defaults(run=variants_command)
    again = commands.add_parser(
        "reproduce", help="CPU: ViT-Ti and ViT-B, fp32 and int8; CUDA: ViT-B fp32, fp16, fp16+fused: bench each"
    )
    again.add_argument("--device", **DEVICE_OPTION)
    again.add_argument("--seconds", type=float, default=4.0, help="seconds per measurement")
    again.add_argument("--concurrency", default="1,4,16,64", help="comma-separated client counts")
    again.add_argument("--out", type=Path, default=Path("bench-results"), help="folder for models, JSON, PNG, summary")
    again.set_defaults(run=reproduce_command)
    peers = commands.add_parser(
        "peers", help="the service beside LitServe, BentoML, Ray Serve, PyTriton and mosec on the same graph"
    )
    peers.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR, help="exported model folder")
    peers.add_argument("--device", **DEVICE_OPTION)
    peers.add_argument("--concurrency", default="4,16,64", help="comma-separated client counts")
    peers.add_argument("--images-per-request", type=int, default=1, help="images in each request, for every server")
    peers.add_argument("--seconds", type=float, default=5.0, help="seconds of each timed window")
    peers.add_argument("--only", help="comma-separated peers to run beside the service (default: all)")
    peers.add_argument("--upload-side", type=int, default=248, help="side of the square uploaded JPEG")
    peers.add_argument(
        "--out", type=Path, default=Path("bench-results/peers"), help="folder for JSON, Markdown, PNG and logs"
    )
    peers.set_defaults(run=peers_command)
    prep = commands.add_parser("preprocess", help="decode and resize timings on one core")
    prep.set_defaults(run=preprocess_command)
    cost = commands.add_parser("explain-cost", help="latency of explain=true vs plain requests")
    cost.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR, help="exported model folder")
    cost.add_argument("--requests", type=int, default=100, help="requests of each kind")
    cost.set_defaults(run=explain_cost)
    soaking = commands.add_parser("soak", help="steady load for minutes: RSS over time and every error")
    soaking.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR, help="exported model folder")
    soaking.add_argument("--duration", type=float, default=300.0, help="seconds of load")
    soaking.add_argument("--clients", type=int, default=8, help="concurrent closed-loop clients")
    soaking.set_defaults(run=soak_command)
    args = parser.parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
