"""uvicorn's httptools protocol, with six changes.

- Each request's scope carries a future that its connection's end resolves (`connection_closed`):
  a route that waits on the engine learns that its client left from a callback, where ASGI
  alone would take a task per request parked in `receive()` for its `http.disconnect` (58 of
  839 Python calls per request on the default model, counted with cProfile).
- A request it cannot parse (two different Content-Lengths, Content-Length beside
  Transfer-Encoding, a bad chunk) never reaches the app; uvicorn's own answer is a plain-text
  400, this one is `{"error": ..., "error_type": "bad_request"}` like every other error.
- A response's head and body leave in one write. uvicorn writes them as they come, two sends
  and two TCP segments per response; here the head waits for the rest of the same loop turn.
- A request's line and headers are bounded (`VIT_MAX_HEADER_BYTES`): past it, a JSON 431 and the
  connection closes. httptools sets no bound, and uvicorn's own (h11's) does not apply to it, so
  one connection sending an endless header grew a front-end by every megabyte it sent. A head
  still incomplete is counted by the chunks it came in; a complete one by what was parsed of it.
- So is the time they take (`VIT_HEADER_TIMEOUT_S`): a head still incomplete then gets a
  JSON 408 and the connection closes; a connection that sent nothing at all just closes. uvicorn
  times only the idle gap after an answer (its keep-alive), and stops at the first byte of the
  next head, so a head that never ended held its connection for good. A connection arms one
  timer for its first head; a later head that arrives whole in one read, nearly every one, none.
- Pipelined requests are bounded: a connection holds at most `MAX_PIPELINED` read and waiting for
  their turn, and reads no more while any wait. uvicorn read on after each answer, so a client that
  sent requests without reading the answers grew a front-end by a gigabyte in seconds. Past the
  bound, what was read is answered in order and the connection then closes; the rest is not read.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

from starlette.types import Scope
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class _CoalescingTransport:
    """Collects the writes of one loop turn and sends them as one; everything else is the transport's."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(data)

    def flush(self) -> None:
        if self._pending and not self._transport.is_closing():
            self._transport.write(b"".join(self._pending))
        self._pending.clear()

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


logger = logging.getLogger(__name__)
_CLOSED = "vit.connection_closed"
MAX_PIPELINED = 64  # requests read and waiting behind the one being answered, per connection


class _StopParsing(Exception):
    """Raised from the parser's callback once the connection is answered or closed: it stops the
    parser, and uvicorn, which catches it as a parser error, finds the connection closing."""


def connection_closed(scope: Scope) -> asyncio.Future[None] | None:
    """Resolved when the request's connection ends; None where the server is not this protocol."""
    return scope.get(_CLOSED)


class HttpProtocol(HttpToolsProtocol):
    # Set by `bounded`: the request line and headers together, the seconds they may take, and who
    # is told of each request answered here (its status and client), which the app never sees.
    max_head_bytes: int
    head_timeout_s: float
    on_refused: Callable[[int, str | None], None]

    @classmethod
    def bounded(
        cls, max_head_bytes: int, head_timeout_s: float, on_refused: Callable[[int, str | None], None]
    ) -> type[HttpProtocol]:
        """This protocol with heads bounded in size and time (uvicorn takes a class, not an instance)."""
        attributes = {
            "max_head_bytes": max_head_bytes,
            "head_timeout_s": head_timeout_s,
            "on_refused": staticmethod(on_refused),
        }
        return type(cls.__name__, (cls,), attributes)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]
        self._closed: asyncio.Future[None] = self.loop.create_future()
        self._head_bytes: int | None = None  # of a head still being read; None outside one
        self._between_messages = True
        self._head_timer: asyncio.TimerHandle | None = None
        self._overflowed = False  # too many pipelined requests: nothing more is read
        self._time_head()  # a new connection owes its first head

    def data_received(self, data: bytes) -> None:
        if self._overflowed:  # the parser stopped mid-read: what follows is not read
            return
        # A chunk that starts in a head, or where one starts, and leaves it incomplete is all head. One
        # that starts in a body and leaves the next request's head incomplete (pipelining) is not
        # counted: the bound then holds from the next chunk, a read later.
        starts_in_head = self._head_bytes is not None or self._between_messages
        super().data_received(data)
        if self._head_bytes is not None and not self.transport.is_closing():
            if self._head_timer is None:
                self._time_head()
            if starts_in_head:
                self._head_bytes += len(data)
                if self._head_bytes > self.max_head_bytes:
                    self._refuse_head()

    def _refuse_head(self) -> None:
        message = f"the request line and headers exceed {self.max_head_bytes} bytes"
        self._refuse(b"431 Request Header Fields Too Large", "headers_too_large", message)

    def _time_head(self) -> None:
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self._time_head()  # a pipelined head waits behind an answer still being made: not its fault
        elif self._head_bytes is not None:
            message = f"the request line and headers took over {self.head_timeout_s:g} s"
            self._refuse(b"408 Request Timeout", "header_timeout", message)
        else:
            self.transport.close()  # nothing was asked: nothing to answer

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes, self._between_messages = 0, False
        self.scope[_CLOSED] = self._closed  # type: ignore[literal-required]

    def on_headers_complete(self) -> None:
        # Most heads arrive whole in one read, which data_received never counts. Each header line
        # is its name, ": ", its value and CRLF; 16 is the request line's method and version.
        if len(self.url) + 16 + sum(len(name) + len(value) + 4 for name, value in self.headers) > self.max_head_bytes:
            self._refuse_head()
            raise _StopParsing
        self._head_bytes = None
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().on_headers_complete()
        if len(self.pipeline) > MAX_PIPELINED:
            # One read may hold thousands of tiny pipelined requests, each queued here until its turn;
            # no gateway or browser pipelines that deep. The requests before this one are whole: they
            # are answered, and the connection closes after the last, as a server may after any answer
            # (a client that pipelines sends again what was not answered).
            logger.warning(
                "closing a connection from %s: over %d pipelined requests waiting", self._client_host, MAX_PIPELINED
            )
            self._overflowed = True
            self.pipeline.popleft()  # this one, whose body may be unread
            self.pipeline[0][0].keep_alive = False  # the last to be answered
            self.flow.pause_reading()
            raise _StopParsing

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._between_messages = True
        # A large body pauses reading until the app asks for more; once the body is all in, reading
        # resumes, so that a client who leaves while its request waits is seen leaving. Not while
        # pipelined requests wait their turn: uvicorn paused reading for them, and reading on would
        # queue every request a client sends without reading its answers (memory without bound).
        if not self.pipeline:
            self.flow.resume_reading()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # resumes reading, and starts the next pipelined request
        if self.pipeline or self._overflowed:  # requests already read still wait: read no more until answered
            self.flow.pause_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        if not self._closed.done():
            self._closed.set_result(None)
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        if self.transport.is_closing() or self._overflowed:  # already answered (a head too large), or to be
            return
        self._refuse(b"400 Bad Request", "bad_request", f"malformed HTTP request: {msg}")

    def _refuse(self, status: bytes, error_type: str, message: str) -> None:
        """Answer a request the app never sees, in the app's error shape, and close."""
        body = json.dumps({"error": message, "error_type": error_type}).encode()
        head = [b"HTTP/1.1 " + status + b"\r\n"]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join(head) + body)
        self.transport.close()
        self.on_refused(int(status[:3]), self._client_host)

    @property
    def _client_host(self) -> str | None:
        return self.client[0] if self.client else None
