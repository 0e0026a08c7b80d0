"""`vit-serve`: run the service under uvicorn, draining in-flight work on SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path
from types import FrameType

import uvicorn

from service.app import create_app
from service.lifecycle import Lifecycle
from service.logs import configure_logging
from service.settings import Settings

logger = logging.getLogger("service")


class DrainingServer(uvicorn.Server):
    """First SIGTERM/SIGINT: readiness 503 and new work refused while the listener stays open,
    in-flight requests finish (up to the grace), then a clean exit 0. A second signal is uvicorn's own."""

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle, grace_s: float) -> None:
        super().__init__(config)
        self.lifecycle = lifecycle
        self.grace_s = grace_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: asyncio.Task[None] | None = None

    async def serve(self, sockets: list | None = None) -> None:  # type: ignore[type-arg]
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain is None and self._loop is not None and sig in (signal.SIGTERM, signal.SIGINT):
            # Readiness and admission flip here and now (a flag write is signal-safe): with uvloop the
            # loop may otherwise answer requests that arrived with the signal before the drain task runs.
            self.lifecycle.begin_drain()
            # A signal handler may interrupt the loop anywhere: hand over through the thread-safe door.
            self._loop.call_soon_threadsafe(self._start_drain)
            return
        super().handle_exit(sig, frame)

    def _start_drain(self) -> None:
        if self._drain is None:
            self._drain = asyncio.get_running_loop().create_task(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        self.lifecycle.begin_drain()
        logger.info("draining: %d request(s) in flight, grace %.1f s", self.lifecycle.in_flight, self.grace_s)
        drained = await self.lifecycle.wait_idle(self.grace_s)
        logger.info("drained" if drained else "drain grace passed; exiting with requests in flight")
        self.should_exit = True


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vit-serve",
        description="Serve an exported ViT (model.onnx + manifest.json) over HTTP. "
        "Every other setting comes from VIT_* environment variables (see the README).",
    )
    parser.add_argument("--model", type=Path, help="model folder (default: VIT_MODEL_DIR, else the embedded model)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 in containers)")
    parser.add_argument("--port", type=int, default=8000)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = Settings(**({"model_dir": args.model} if args.model else {}))
    configure_logging(settings.log_level, settings.log_format)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=settings.log_level,
        log_config=None,  # keep our handlers: uvicorn's own would replace them
        proxy_headers=True,
        forwarded_allow_ips=settings.forwarded_allow_ips,
        timeout_graceful_shutdown=int(settings.drain_grace_s) + 1,
        access_log=False,
    )
    # A failed start-up (bad model folder, CUDA required but absent) is logged by uvicorn,
    # which then exits with status 3.
    DrainingServer(config, app.state.lifecycle, settings.drain_grace_s).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
