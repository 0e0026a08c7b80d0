"""`vit-serve`: parse flags, then hand over to the supervisor (one engine, N front-ends)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from service.logs import configure_logging
from service.settings import Settings
from service.supervisor import serve


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vit-serve",
        description="Serve an exported ViT (model.onnx + manifest.json) over HTTP. "
        "Every other setting comes from VIT_* environment variables (see the README).",
    )
    parser.add_argument("--model", type=Path, help="model folder (default: VIT_MODEL_DIR, else the embedded model)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 in containers)")
    parser.add_argument("--port", type=int, default=8000, help="port to bind; 0 picks a free one (it is logged)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = Settings(**({"model_dir": args.model} if args.model else {}))
    configure_logging(settings.log_level, settings.log_format, "supervisor")
    return serve(settings, args.host, args.port)


if __name__ == "__main__":
    sys.exit(main())
