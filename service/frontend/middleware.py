"""Per-request context: the request ID, the metrics by route and status, one access-log line (with
the trace ID when the request is traced)."""

from __future__ import annotations

import itertools
import logging
import os
import re
import time

from prometheus_client import Counter, Histogram
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.logs import current_trace_id, request_id
from service.metrics import FrontendMetrics

logger = logging.getLogger("service.access")
REQUEST_ID_HEADER = "x-request-id"
# Accept a caller's ID only if it is short and plain, so nothing odd reaches logs or headers.
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_QUIET_ROUTES = {"/livez", "/readyz", "/startupz", "/metrics", "/v2/health/live", "/v2/health/ready"}


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, metrics: FrontendMetrics) -> None:
        self.app = app
        self.metrics = metrics
        # Generated IDs: a random per-process prefix and a counter, as unique across replicas as
        # uuid4 but without a urandom syscall per request (12% of the event loop under overload).
        self._id_prefix = os.urandom(8).hex()
        self._id_counter = itertools.count()
        # Each (route, status) pair's request counter and latency histogram, looked up once:
        # prometheus-client's labels() builds and checks its key under a lock on every call.
        self._series: dict[tuple[str, int], tuple[Counter, Histogram]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        offered = dict(scope["headers"]).get(REQUEST_ID_HEADER.encode(), b"").decode("latin-1")
        rid = offered if _SAFE_ID.match(offered) else f"{self._id_prefix}{next(self._id_counter):016x}"
        token = request_id.set(rid)
        status = 500
        trace_id = None
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status, trace_id
            if message["type"] == "http.response.start":
                status = message["status"]
                trace_id = current_trace_id()  # the request's span is current here, and gone by the access line
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = rid
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            # The route template, not the raw path, keeps label cardinality bounded.
            route = getattr(scope.get("route"), "path", "unmatched")
            elapsed = time.perf_counter() - started
            requests, seconds = self._series.get((route, status)) or self._new_series(route, status)
            requests.inc()
            seconds.observe(elapsed)
            if route not in _QUIET_ROUTES:
                logger.info(
                    "request",
                    extra={
                        "method": scope["method"],
                        "route": route,
                        "status": status,
                        "duration_ms": round(elapsed * 1000, 2),
                        "client": (scope.get("client") or ("?",))[0],
                        "trace_id": trace_id,
                    },
                )
            request_id.reset(token)

    def count_refused(self, status: int, client: str | None) -> None:
        """A request the HTTP protocol answered itself (malformed, or a head too large or too slow),
        which never became an ASGI call: counted and logged as one that matched no route."""
        requests, _ = self._series.get(("unmatched", status)) or self._new_series("unmatched", status)
        requests.inc()
        logger.info("request", extra={"route": "unmatched", "status": status, "client": client or "?"})

    def _new_series(self, route: str, status: int) -> tuple[Counter, Histogram]:
        labels = {"route": route, "status": str(status)}
        series = self.metrics.requests.labels(**labels), self.metrics.request_seconds.labels(**labels)
        self._series[(route, status)] = series
        return series
