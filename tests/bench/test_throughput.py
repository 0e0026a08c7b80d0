"""bench.throughput's timed windows: a system slower than the window is not measured, never read as 0 images/s."""

import contextlib
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from bench.throughput import timed_windows

REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


@contextlib.contextmanager
def _server_answering_after(delay_s: float) -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the load generator replays on one connection

        def do_GET(self) -> None:
            time.sleep(delay_s)
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_levels_are_measured_while_answers_finish_inside_the_window():
    with _server_answering_after(0.01) as url:
        windows = list(timed_windows(url, REQUEST, [1, 4], 0.5, 1, 100.0))
    assert [w.clients for w in windows] == [1, 4]
    assert all(w.answered and not w.errors for w in windows)


def test_a_system_that_answers_after_the_window_closes_is_not_measured():
    # Settle 0.5 s + window 0.3 s: each answer takes 1.2 s, so none finishes inside the window.
    with _server_answering_after(1.2) as url:
        windows = list(timed_windows(url, REQUEST, [1, 4], 0.3, 1, 100.0))
    assert windows == []
