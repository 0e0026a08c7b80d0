"""Logging: one JSON object per line (or plain text), each with the request ID it belongs to.

Records are written by a thread of their own (the standard library's QueueHandler and
QueueListener): an event loop never waits for stderr, however slowly its reader drains it.
"""

from __future__ import annotations

import atexit
import contextvars
import copy
import json
import logging
import logging.handlers
import queue
import sys
import time

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

# Attributes every LogRecord has; anything else was passed with extra= and is logged as a field.
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "color_message"}


class ContextFilter(logging.Filter):
    """Stamps each record with the request it belongs to and the process that wrote it."""

    def __init__(self, process: str) -> None:
        super().__init__()
        self.process_name = process

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
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


class _Enqueue(logging.handlers.QueueHandler):
    """Resolves in the logging thread what is only valid there (the arguments, the traceback), and
    keeps every field for the writer's formatter; QueueHandler's own prepare formats them away."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        record = copy.copy(record)
        record.msg, record.args = record.getMessage(), None
        if record.exc_info:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        return record


def configure_logging(level: str, fmt: str, process: str) -> None:
    """process: which of the server's processes writes (supervisor, engine, frontend-N)."""
    writer = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        writer.setFormatter(JsonFormatter())
    else:
        writer.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(proc)s %(name)s [%(request_id)s] %(message)s")
        )
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    handler = _Enqueue(records)
    handler.addFilter(ContextFilter(process))  # here, in the logging thread: the request ID is a context variable
    listener = logging.handlers.QueueListener(records, writer)
    listener.start()
    atexit.register(listener.stop)  # what is queued is written before the process ends
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Library warnings (Pillow on odd files, for one) become log records with the request ID.
    logging.captureWarnings(True)
