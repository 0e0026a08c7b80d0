"""Logging: one JSON object per line (or plain text), each with the request ID it belongs to, and
its trace ID when the request is traced (README, "Tracing").

Records are formatted and written in batches by a thread of their own, a few times a second: an
event loop never waits for stderr, however slowly its reader drains it, and a busy server makes
one write per batch, not one per request. (A QueueListener wakes its thread for every record,
which measured twice the cost of writing each line at once.)
"""

from __future__ import annotations

import atexit
import collections
import contextvars
import json
import logging
import sys
import threading
import time
from typing import TextIO

from opentelemetry import trace

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

# Attributes every LogRecord has; anything else was passed with extra= and is logged as a field.
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "color_message"}


def current_trace_id() -> str | None:
    """The trace the current span belongs to, as trace tools show it; None when nothing traces."""
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None


class ContextFilter(logging.Filter):
    """Stamps each record with the request it belongs to, its trace, and the process that wrote it."""

    def __init__(self, process: str) -> None:
        super().__init__()
        self.process_name = process

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        if not hasattr(record, "trace_id"):  # the access line brings its own, None when untraced
            record.trace_id = current_trace_id()
        record.proc = self.process_name
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD and v is not None})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc"] = record.exc_text
        return json.dumps(entry, default=str)


class BatchingHandler(logging.Handler):
    """Collects records; a daemon thread formats and writes what has gathered every `period_s`."""

    def __init__(self, stream: TextIO, period_s: float = 0.05) -> None:
        super().__init__()
        self.stream = stream
        self.period_s = period_s
        self._records: collections.deque[logging.LogRecord] = collections.deque()
        self._stop = threading.Event()
        self._writer = threading.Thread(target=self._write_periodically, name="log-writer", daemon=True)
        self._writer.start()
        atexit.register(self.close)  # what has gathered is written before the process ends

    def emit(self, record: logging.LogRecord) -> None:
        # Resolved now, in the thread that logs: the arguments may change, the traceback goes away.
        record.msg, record.args = record.getMessage(), None
        if record.exc_info:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        self._records.append(record)

    def flush(self) -> None:
        lines = []
        while self._records:
            lines.append(self.format(self._records.popleft()))
        if lines:
            self.stream.write("\n".join(lines) + "\n")
            self.stream.flush()

    def _write_periodically(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self.flush()
            except (OSError, ValueError):  # stderr closed under us: nothing left to tell
                return

    def close(self) -> None:
        self._stop.set()
        self.flush()
        super().close()


def configure_logging(level: str, fmt: str, process: str) -> None:
    """process: which of the server's processes writes (supervisor, engine, frontend-N)."""
    handler = BatchingHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(proc)s %(name)s [%(request_id)s] %(message)s")
        )
    handler.addFilter(ContextFilter(process))  # in the logging thread: the request ID is a context variable
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Library warnings (Pillow on odd files, for one) become log records with the request ID.
    logging.captureWarnings(True)
