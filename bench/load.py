"""Closed-loop HTTP load against a loopback server, and the server's memory as it goes."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx


@dataclass(frozen=True)
class Outcome:
    started: float  # monotonic seconds
    status: int  # 0 when the request failed without an HTTP answer
    latency_s: float


def rss_mb(pid: int) -> float:
    """Resident memory of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def closed_loop(
    url: str,
    send: Callable[[httpx.Client], httpx.Response],
    clients: int,
    duration_s: float,
    on_tick: Callable[[], None] | None = None,
    tick_s: float = 0.5,
) -> list[Outcome]:
    """`clients` threads each send, wait, and send again until duration_s has passed.

    on_tick runs every tick_s in the calling thread meanwhile (for sampling memory)."""
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + duration_s

    def loop() -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            while (now := time.monotonic()) < stop_at:
                started = time.perf_counter()
                try:
                    status = send(client).status_code
                except httpx.HTTPError:
                    status = 0
                with lock:
                    outcomes.append(Outcome(now, status, time.perf_counter() - started))

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads):
        if on_tick is not None:
            on_tick()
        time.sleep(tick_s)  # a sampling interval
    for thread in threads:
        thread.join()
    return outcomes


def multipart_upload(
    url: str, path: str, images: list[bytes], content_type: str = "image/jpeg", names: list[str] | None = None
) -> bytes:
    """One complete keep-alive HTTP/1.1 request uploading `images`, each as a form field `file`
    (or as its own field of `names`)."""
    boundary = b"vit-bench-boundary"
    fields = names or ["file"] * len(images)
    part_heads = [
        b'Content-Disposition: form-data; name="'
        + name.encode()
        + b'"; filename="image"\r\n'
        + b"Content-Type: "
        + content_type.encode()
        + b"\r\n\r\n"
        for name in fields
    ]
    body = b"".join(
        b"--" + boundary + b"\r\n" + head + image + b"\r\n" for head, image in zip(part_heads, images, strict=True)
    )
    body += b"--" + boundary + b"--\r\n"
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {urlsplit(url).netloc}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary.decode()}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def read_answer(reader: asyncio.StreamReader) -> int:
    """One HTTP/1.1 answer with a Content-Length, read whole; its status."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = next(int(v) for k, _, v in (line.partition(":") for line in lines) if k.lower() == "content-length")
    await reader.readexactly(length)
    return int(lines[0].split()[1])


async def _send_until(host: str, port: int, request: bytes, stop_at: float, outcomes: list[Outcome]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while (now := time.monotonic()) < stop_at:
            started = time.perf_counter()
            writer.write(request)
            status = await read_answer(reader)
            outcomes.append(Outcome(now, status, time.perf_counter() - started))
    finally:
        writer.close()


def wire_closed_loop(url: str, request: bytes, clients: int, duration_s: float) -> list[Outcome]:
    """The bench's load generator: `clients` keep-alive connections replaying prebuilt request bytes.

    On a 2-core machine the client shares the server's cores, so it must cost little per request:
    no HTTP library, no threads, one event loop (tens of microseconds a request, not a millisecond)."""
    parts = urlsplit(url)
    outcomes: list[Outcome] = []

    async def run() -> None:
        stop_at = time.monotonic() + duration_s
        await asyncio.gather(
            *(
                _send_until(parts.hostname or "127.0.0.1", parts.port or 80, request, stop_at, outcomes)
                for _ in range(clients)
            )
        )

    asyncio.run(run())
    return outcomes
