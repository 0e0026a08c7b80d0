"""Optional API keys for inference routes: `Authorization: Bearer <key>` or `X-API-Key: <key>`."""

from __future__ import annotations

import hmac

from fastapi import Request

from service.errors import Unauthorized


def presented_key(request: Request) -> str | None:
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials:
        return credentials.strip()
    return request.headers.get("x-api-key")


def key_is_valid(presented: str, keys: list[str]) -> bool:
    # Compare against every key, without stopping early: the time taken tells nothing about
    # which key, or how much of one, matched.
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(presented.encode(), key.encode())
    return matched


def check_api_key(request: Request) -> None:
    """401 unless VIT_API_KEYS is empty or the request presents one of them. Keys are never logged."""
    keys = request.app.state.frontend.settings.api_key_list
    if not keys:
        return
    presented = presented_key(request)
    if presented is None or not key_is_valid(presented, keys):
        raise Unauthorized("a valid API key is required: Authorization: Bearer <key>, or X-API-Key: <key>")


async def require_api_key(request: Request) -> None:
    """The same check as a FastAPI dependency, for routes off the hot path (/metrics)."""
    check_api_key(request)
