"""GET /: a static demo page (no build step, no CDN): upload an image, see top-5 and the heat map."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

router = APIRouter(tags=["demo"])
PAGE = Path(__file__).resolve().parents[2] / "static" / "index.html"


@router.get("/", include_in_schema=False)
async def demo_page() -> FileResponse:
    return FileResponse(PAGE, media_type="text/html")
