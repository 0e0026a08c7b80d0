"""Hostile request bodies, as raw HTTP: what each should be answered, and what each costs the server.

The same cases drive the test suite (every case a 4xx with its documented error_type, the
server still serving) and `vit-bench hostile` (the server's CPU per hostile request, against one
ordinary classification's).
"""

from __future__ import annotations

import contextlib
import io
import json
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from bench.cpu import process_tree_cpu_seconds
from bench.load import multipart_upload
from bench.server import run_server
from model_export.manifest import Manifest

BOUNDARY = "hostile"


@dataclass(frozen=True)
class Hostile:
    name: str
    build: Callable[[], bytes]  # the whole HTTP/1.1 request
    status: int
    error_type: str


def _request(path: str, body: bytes, content_type: str, extra: str = "") -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: {content_type}\r\n{extra}"
    return f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body


def _json(path: str, body: bytes) -> bytes:
    return _request(path, body, "application/json")


def _multipart(parts: bytes, close: bool = True) -> bytes:
    body = parts + (f"--{BOUNDARY}--\r\n".encode() if close else b"")
    return _request("/classify", body, f"multipart/form-data; boundary={BOUNDARY}")


def _fields(count: int, name: str = "field", filename: str | None = None) -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    return f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\nx\r\n".encode() * count


def _oip(model: str, inputs: list[dict[str, object]]) -> bytes:
    return _json(f"/v2/models/{model}/infer", json.dumps({"inputs": inputs}).encode())


def _empty_file_parts(count: int) -> bytes:
    part = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="e"\r\n\r\n\r\n'.encode()
    return _multipart(part * count)


def _jpeg_of_many_scans(repeats: int) -> bytes:
    """A progressive JPEG whose last scan comes `repeats` times over: each would be decoded over
    the whole image, which is what a file crafted to the format's 2,000-odd scans costs."""
    buffer = io.BytesIO()
    Image.new("RGB", (256, 256), (90, 120, 150)).save(buffer, "JPEG", progressive=True)
    data = buffer.getvalue()
    last_scan = data[data.rindex(b"\xff\xda") : -2]  # up to the end-of-image marker
    return _request("/classify", data[:-2] + last_scan * repeats + data[-2:], "image/jpeg")


def _flat_webp(width: int, height: int) -> bytes:
    """A lossless WebP of one colour: a few hundred bytes for millions of pixels to decode."""
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (90, 120, 150)).save(buffer, "WEBP", lossless=True)
    return _request("/classify", buffer.getvalue(), "image/webp")


def _raw_headers(lines: str, body: bytes = b"") -> bytes:
    return f"POST /classify HTTP/1.1\r\nHost: localhost\r\nContent-Type: image/png\r\n{lines}\r\n".encode() + body


