"""Turn a /classify or /embed request body into named image uploads, within the body's budget.

Accepted: multipart/form-data with repeatable `file` parts; a raw body with an `image/*` or
`application/octet-stream` type; or JSON `{"images": ["<base64>", ...]}`. Multipart parsing stops
at the first part past a limit (images, other fields, a part's header size), so a body of a
hundred thousand tiny parts costs no more than the first few.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from python_multipart.multipart import parse_options_header
from starlette.requests import Request

from service.errors import BadRequest, NoImage, PayloadTooLarge, UnsupportedMediaType
from service.frontend.body import (
    BodyClock,
    BodyLimits,
    decode_base64,
    last_line_of_defence,
    load_json,
    read_body,
    read_json_body,
    stream,
)
from service.frontend.multipart import MultipartReader

FILE_FIELD = "file"
ACCEPTED_TYPES = "multipart/form-data, image/*, application/octet-stream or application/json"


@dataclass(frozen=True)
class Upload:
    name: str  # the part's filename, or a position such as "images[2]"
    data: bytes


# Told of each image as a streamed body yields it: how many so far, and the body's bytes up to the
# end of the last image with any (0 while none has); raises to stop reading.
OnImage = Callable[[int, int], None]


class _FileParts:
    """Collects the `file` parts as the reader completes them, counting everything against the limits."""

    def __init__(self, limits: BodyLimits, on_image: OnImage) -> None:
        self.limits = limits
        self.on_image = on_image
        self.uploads: list[Upload] = []
        self.fields = 0
        # The body's bytes up to the end of the last image with any: empty images tell admission
        # nothing about the size of the rest.
        self.through = 0

    def add(self, headers: dict[bytes, bytes], data: bytes, through: int) -> None:
        _, options = parse_options_header(headers.get(b"content-disposition", b""))
        if options.get(b"name") == FILE_FIELD.encode():
            position = len(self.uploads)
            name = options.get(b"filename", b"").decode("utf-8", "replace") or f"{FILE_FIELD}[{position}]"
            self.uploads.append(Upload(name, data))
            self.limits.check_images(len(self.uploads))
            self.through = through if data else self.through
            self.on_image(len(self.uploads), self.through)
        else:
            self.fields += 1
            if self.fields > self.limits.max_form_fields:
                raise PayloadTooLarge(
                    f"more than {self.limits.max_form_fields} multipart fields besides {FILE_FIELD!r}"
                )


async def _read_multipart(
    request: Request, params: dict[bytes, bytes], limits: BodyLimits, on_image: OnImage, clock: BodyClock
) -> list[Upload]:
    boundary = params.get(b"boundary")
    if not boundary:
        raise BadRequest("multipart/form-data without a boundary parameter")
    parts = _FileParts(limits, on_image)
    reader = MultipartReader(boundary, limits.max_part_header_bytes, parts.add)
    async for chunk in stream(request, limits.max_bytes, clock):
        reader.write(chunk)
    reader.close()
    if not parts.uploads:
        raise NoImage(f"multipart body has no part named {FILE_FIELD!r}")
    return parts.uploads


def _decode_json(body: bytes, limits: BodyLimits) -> list[Upload]:
    payload = load_json(body, limits, "the body")
    images = payload.get("images") if isinstance(payload, dict) else None
    if not isinstance(images, list) or not all(isinstance(item, str) for item in images):
        raise BadRequest('JSON body must be {"images": ["<base64>", ...]}')
    limits.check_images(len(images))
    return [Upload(f"images[{i}]", decode_base64(text, f"images[{i}]")) for i, text in enumerate(images)]


async def read_uploads(request: Request, limits: BodyLimits, on_image: OnImage, clock: BodyClock) -> list[Upload]:
    """The request's images, in order; typed errors for every way a body can be wrong. Multipart
    bodies call `on_image` as each image arrives; the others are counted when they are whole.
    `clock` is told of the body's bytes as they arrive."""
    media_type, params = parse_options_header(request.headers.get("content-type", ""))
    media = media_type.decode("latin-1").lower()
    with last_line_of_defence():
        if media == "multipart/form-data":
            uploads = await _read_multipart(request, params, limits, on_image, clock)
        elif media == "application/json":
            json_limits = limits.for_encoded_images()
            uploads = _decode_json(await read_json_body(request, json_limits, "the body", clock), json_limits)
        elif media.startswith("image/") or media == "application/octet-stream":
            uploads = [Upload("body", await read_body(request, limits.max_bytes, clock))]
        elif not media:
            if not await read_body(request, limits.max_bytes, clock):
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


# The bodies read_uploads accepts, as the OpenAPI document shows them.
_BINARY = {"schema": {"type": "string", "format": "binary"}}
OPENAPI_REQUEST_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {"file": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                "required": ["file"],
            }
        },
        "image/jpeg": _BINARY,
        "image/png": _BINARY,
        "image/webp": _BINARY,
        "application/octet-stream": _BINARY,
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {"images": {"type": "array", "items": {"type": "string", "format": "byte"}}},
                "required": ["images"],
            },
        },
    },
}
