"""`vit-bench`: benchmarks that print figures and ratios against a baseline measured in the same run."""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

from PIL import Image

from bench.explain_cost import measure
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vit-bench", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    cost = commands.add_parser("explain-cost", help="latency of explain=true vs plain requests")
    cost.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR, help="exported model folder")
    cost.add_argument("--requests", type=int, default=100, help="requests of each kind")
    cost.set_defaults(run=explain_cost)
    args = parser.parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