def cases(manifest: Manifest) -> list[Hostile]:
    """Every case, for the model the server runs: the OIP ones name it and use its input's shape."""
    model, prep = manifest.name, manifest.preprocessing
    row = [prep.channels, prep.image_size, prep.image_size]
    values = prep.channels * prep.image_size**2
    return [
        Hostile(
            "nested JSON, /classify", lambda: _json("/classify", b"[" * 50_000 + b"]" * 50_000), 400, "bad_request"
        ),
        Hostile(
            "nested JSON, /v2 infer",
            lambda: _json(f"/v2/models/{model}/infer", b'{"inputs": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"),
            400,
            "bad_request",
        ),
        Hostile(
            "2M empty strings, /classify",
            lambda: _json("/classify", b'{"images": [' + b'"",' * 2_000_000 + b'""]}'),
            413,
            "payload_too_large",
        ),
        Hostile(
            "2M empty strings, /v2 infer",
            lambda: _json(
                f"/v2/models/{model}/infer",
                b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ['
                + b'"",' * 2_000_000
                + b'""]}]}',
            ),
            413,
            "payload_too_large",
        ),
        Hostile("100k multipart fields", lambda: _multipart(_fields(100_000)), 413, "payload_too_large"),
        Hostile("300k multipart fields", lambda: _multipart(_fields(300_000)), 413, "payload_too_large"),
        Hostile("100k empty file parts", lambda: _empty_file_parts(100_000), 413, "too_many_images"),
        Hostile(
            "1 MB part header",
            lambda: _multipart(
                _fields(1, "file").replace(b"\r\n\r\n", b"\r\nX-Pad: " + b"a" * 1_000_000 + b"\r\n\r\n")
            ),
            400,
            "bad_request",
        ),
        Hostile("a JPEG of 10,000 scans", lambda: _jpeg_of_many_scans(10_000), 413, "image_too_large"),
        Hostile("a flat 12 MP WebP", lambda: _flat_webp(4000, 3000), 413, "image_too_large"),
        Hostile(
            "a boundary that never closes",
            lambda: _multipart(_fields(1, "file", "a.png") + b"\x89PNG" * 250_000, close=False),
            400,
            "bad_request",
        ),
        Hostile(
            "two different Content-Lengths",
            lambda: _raw_headers("Content-Length: 4\r\nContent-Length: 5\r\n", b"abcde"),
            400,
            "bad_request",
        ),
        Hostile(
            "Content-Length and Transfer-Encoding",
            lambda: _raw_headers("Content-Length: 4\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n"),
            400,
            "bad_request",
        ),
        Hostile(
            "a 4 MB request header",
            lambda: _raw_headers("X-Pad: " + "a" * 4_000_000 + "\r\n"),
            431,
            "headers_too_large",
        ),
        Hostile(
            "two Transfer-Encodings",
            lambda: _raw_headers("Transfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n", b"0\r\n\r\n"),
            400,
            "bad_request",
        ),
        Hostile(
            "invalid UTF-8 in JSON", lambda: _json("/classify", b'{"images": ["\xff\xfe\xfa"]}'), 400, "bad_request"
        ),
        Hostile(
            "OIP: FP32 data for a BYTES input",
            lambda: _oip(model, [{"name": "image", "datatype": "FP32", "shape": [1], "data": [1.0]}]),
            400,
            "bad_request",
        ),
        Hostile(
            "OIP: shape that does not match the data",
            lambda: _oip(
                model, [{"name": "pixel_values", "datatype": "FP32", "shape": [2, *row], "data": [0.0] * values}]
            ),
            400,
            "bad_request",
        ),
        Hostile(
            "OIP: a shape with a billion images",
            lambda: _oip(model, [{"name": "image", "datatype": "BYTES", "shape": [1_000_000_000], "data": []}]),
            413,
            "too_many_images",
        ),
        Hostile(
            "OIP: strings in an FP32 tensor",
            lambda: _oip(
                model, [{"name": "pixel_values", "datatype": "FP32", "shape": [1, *row], "data": [["x"] * values]}]
            ),
            400,
            "bad_request",
        ),
    ]


def send(url: str, request: bytes, timeout: float = 60.0) -> tuple[int, dict[str, object]]:
    """Send raw bytes, read one response; (status, JSON body). The server may answer (and close)
    before the body is complete, which is the point: then what it said is read all the same."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(request)
        reader = sock.makefile("rb")
        status = int(reader.readline().split(b" ", 2)[1])
        length = 0
        while (line := reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        body = reader.read(length)
    return status, json.loads(body) if body else {}


@dataclass(frozen=True)
class HostileCost:
    name: str
    status: int
    error_type: str
    cpu_ms: float  # the server's CPU per request, every process


def measure(model_dir: Path, ordinary: bytes, repeats: int) -> tuple[float, list[HostileCost]]:
    """CPU per ordinary classification (one upload), then per request of each hostile case."""
    with run_server(model_dir) as server:
        pid = server.process.pid

        def cost(request: bytes, times: int) -> tuple[float, int, dict[str, object]]:
            time.sleep(0.2)  # let the previous case's work settle before sampling
            before = process_tree_cpu_seconds(pid)
            for _ in range(times):
                status, body = send(server.url, request)
            time.sleep(0.2)
            return 1000 * (process_tree_cpu_seconds(pid) - before) / times, status, body

        baseline_request = multipart_upload(server.url, "/classify", [ordinary]).replace(
            b"HTTP/1.1\r\n", b"HTTP/1.1\r\nConnection: close\r\n", 1
        )
        cost(baseline_request, 20)  # warm the path
        ordinary_ms, status, _ = cost(baseline_request, repeats * 5)
        if status != 200:
            raise RuntimeError(f"an ordinary classification answered {status}")
        costs = []
        for case in cases(Manifest.read(model_dir)):
            request = case.build()
            cpu_ms, status, body = cost(request, repeats)
            costs.append(HostileCost(case.name, status, str(body.get("error_type")), cpu_ms))
        server.stop()
    return ordinary_ms, costs
