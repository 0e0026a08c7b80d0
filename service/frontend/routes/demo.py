"""GET /: a static demo page (no build step, no CDN): upload an image, see top-5 and the heat map."""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import Response

router = APIRouter(tags=["demo"])
PAGE = Path(__file__).resolve().parents[2] / "static" / "index.html"


def _headers(page: bytes) -> dict[str, str]:
    """The page may run its own script only (by hash), talk only to this server, and not be framed."""
    (script,) = re.findall(rb"<script>(.*?)</script>", page, re.DOTALL)
    digest = base64.b64encode(hashlib.sha256(script).digest()).decode()
    policy = (
        f"default-src 'none'; script-src 'sha256-{digest}'; style-src 'unsafe-inline'; "
        "img-src blob: data:; connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
    )
    return {"Content-Security-Policy": policy, "X-Content-Type-Options": "nosniff"}


@router.get("/", include_in_schema=False)
async def demo_page() -> Response:
    page = PAGE.read_bytes()
    return Response(page, media_type="text/html", headers=_headers(page))
