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

from bench.burst import run_burst
from bench.engine_limit import measure as measure_engine
from bench.explain_cost import measure
from bench.host_path import measure as measure_host_path
from bench.host_path import trivial_model
from bench.hostile import measure as measure_hostile
from bench.machine import Machine, describe_host
from bench.plot import plot_result
from bench.preprocess_speed import measure as measure_preprocessing
from bench.raw_limit import best_layout, device_of, provider_for
from bench.reproduce import export_bench_models, summary_table
from bench.soak import soak
from bench.throughput import BenchResult, run_bench
from model_export.manifest import Manifest
from service.cores import available_cores
from service.settings import DEFAULT_MODEL_DIR


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
    print(f"machine: {machine.cpu}, {machine.cores} cores; kernel flags: {flags}; {machine.python}")
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
    print(
        f"{'system':9} {'conc':>4} {'img/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'batch':>6} "
        f"{'lag ms':>7} {'errors':>6}"
    )
    for r in result.http:
        batch = f"{r.mean_batch:6.2f}" if r.mean_batch is not None else f"{'-':>6}"
        lag = f"{r.mean_loop_lag_ms:7.2f}" if r.mean_loop_lag_ms is not None else f"{'-':>7}"
        print(
            f"{r.system:9} {r.concurrency:4d} {r.images_per_s:8.1f} {r.p50_ms:8.2f} {r.p95_ms:8.2f} "
            f"{r.p99_ms:8.2f} {batch} {lag} {r.errors:6d}"
        )
    if result.skipped_levels:
        print(f"skipped concurrency {result.skipped_levels}: a round trip would exceed half the window")
    levels = {r.concurrency for r in result.http}
    for system in ("service", "baseline"):
        if unmeasured := sorted(levels - {r.concurrency for r in result.http if r.system == system}):
            print(f"{system}: no answer finished inside the window at concurrency {unmeasured}: not measured")
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


def host_path_command(args: argparse.Namespace) -> int:
    """CPU per request of the whole server around a trivial graph, and of the engine per image, for
    several front-end counts: what the host costs, which front-end count suits this machine, and
    what GPU rate the host could feed."""
    model = args.model or trivial_model(args.out / "trivial")
    image = _photo_jpeg("astronaut", (args.upload_side, args.upload_side))
    levels = _levels(args.concurrency)
    cores = available_cores()
    print(f"machine: {describe_host(cores)}; model {Manifest.read(model).name}, one {len(image)}-byte JPEG per request")
    print(
        f"{'front-ends':>10} {'conc':>5} {'req/s':>8} {'server CPU ms/req':>18} {'engine CPU us/img':>18} {'errors':>6}"
    )
    rows = []
    for frontends in _levels(args.frontends):
        for row in measure_host_path(model, image, frontends, levels, args.seconds):
            rows.append(row)
            print(
                f"{row.frontends:10d} {row.concurrency:5d} {row.requests_per_s:8.1f} {row.server_cpu_ms:18.3f} "
                f"{row.engine_cpu_us:18.1f} {row.errors:6d}"
            )
    busiest = [row for row in rows if row.concurrency == max(levels)]
    best = max(busiest, key=lambda row: row.requests_per_s)
    print(
        f"best here: VIT_FRONTEND_PROCESSES={best.frontends} ({best.requests_per_s:.0f} req/s at c={best.concurrency})"
    )
    front_ms = best.server_cpu_ms - best.engine_cpu_us / 1000
    print(
        f"ceiling implied for a GPU behind this host: front-ends {cores * 1000 / front_ms:,.0f} img/s on {cores} cores "
        f"({front_ms:.3f} ms each); one engine {1e6 / best.engine_cpu_us:,.0f} img/s ({best.engine_cpu_us:.1f} us each)"
    )
    return 0


