"""Turn a /classify request body into named image uploads, enforcing size limits while reading.

Accepted: multipart/form-data with repeatable `file` parts; a raw body with an `image/*` or
`application/octet-stream` type; or JSON `{"images": ["<base64>", ...]}`.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from service.errors import BadRequest, NoImage, PayloadTooLarge, TooManyImages, UnsupportedMediaType

FILE_FIELD = "file"
ACCEPTED_TYPES = "multipart/form-data, image/*, application/octet-stream or application/json"


@dataclass(frozen=True)
class Upload:
    name: str  # the part's filename, or a position such as "images[2]"
    data: bytes


async def _limited_stream(request: Request, max_bytes: int) -> AsyncIterator[bytes]:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLarge(f"request body is {declared} bytes; the limit is {max_bytes}")
    total = 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > max_bytes:  # chunked uploads declare no length: stop as soon as it is exceeded
                raise PayloadTooLarge(f"request body exceeds the limit of {max_bytes} bytes")
            yield chunk
    except ClientDisconnect:
        raise BadRequest("the client closed the connection before the body was complete") from None


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The whole body, refused with 413 as soon as it passes max_bytes."""
    return b"".join([chunk async for chunk in _limited_stream(request, max_bytes)])


def _check_count(count: int, max_images: int) -> None:
    if count > max_images:
        raise TooManyImages(f"{count} images in one request; the limit is {max_images}")


async def _read_multipart(
    request: Request, params: dict[bytes, bytes], max_bytes: int, max_images: int
) -> list[Upload]:
    boundary = params.get(b"boundary")
    if not boundary:
        raise BadRequest("multipart/form-data without a boundary parameter")
    uploads: list[Upload] = []
    headers: dict[bytes, bytes] = {}
    field, value = bytearray(), bytearray()
    data = bytearray()
    ended = False

    def on_header_field(buf: bytes, start: int, end: int) -> None:
        field.extend(buf[start:end])

    def on_header_value(buf: bytes, start: int, end: int) -> None:
        value.extend(buf[start:end])

    def on_header_end() -> None:
        headers[bytes(field).lower()] = bytes(value)
        field.clear()
        value.clear()

    def on_part_data(buf: bytes, start: int, end: int) -> None:
        data.extend(buf[start:end])

    def on_part_end() -> None:
        _, options = parse_options_header(headers.get(b"content-disposition", b""))
        if options.get(b"name") == FILE_FIELD.encode():
            position = len(uploads)
            name = options.get(b"filename", b"").decode("utf-8", "replace") or f"{FILE_FIELD}[{position}]"
            uploads.append(Upload(name, bytes(data)))
            _check_count(len(uploads), max_images)
        headers.clear()
        data.clear()

    def on_end() -> None:
        nonlocal ended
        ended = True

    parser = MultipartParser(
        boundary,
        {
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
            "on_end": on_end,
        },
    )
    try:
        async for chunk in _limited_stream(request, max_bytes):
            parser.write(chunk)
        parser.finalize()
    except ValueError as exc:  # python-multipart's parse errors derive from ValueError
        raise BadRequest(f"malformed multipart body: {exc}") from None
    if not ended:
        raise BadRequest("multipart body ended before its closing boundary")
    if not uploads:
        raise NoImage(f"multipart body has no part named {FILE_FIELD!r}")
    return uploads


def _decode_json(body: bytes, max_images: int) -> list[Upload]:
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"body is not valid JSON: {exc}") from None
    images = payload.get("images") if isinstance(payload, dict) else None
    if not isinstance(images, list) or not all(isinstance(item, str) for item in images):
        raise BadRequest('JSON body must be {"images": ["<base64>", ...]}')
    _check_count(len(images), max_images)
    uploads = []
    for position, encoded in enumerate(images):
        if "," in encoded[:100] and encoded.startswith("data:"):
            encoded = encoded.split(",", 1)[1]  # accept data: URLs as browsers produce them
        try:
            uploads.append(Upload(f"images[{position}]", base64.b64decode(encoded, validate=True)))
        except (binascii.Error, ValueError):
            raise BadRequest("not valid base64", part=f"images[{position}]") from None
    return uploads


async def read_uploads(request: Request, *, max_bytes: int, max_images: int) -> list[Upload]:
    """The request's images, in order; typed errors for every way a body can be wrong."""
    raw_type = request.headers.get("content-type", "")
    media_type, params = parse_options_header(raw_type)
    media = media_type.decode("latin-1").lower()
    if media == "multipart/form-data":
        uploads = await _read_multipart(request, params, max_bytes, max_images)
    elif media == "application/json":
        uploads = _decode_json(await read_body(request, max_bytes), max_images)
    elif media.startswith("image/") or media == "application/octet-stream":
        uploads = [Upload("body", await read_body(request, max_bytes))]
    elif not media:
        if not await read_body(request, max_bytes):
            raise NoImage(f"empty request: send an image as {ACCEPTED_TYPES}")
        raise UnsupportedMediaType(f"no Content-Type; use {ACCEPTED_TYPES}")
    else:
        raise UnsupportedMediaType(f"Content-Type {media!r} is not accepted; use {ACCEPTED_TYPES}")
    if not uploads:
        raise NoImage('no images in the request ({"images": []})')
    for upload in uploads:
        if not upload.data:
            raise NoImage("empty image", part=upload.name)
    return uploads
