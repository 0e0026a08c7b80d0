"""Turn a /classify or /embed request body into named image uploads, within the body's budget.

Accepted: multipart/form-data with repeatable `file` parts; a raw body with an `image/*` or
`application/octet-stream` type; or JSON `{"images": ["<base64>", ...]}`. Multipart parsing stops
at the first part past a limit (images, other fields, a part's header size), so a body of a
hundred thousand tiny parts costs no more than the first few.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from service.errors import BadRequest, NoImage, PayloadTooLarge, UnsupportedMediaType
from service.frontend.body import BodyLimits, decode_base64, last_line_of_defence, load_json, read_body, stream

FILE_FIELD = "file"
ACCEPTED_TYPES = "multipart/form-data, image/*, application/octet-stream or application/json"


@dataclass(frozen=True)
class Upload:
    name: str  # the part's filename, or a position such as "images[2]"
    data: bytes


# Told of each image as a streamed body yields it: how many so far, and the body's bytes up to the
# end of the last; raises to stop reading.
OnImage = Callable[[int, int], None]


class _Multipart:
    """python-multipart's callbacks, collecting `file` parts and counting everything against the limits."""

    def __init__(self, boundary: bytes, limits: BodyLimits, on_image: OnImage) -> None:
        self.limits = limits
        self.on_image = on_image
        self.uploads: list[Upload] = []
        self.read = 0  # body bytes written before the current chunk
        self._through = 0  # body bytes up to the end of the current part's data
        self.fields = 0
        self.ended = False
        self._headers: dict[bytes, bytes] = {}
        self._header_bytes = 0
        self._field, self._value, self._data = bytearray(), bytearray(), bytearray()
        self.parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._begin,
                "on_header_field": self._header_field,
                "on_header_value": self._header_value,
                "on_header_end": self._header_end,
                "on_part_data": self._part_data,
                "on_part_end": self._part_end,
                "on_end": self._end,
            },
        )

    def _begin(self) -> None:
        self._header_bytes = 0

    def _count_header(self, size: int) -> None:
        self._header_bytes += size
        if self._header_bytes > self.limits.max_part_header_bytes:
            raise BadRequest(f"a multipart part's headers exceed {self.limits.max_part_header_bytes} bytes")

    def _header_field(self, buf: bytes, start: int, end: int) -> None:
        self._count_header(end - start)
        self._field.extend(buf[start:end])

    def _header_value(self, buf: bytes, start: int, end: int) -> None:
        self._count_header(end - start)
        self._value.extend(buf[start:end])

    def _header_end(self) -> None:
        self._headers[bytes(self._field).lower()] = bytes(self._value)
        self._field.clear()
        self._value.clear()

    def write(self, chunk: bytes) -> None:
        self.parser.write(chunk)
        self.read += len(chunk)

    def _part_data(self, buf: bytes, start: int, end: int) -> None:
        self._data.extend(buf[start:end])
        self._through = self.read + end

    def _part_end(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        if options.get(b"name") == FILE_FIELD.encode():
            position = len(self.uploads)
            name = options.get(b"filename", b"").decode("utf-8", "replace") or f"{FILE_FIELD}[{position}]"
            self.uploads.append(Upload(name, bytes(self._data)))
            self.limits.check_images(len(self.uploads))
            self.on_image(len(self.uploads), self._through)
        else:
            self.fields += 1
            if self.fields > self.limits.max_form_fields:
                raise PayloadTooLarge(
                    f"more than {self.limits.max_form_fields} multipart fields besides {FILE_FIELD!r}"
                )
        self._headers.clear()
        self._data.clear()

    def _end(self) -> None:
        self.ended = True


async def _read_multipart(
    request: Request, params: dict[bytes, bytes], limits: BodyLimits, on_image: OnImage
) -> list[Upload]:
    boundary = params.get(b"boundary")
    if not boundary:
        raise BadRequest("multipart/form-data without a boundary parameter")
    form = _Multipart(boundary, limits, on_image)
    try:
        async for chunk in stream(request, limits.max_bytes):
            form.write(chunk)
        form.parser.finalize()
    except ValueError as exc:  # python-multipart's parse errors derive from ValueError
        raise BadRequest(f"malformed multipart body: {exc}") from None
    if not form.ended:
        raise BadRequest("multipart body ended before its closing boundary")
    if not form.uploads:
        raise NoImage(f"multipart body has no part named {FILE_FIELD!r}")
    return form.uploads


def _decode_json(body: bytes, limits: BodyLimits) -> list[Upload]:
    payload = load_json(body, limits, "the body")
    images = payload.get("images") if isinstance(payload, dict) else None
    if not isinstance(images, list) or not all(isinstance(item, str) for item in images):
        raise BadRequest('JSON body must be {"images": ["<base64>", ...]}')
    limits.check_images(len(images))
    return [Upload(f"images[{i}]", decode_base64(text, f"images[{i}]")) for i, text in enumerate(images)]


async def read_uploads(request: Request, limits: BodyLimits, on_image: OnImage) -> list[Upload]:
    """The request's images, in order; typed errors for every way a body can be wrong. Multipart
    bodies call `on_image` as each image arrives; the others are counted when they are whole."""
    media_type, params = parse_options_header(request.headers.get("content-type", ""))
    media = media_type.decode("latin-1").lower()
    with last_line_of_defence():
        if media == "multipart/form-data":
            uploads = await _read_multipart(request, params, limits, on_image)
        elif media == "application/json":
            uploads = _decode_json(await read_body(request, limits.max_bytes), limits)
        elif media.startswith("image/") or media == "application/octet-stream":
            uploads = [Upload("body", await read_body(request, limits.max_bytes))]
        elif not media:
            if not await read_body(request, limits.max_bytes):
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