def engine_command(args: argparse.Namespace) -> int:
    """The engine alone, fed by the bench as front-end 0: images/s and its own CPU per image."""
    model = args.model or trivial_model(args.out / "trivial")
    image = _photo_jpeg("astronaut", (args.upload_side, args.upload_side))
    print(f"machine: {describe_host(available_cores())}; model {Manifest.read(model).name}")
    print(
        f"{'in flight':>9} {'max batch':>9} {'img/s':>9} {'engine CPU us/img':>18} {'copy alone us/img':>18} "
        f"{'mean batch':>10}"
    )
    for batch in _levels(args.max_batch_size):
        for in_flight in _levels(args.in_flight):
            row = measure_engine(model, image, in_flight, batch, args.seconds)
            print(
                f"{row.in_flight:9d} {row.max_batch_size:9d} {row.images_per_s:9.0f} {row.engine_cpu_us:18.1f} "
                f"{row.copy_us:18.1f} {row.mean_batch:10.1f}   "
                f"(one engine: {1e6 / row.engine_cpu_us:,.0f} img/s of its own CPU)"
            )
    return 0


def peers_command(args: argparse.Namespace) -> int:
    """The service beside LitServe, BentoML, Ray Serve, PyTriton, mosec and TorchServe serving the same graph."""
    from bench.peers import NAMES
    from bench.peers.report import plot
    from bench.peers.run import Uploads, fashion_mnist_gate, run_peers

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    only = [name for name in args.only.split(",") if name] if args.only else None
    unknown = sorted(set(only or []) - set(NAMES))
    if unknown:
        print(f"unknown peer(s) {unknown}; the peers are {', '.join(NAMES)}")
        return 2
    if args.rounds < 1:
        print("--rounds must be at least 1")
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
        args.rounds,
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


def burst_command(args: argparse.Namespace) -> int:
    """Clients far over capacity, all at once: how fast the server says no, and that it never says 5xx."""
    image = _photo_jpeg("astronaut", (args.upload_side, args.upload_side))
    rounds = run_burst(args.model, image, args.clients, args.images_per_request, args.rounds)
    print(f"machine: {describe_host(available_cores())}")
    print(
        f"bursts of {args.clients} clients at once, {args.images_per_request} JPEGs ({len(image)} bytes each) "
        "per request, each burst from an idle server; server-side durations from its access log"
    )
    print(f"{'burst':>12} {'status counts':>22} {'429 ms p10/p50/p90':>22} {'200 ms p10/p50/p90':>22} {'5xx':>4}")
    for index, burst in enumerate(rounds):
        name = "1 (cold)" if index == 0 else str(index + 1)
        counts = " ".join(f"{status or 'none'}:{n}" for status, n in burst.by_status.items())
        refused = "/".join(f"{v:.0f}" for v in burst.refusal_ms)
        accepted = "/".join(f"{v:.0f}" for v in burst.accepted_ms)
        print(f"{name:>12} {counts:>22} {refused:>22} {accepted:>22} {burst.server_errors:4d}")
    return 1 if any(burst.server_errors for burst in rounds) else 0


def hostile_command(args: argparse.Namespace) -> int:
    """The server's CPU per hostile request, against one ordinary classification's: the budgets at work."""
    ordinary = _photo_jpeg("astronaut", (248, 248))
    ordinary_ms, costs = measure_hostile(args.model, ordinary, args.repeats)
    print(f"machine: {describe_host(available_cores())}")
    print(f"one ordinary classification (a {len(ordinary)}-byte JPEG): {ordinary_ms:.2f} ms of server CPU")
    print(f"{'case':42} {'answer':>26} {'CPU ms':>8} {'x ordinary':>10}")
    for cost in costs:
        answer = f"{cost.status} {cost.error_type}"
        print(f"{cost.name:42} {answer:>26} {cost.cpu_ms:8.2f} {cost.cpu_ms / ordinary_ms:10.1f}")
    worst = max(costs, key=lambda cost: cost.cpu_ms)
    print(f"worst: {worst.name}, {worst.cpu_ms / ordinary_ms:.1f}x an ordinary classification (target <= 10x)")
    return 0


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


def add_trivial_graph_options(parser: argparse.ArgumentParser) -> None:
    """The options of the benches that measure the host around a graph that costs nothing."""
    parser.add_argument("--model", type=Path, help="exported model folder (default: a trivial graph, ViT-B's input)")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per measurement")
    parser.add_argument("--upload-side", type=int, default=248, help="side of the square uploaded JPEG")
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="folder for the trivial model")


