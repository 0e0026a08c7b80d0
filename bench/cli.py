"""`vit-bench`: benchmarks that print figures and ratios against a baseline measured in the same run."""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

from PIL import Image

from bench.explain_cost import measure
from bench.soak import soak
from service.settings import DEFAULT_MODEL_DIR


def _sample_images() -> list[bytes]:
    """Real photos shipped with scikit-image, as 1024x768 JPEGs (a typical upload)."""
    from skimage import data

    images = []
    for photo in (data.astronaut(), data.coffee(), data.chelsea(), data.rocket()):
        buffer = io.BytesIO()
        Image.fromarray(photo).resize((1024, 768), Image.Resampling.BILINEAR).save(buffer, "JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vit-bench", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
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
