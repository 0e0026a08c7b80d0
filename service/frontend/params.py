"""The inference routes' query and header parameters, read from the request by hand.

FastAPI's declared parameters and dependencies cost about 50 µs each per request and its route
about 100 µs more (measured: 290 µs against 100 µs for a route that takes only the request), a
tenth of a request's whole budget on this service's hot path. So those routes take the bare
request, read their parameters here with the same rules and 422s, and document them below.
"""

from __future__ import annotations

import time

from starlette.requests import Request

from service.errors import InvalidParameter
from service.settings import Settings

# What pydantic accepts for a boolean, as FastAPI would have parsed it.
_TRUE = {"1", "true", "t", "yes", "y", "on"}
_FALSE = {"0", "false", "f", "no", "n", "off"}
TIMEOUT_HEADER = "x-request-timeout"


def top_k(request: Request, classes: int, default: int) -> int:
    """Labels per image: the query's `top_k`, 1 ... classes, else the default (capped at classes)."""
    text = request.query_params.get("top_k")
    if text is None:
        return min(default, classes)
    try:
        k = int(text)
    except ValueError:
        k = 0
    if not 1 <= k <= classes:
        raise InvalidParameter(f"top_k must be a whole number between 1 and {classes}, the number of classes")
    return k


def flag(request: Request, name: str) -> bool:
    text = request.query_params.get(name)
    if text is None or text.lower() in _FALSE:
        return False
    if text.lower() in _TRUE:
        return True
    raise InvalidParameter(f"{name} must be true or false, not {text!r}")


def deadline(request: Request, settings: Settings) -> float:
    """time.monotonic() by which the answer is due: `X-Request-Timeout` seconds, capped by
    VIT_REQUEST_TIMEOUT_S. The engine, in another process, reads the same clock."""
    limit = settings.request_timeout_s
    text = request.headers.get(TIMEOUT_HEADER)
    if text is None:
        return time.monotonic() + limit
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0:  # written so that NaN fails too
        raise InvalidParameter(f"{TIMEOUT_HEADER} must be a number of seconds above 0, not {text!r}")
    return time.monotonic() + min(seconds, limit)


def _query(name: str, schema: dict[str, object], description: str) -> dict[str, object]:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


TOP_K = _query("top_k", {"type": "integer", "minimum": 1}, "labels per image, up to the number of classes")
EXPLAIN = _query("explain", {"type": "boolean", "default": False}, "also return where the [class] token looked")
NORMALIZE = _query("normalize", {"type": "boolean", "default": False}, "scale each embedding to unit L2 norm")
REQUEST_TIMEOUT = {
    "name": TIMEOUT_HEADER,
    "in": "header",
    "required": False,
    "schema": {"type": "number", "exclusiveMinimum": 0},
    "description": "seconds this client will wait; capped by VIT_REQUEST_TIMEOUT_S",
}
