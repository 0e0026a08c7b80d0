"""A front-end process: uvicorn serving the app on the listening socket the supervisor bound for it.

The first SIGTERM/SIGINT drains: readiness 503 and new work refused with 503 while the listener
stays open, in-flight requests finish (up to the grace), then a clean exit 0. A second signal
is uvicorn's own, and stops at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from types import FrameType

import uvicorn

from service.boot import read_boot, report
from service.frontend.app import create_app
from service.frontend.decode import Decoder
from service.frontend.engine_client import EngineClient
from service.frontend.engine_link import EngineInfo
from service.frontend.http_protocol import HttpProtocol
from service.lifecycle import Lifecycle
from service.logs import configure_logging
from service.metrics import FrontendMetrics
from service.shm_ring import Ring

logger = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine: EngineClient, grace_s: float) -> None:
        super().__init__(config)
        self.engine = engine
        self.grace_s = grace_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: asyncio.Task[None] | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain is None and self._loop is not None and sig in (signal.SIGTERM, signal.SIGINT):
            # Readiness and admission flip here and now (a flag write is signal-safe): with uvloop the
            # loop may otherwise answer requests that arrived with the signal before the drain task runs.
            self.engine.lifecycle.begin_drain()
            # A signal handler may interrupt the loop anywhere: hand over through the thread-safe door.
            self._loop.call_soon_threadsafe(self._start_drain)
            return
        super().handle_exit(sig, frame)

    def _start_drain(self) -> None:
        if self._drain is None:
            self._drain = asyncio.get_running_loop().create_task(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        if not self.started:
            # Still in start-up, waiting for the engine's welcome, and uvicorn looks at should_exit
            # only once started: the signal would wait out that wait (up to ENGINE_WAIT_S) for an
            # engine that may never come. Nothing was accepted yet, so nothing is lost by leaving
            # at once; unwinding instead would cancel uvicorn's lifespan task, which logs that as
            # an error.
            logger.info("stopping before serving: the engine had not welcomed this front-end yet")
            logging.shutdown()  # writes what the log writer holds: os._exit runs no atexit
            os._exit(0)
        logger.info("draining: %d request(s) in flight, grace %.1f s", self.engine.lifecycle.in_flight, self.grace_s)
        drained = await self.engine.drain(self.grace_s)
        logger.info("drained" if drained else "drain grace passed; exiting with requests in flight")
        self.should_exit = True


def main() -> int:
    boot = read_boot()
    settings, manifest, layout = boot.typed()
    configure_logging(settings.log_level, settings.log_format, boot.name)
    metrics = FrontendMetrics()
    decoder = Decoder.from_settings(manifest.preprocessing, settings)
    decoder.warm_up()
    lifecycle = Lifecycle(
        settings.retry_after_s, metrics.rejections.labels(reason="draining").inc, metrics.in_flight.set
    )
    engine = EngineClient(
        Ring(layout, boot.ring_fd),
        boot.partition,
        boot.engine_address,
        settings,
        decoder,
        lifecycle,
        metrics,
        lambda engine_pid, images, late_s: report(boot.status_fd, stalled=engine_pid, images=images, late_s=late_s),
    )

    def ready(info: EngineInfo) -> None:
        report(boot.status_fd, ready=True, provider=info.provider)

    app = create_app(settings, manifest, engine, metrics, boot.metrics_dir, ready)
    config = uvicorn.Config(
        app,
        http=HttpProtocol.bounded(settings.max_header_bytes, settings.header_timeout_s, app.count_refused),
        log_level=settings.log_level,
        log_config=None,  # keep our handlers: uvicorn's own would replace them
        proxy_headers=True,
        forwarded_allow_ips=settings.forwarded_allow_ips,
        timeout_graceful_shutdown=int(settings.drain_grace_s) + 1,
        timeout_keep_alive=settings.keep_alive_s,
        access_log=False,
    )
    listener = socket.socket(fileno=boot.listen_fd)
    # A failed start-up (the engine never welcomed us) is logged by uvicorn, which exits with status 3.
    DrainingServer(config, engine, settings.drain_grace_s).run(sockets=[listener])
    return 0


if __name__ == "__main__":
    sys.exit(main())