def add_device_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="auto: CUDA when onnxruntime has it (as VIT_PROVIDERS)",
    )


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
    add_device_option(run)
    run.add_argument(
        "--images-per-request", type=int, default=1, help="images in each service request (the baseline takes one)"
    )
    run.set_defaults(run=run_command)
    variants = commands.add_parser("variants", help="raw limit of each exported variant here: which to serve")
    variants.add_argument("models", type=Path, nargs="+", help="exported model folders (one per variant)")
    variants.add_argument("--seconds", type=float, default=5.0, help="seconds per measured layout")
    add_device_option(variants)
    variants.set_defaults(run=variants_command)
    again = commands.add_parser(
        "reproduce", help="CPU: ViT-Ti and ViT-B, fp32 and int8; CUDA: ViT-B fp32, fp16, fp16+fused: bench each"
    )
    add_device_option(again)
    again.add_argument("--seconds", type=float, default=4.0, help="seconds per measurement")
    again.add_argument("--concurrency", default="1,4,16,64", help="comma-separated client counts")
    again.add_argument("--out", type=Path, default=Path("bench-results"), help="folder for models, JSON, PNG, summary")
    again.set_defaults(run=reproduce_command)
    host = commands.add_parser("host-path", help="server CPU per request around a trivial graph, by front-end count")
    add_trivial_graph_options(host)
    host.add_argument("--frontends", default="1,2,4", help="comma-separated VIT_FRONTEND_PROCESSES to try")
    host.add_argument("--concurrency", default="1,64", help="comma-separated client counts")
    host.set_defaults(run=host_path_command)
    alone = commands.add_parser("engine", help="the engine alone, fed as fast as possible: its CPU per image")
    add_trivial_graph_options(alone)
    alone.add_argument("--in-flight", default="64,256", help="comma-separated one-image requests kept in the engine")
    alone.add_argument("--max-batch-size", default="8,64", help="comma-separated VIT_MAX_BATCH_SIZE to try")
    alone.set_defaults(run=engine_command)
    peers = commands.add_parser(
        "peers",
        help="the service beside LitServe, BentoML, Ray Serve, PyTriton, mosec and TorchServe on the same graph",
    )
    peers.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR, help="exported model folder")
    add_device_option(peers)
    peers.add_argument("--concurrency", default="4,16,64", help="comma-separated client counts")
    peers.add_argument("--images-per-request", type=int, default=1, help="images in each request, for every server")
    peers.add_argument("--seconds", type=float, default=5.0, help="seconds of each timed window")
    peers.add_argument("--only", help="comma-separated peers to run beside the service (default: all)")
    peers.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="times every server takes its turn at every level, the order reversed each round; the ratios are "
        "the rounds' medians",
    )
    peers.add_argument("--upload-side", type=int, default=248, help="side of the square uploaded JPEG")
    peers.add_argument(
        "--out", type=Path, default=Path("bench-results/peers"), help="folder for JSON, Markdown, PNG and logs"
    )
    peers.set_defaults(run=peers_command)
    bursting = commands.add_parser("burst", help="a burst far over capacity: how fast the 429s are, and no 5xx")
    bursting.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR, help="exported model folder")
    bursting.add_argument("--clients", type=int, default=96, help="clients posting at the same instant")
    bursting.add_argument("--images-per-request", type=int, default=32, help="JPEGs in each request")
    bursting.add_argument("--rounds", type=int, default=4, help="bursts, each from an idle server")
    bursting.add_argument("--upload-side", type=int, default=248, help="side of the square uploaded JPEG")
    bursting.set_defaults(run=burst_command)
    hostile = commands.add_parser("hostile", help="server CPU per hostile request vs one ordinary classification")
    hostile.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR, help="exported model folder")
    hostile.add_argument("--repeats", type=int, default=20, help="requests of each hostile case")
    hostile.set_defaults(run=hostile_command)
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
