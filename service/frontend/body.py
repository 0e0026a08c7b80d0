"""Reading request bodies under a budget: what both protocols' parsers share.

Every parser gets a `BodyLimits` and stops as soon as a body crosses one, so the work a hostile
body can cause is bounded by the limits, not by its size. JSON is checked before it is parsed
with C-speed passes (values counted by commas as the body arrives, nesting depth by the brackets
outside strings), so a deep or huge document is refused without building it, or reading all of it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace

import numpy as np
from starlette.requests import ClientDisconnect, Request

from service.errors import BadRequest, ClientDisconnected, PayloadTooLarge, ServiceError, TooManyImages
from service.settings import Settings

logger = logging.getLogger(__name__)

# JSON values any body may hold beside its inputs: room for members the routes ignore.
JSON_SLACK_VALUES = 1024
# Only the four bracket bytes survive; as int8, openers count +1 and closers -1.
_OPEN, _CLOSE = 1, 255
_BRACKETS = bytes(_OPEN if b in b"[{" else _CLOSE if b in b"]}" else 0 for b in range(256))
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


@dataclass(frozen=True)
class BodyLimits:
    max_bytes: int  # the whole body
    max_images: int  # images in one request
    max_form_fields: int  # multipart parts that are not `file`
    max_part_header_bytes: int  # one multipart part's header block
    max_json_depth: int  # nesting of arrays and objects
    max_json_values: int  # array elements and object members, all levels together
    max_json_strings: int  # keys and string values: each image's, and room for members the routes ignore

    @classmethod
    def from_settings(cls, settings: Settings, values_per_image: int) -> BodyLimits:
        """values_per_image: numbers in one already-normalised image (the OIP FP32 input in JSON)."""
        return cls(
            max_bytes=settings.max_body_bytes,
            max_images=settings.max_images_per_request,
            max_form_fields=settings.max_form_fields,
            max_part_header_bytes=settings.max_part_header_bytes,
            # {"inputs": [{"data": [N][C][H][W]}]} is the deepest body either protocol accepts.
            max_json_depth=16,
            max_json_values=settings.max_images_per_request * values_per_image + JSON_SLACK_VALUES,
            max_json_strings=settings.max_images_per_request + JSON_SLACK_VALUES,
        )

    def for_encoded_images(self) -> BodyLimits:
        """These limits for a JSON list of encoded images, whatever the model's input size: each
        image is one value and at most two commas (a data URL holds one)."""
        return replace(self, max_json_values=min(self.max_json_values, 2 * self.max_images + JSON_SLACK_VALUES))

    def check_images(self, count: int) -> None:
        if count > self.max_images:
            raise TooManyImages(f"{count} images in one request; the limit is {self.max_images}")

    def check_json_values(self, commas: int, what: str) -> None:
        # Every value but the last in each array or object is followed by a comma: a bound on the
        # values, counted at C speed without parsing (commas in strings only make it stricter).
        if commas >= self.max_json_values:
            raise PayloadTooLarge(f"{what} holds more than {self.max_json_values} JSON values")


class BodyClock:
    """The time a body has to arrive: its request's deadline and, once a grace has passed, no more
    than its bytes so far take at a minimum rate. A stalled or dripping upload gives back the slots
    admission reserved for it after the grace, not at its deadline. Each chunk moves the one
    timeout that guards the reading (`timeout`) to the earlier of the two."""

    def __init__(self, deadline: float, min_rate: float, grace_s: float) -> None:
        """deadline: time.monotonic(); min_rate: bytes a second, 0 for none."""
        self.deadline = deadline
        self.min_rate = min_rate
        self.grace_s = grace_s
        self._started = time.monotonic()
        due = self._due(0)
        self._rate_first = due < deadline  # whether the timeout is set for the rate, not the deadline
        self.timeout = asyncio.timeout(max(0.0, due - self._started))

    def _due(self, received: int) -> float:
        if not self.min_rate:
            return self.deadline
        return min(self.deadline, self._started + max(self.grace_s, received / self.min_rate))

    def received(self, total: int) -> None:
        """The body's bytes so far."""
        if self.min_rate:
            self._move_to(self._due(total))

    def stop(self) -> None:
        """The body is in: only the deadline applies from here."""
        if self.min_rate:
            self._move_to(self.deadline)

    def rate_ran_out(self) -> bool:
        """Whether the time that ran out was the rate's, not the deadline's."""
        return self._rate_first

    def _move_to(self, due: float) -> None:
        self._rate_first = due < self.deadline
        loop_now = asyncio.get_running_loop().time()  # the timeout counts in the loop's clock
        self.timeout.reschedule(loop_now + due - time.monotonic())


def declared_length(request: Request) -> int | None:
    """The body's Content-Length, if it has a plain one."""
    declared = request.headers.get("content-length")
    return int(declared) if declared is not None and declared.isdigit() else None


async def stream(request: Request, max_bytes: int, clock: BodyClock) -> AsyncIterator[bytes]:
    """The body's chunks, refused with 413 as soon as it passes max_bytes; `clock` is told of each."""
    declared = declared_length(request)
    if declared is not None and declared > max_bytes:
        raise PayloadTooLarge(f"request body is {declared} bytes; the limit is {max_bytes}")
    total = 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > max_bytes:  # chunked uploads declare no length: stop as soon as it is exceeded
                raise PayloadTooLarge(f"request body exceeds the limit of {max_bytes} bytes")
            if total != declared:  # a whole body stops the clock next, anyway
                clock.received(total)
            yield chunk
    except ClientDisconnect:
        raise ClientDisconnected("the client closed the connection before the body was complete") from None


async def read_body(request: Request, max_bytes: int, clock: BodyClock) -> bytes:
    return b"".join([chunk async for chunk in stream(request, max_bytes, clock)])


async def read_json_body(request: Request, limits: BodyLimits, what: str, clock: BodyClock) -> bytes:
    """A JSON body, refused (413) as soon as the part read so far holds too many values: a huge
    document costs what arrived before the count ran out, not its whole size."""
    chunks, commas = [], 0
    async for chunk in stream(request, limits.max_bytes, clock):
        commas += chunk.count(b",")
        limits.check_json_values(commas, what)
        chunks.append(chunk)
    return b"".join(chunks)


def _outside_strings(data: bytes, limits: BodyLimits, what: str) -> bytes:
    """The bytes between a JSON document's strings, whose brackets are its structure. Escapes go
    first, so that every quote left opens or closes a string; each string costs two finds."""
    if b"\\" in data:
        data = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    between, position = [], 0
    for _ in range(limits.max_json_strings + 1):
        start = data.find(b'"', position)
        if start < 0:
            break
        between.append(data[position:start])
        end = data.find(b'"', start + 1)
        position = len(data) if end < 0 else end + 1  # unterminated: json.loads will say so
    else:
        raise PayloadTooLarge(f"{what} holds more than {limits.max_json_strings} JSON strings")
    between.append(data[position:])
    return b"".join(between)


def load_json(data: bytes, limits: BodyLimits, what: str) -> object:
    """json.loads with its work bounded first: at most max_json_values values and max_json_strings
    strings, max_json_depth deep."""
    limits.check_json_values(data.count(b","), what)
    brackets = _outside_strings(data, limits, what).translate(None, _NOT_BRACKETS)
    containers = 2 * limits.max_json_values  # each array or object: an opening and a closing bracket
    if brackets:
        # Depth over at most the brackets a body may hold: the work stays bounded either way.
        nesting = np.frombuffer(brackets[: containers + 1].translate(_BRACKETS), dtype=np.int8).cumsum(dtype=np.int32)
        if int(nesting.max()) > limits.max_json_depth:
            raise BadRequest(f"{what} nests deeper than {limits.max_json_depth} levels")
    if len(brackets) > containers:
        raise PayloadTooLarge(f"{what} holds more than {limits.max_json_values} JSON arrays and objects")
    try:
        return json.loads(data)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, and an integer past Python's digit limit
        raise BadRequest(f"{what} is not valid JSON: {exc}") from None


def decode_base64(text: str, part: str) -> bytes:
    """Plain base64 or a data: URL, as browsers write them; 400 naming the part otherwise."""
    if text.startswith("data:") and "," in text[:256]:
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("not valid base64", part=part) from None


@contextlib.contextmanager
def last_line_of_defence() -> Iterator[None]:
    """Whatever a parser did not foresee in a body is the body's fault: 400, logged with the request ID."""
    try:
        yield
    except ServiceError:
        raise
    except Exception:
        logger.exception("unexpected error while reading a request body")
        raise BadRequest("the request body could not be read") from None
