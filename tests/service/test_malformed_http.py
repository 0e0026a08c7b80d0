"""Malformed and slow HTTP on raw sockets: the server answers what it can and keeps serving others."""

import contextlib
import json
import re
import select
import socket
import time

import pytest

from bench.hostile import send
from bench.server import run_server
from service.frontend.http_protocol import MAX_PIPELINED
from service.settings import Settings
from tests.conftest import metric, wait_for


def _port(server) -> int:
    return int(server.url.rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def target():
    with run_server() as server:
        yield server
        assert server.stop() == 0


def _healthy_quickly(server, samples) -> float:
    with server.client() as client:
        started = time.perf_counter()
        response = client.post("/classify", files={"file": ("x.png", samples[0].encoded(), "image/png")})
        assert response.status_code == 200
        return time.perf_counter() - started


STALLED_UPLOAD = (
    b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n\x89PN"
)


def test_slow_and_stalled_clients_do_not_block_others(target, samples):
    sockets = []
    try:
        for i in range(40):  # half-sent headers, half-sent bodies: connections that just sit there
            raw = socket.create_connection(("127.0.0.1", _port(target)))
            if i % 2:
                raw.sendall(STALLED_UPLOAD)
            else:
                raw.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            sockets.append(raw)
        assert _healthy_quickly(target, samples) < 2.0
    finally:
        for raw in sockets:
            raw.close()
    # Stalled uploads that were abandoned leave nothing in flight behind them.
    with target.client() as client:
        wait_for(lambda: metric(client, "vit_requests_in_flight") == 0, timeout=10)


def _stalled_upload(port: int, declared: int, timeout_s: float) -> socket.socket:
    """A multipart upload that sends its headers and the first bytes of its first image, then nothing."""
    raw = socket.create_connection(("127.0.0.1", port))
    head = (
        "POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        f"Content-Length: {declared}\r\nX-Request-Timeout: {timeout_s}\r\n\r\n"
        '--b\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n\r\n'
    )
    raw.sendall(head.encode() + b"\xff\xd8\xff")
    return raw


def _until_closed(raw: socket.socket) -> bytes:
    raw.settimeout(10)
    reply = b""
    while chunk := raw.recv(65536):
        reply += chunk
    return reply


def _answer_of(raw: socket.socket) -> tuple[bytes, dict]:
    """The head and JSON body of the one answer before the server closes the connection."""
    head, body = _until_closed(raw).split(b"\r\n\r\n", 1)
    return head, json.loads(body)


def test_uploads_that_stall_hold_the_queue_only_until_their_deadline(target, samples):
    """A body that stops arriving keeps the images its size suggests (a full request's worth at the
    body limit), so a few such connections fill the queue and others get 429 meanwhile. At their
    deadline each is answered 504 and closed, and the queue is free again."""
    settings = Settings()
    full = settings.max_queue_images // settings.max_images_per_request
    stalled = [_stalled_upload(_port(target), settings.max_body_bytes, 3) for _ in range(full)]
    image = {"file": ("x.png", samples[0].encoded(), "image/png")}
    try:
        with target.client() as client:
            wait_for(lambda: metric(client, "vit_images_in_flight") == settings.max_queue_images, timeout=10)
            assert client.post("/classify", files=image).status_code == 429
            for raw in stalled:
                head, body = _answer_of(raw)
                assert head.startswith(b"HTTP/1.1 504 ") and b"connection: close" in head.lower(), head
                assert body["error_type"] == "deadline_exceeded"
            wait_for(lambda: metric(client, "vit_images_in_flight") == 0, timeout=10)
            assert client.post("/classify", files=image).status_code == 200
    finally:
        for raw in stalled:
            raw.close()


@pytest.fixture(scope="module")
def impatient():
    """A server whose heads may take half a second, its bodies half a second at any rate, then
    1 KiB a second, and whose idle connections stay open a second."""
    with run_server(header_timeout_s=0.5, body_rate_grace_s=0.5, min_body_rate_bytes_s=1024, keep_alive_s=1) as server:
        yield server
        assert server.stop() == 0


def test_uploads_that_stall_free_their_slots_once_their_grace_has_passed(impatient, samples):
    """Stalled uploads with a 30 s deadline: a full queue's worth is answered 408 and closed soon
    after the grace, not at the deadline, and the queue is free again."""
    settings = Settings()
    full = settings.max_queue_images // settings.max_images_per_request
    started = time.monotonic()
    stalled = [_stalled_upload(_port(impatient), settings.max_body_bytes, 30) for _ in range(full)]
    try:
        for raw in stalled:
            head, body = _answer_of(raw)
            assert head.startswith(b"HTTP/1.1 408 ") and b"connection: close" in head.lower(), head
            assert body["error_type"] == "body_too_slow", body
        assert time.monotonic() - started < 10
        with impatient.client() as client:
            wait_for(lambda: metric(client, "vit_images_in_flight") == 0, timeout=10)
            assert metric(client, 'vit_rejections_total{reason="body_too_slow"}') >= full
            image = {"file": ("x.png", samples[0].encoded(), "image/png")}
            assert client.post("/classify", files=image).status_code == 200
    finally:
        for raw in stalled:
            raw.close()


def test_a_body_that_drips_below_the_rate_is_refused_and_a_steady_one_is_served(impatient, photo_1024):
    head = (
        f"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: {len(photo_1024)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", _port(impatient))) as drip:
        drip.sendall(head)
        for offset in range(0, 64 * 20, 64):  # 320 bytes a second until answered, four seconds at most
            drip.sendall(photo_1024[offset : offset + 64])
            if select.select([drip], [], [], 0.2)[0]:
                break
        answer, body = _answer_of(drip)
    assert answer.startswith(b"HTTP/1.1 408 ") and body["error_type"] == "body_too_slow", answer
    # The same photo in ten pieces over 1.5 s: three times the grace, far above the rate.
    with socket.create_connection(("127.0.0.1", _port(impatient))) as steady:
        steady.sendall(head)
        piece = -(-len(photo_1024) // 10)
        for offset in range(0, len(photo_1024), piece):
            time.sleep(0.15)
            steady.sendall(photo_1024[offset : offset + piece])
        steady.settimeout(10)
        answer = steady.recv(65536)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]


def test_a_head_that_takes_too_long_is_answered_408_and_a_silent_connection_closed(impatient):
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", _port(impatient))) as silent:
        silent.settimeout(10)
        assert silent.recv(65536) == b""  # closed, with nothing to answer
    with socket.create_connection(("127.0.0.1", _port(impatient))) as slow:
        slow.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        head, body = _answer_of(slow)
    assert head.startswith(b"HTTP/1.1 408 ") and b"connection: close" in head.lower(), head
    assert body["error_type"] == "header_timeout"
    assert time.monotonic() - started < 5


LIVEZ = b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n"


def test_pipelined_requests_are_answered_in_order_and_a_client_that_never_reads_is_cut_off(target):
    """A client may send its next requests before reading the answers, within a bound: past it what
    was read is answered and the connection closes, where the server used to queue every request
    it was sent (gigabytes)."""
    with socket.create_connection(("127.0.0.1", _port(target))) as polite:
        polite.settimeout(10)
        polite.sendall(LIVEZ * 50)
        received = b""
        while received.count(b"HTTP/1.1 200 ") < 50:
            chunk = polite.recv(65536)
            assert chunk, received[-200:]
            received += chunk
    with socket.create_connection(("127.0.0.1", _port(target))) as greedy:
        greedy.settimeout(10)
        greedy.sendall(LIVEZ * 2000)  # 68 KB, all in the socket's buffers before the server reads any
        answered = b""
        with contextlib.suppress(ConnectionResetError):  # closed with requests unread: a reset
            while chunk := greedy.recv(65536):
                answered += chunk
    answers = answered.split(b"HTTP/1.1 200 OK\r\n")[1:]
    assert MAX_PIPELINED < len(answers) < 2000 and all(answer.endswith(b"}") for answer in answers)  # whole
    assert b"connection: close" in answers[-1]  # the last said so
    wait_for(lambda: f"over {MAX_PIPELINED} pipelined requests waiting" in target.log)
    with target.client() as client:
        assert client.get("/livez").status_code == 200


def test_an_idle_keep_alive_connection_is_closed_after_its_timeout(impatient):
    with socket.create_connection(("127.0.0.1", _port(impatient))) as idle:
        idle.settimeout(10)
        idle.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
        assert idle.recv(65536).startswith(b"HTTP/1.1 200 ")
        answered = time.monotonic()
        assert idle.recv(65536) == b""  # closed by the server, with nothing more to say
    assert 0.8 < time.monotonic() - answered < 5


def test_a_head_in_pieces_within_the_timeout_is_served_and_the_next_one_is_timed_too(impatient):
    with socket.create_connection(("127.0.0.1", _port(impatient))) as raw:
        raw.settimeout(10)
        for piece in (b"GET /livez HTTP/1.1\r\n", b"Host: x\r\n", b"\r\n"):
            raw.sendall(piece)
            time.sleep(0.1)
        assert raw.recv(65536).startswith(b"HTTP/1.1 200 ")
        raw.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n")  # the keep-alive's next head never ends
        head, body = _answer_of(raw)
    assert head.startswith(b"HTTP/1.1 408 ") and body["error_type"] == "header_timeout", head


def test_a_body_that_stops_early_is_dropped_cleanly_and_counted_as_the_client_leaving(target, samples):
    data = samples[1].encoded()
    left = '{reason="client_disconnected"}'
    with target.client() as client:
        before = metric(client, "vit_rejections_total" + left)
        with socket.create_connection(("127.0.0.1", _port(target))) as raw:
            head = (
                "POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                f"Content-Length: {len(data) * 2}\r\n\r\n"
            )
            raw.sendall(head.encode() + data)
            raw.shutdown(socket.SHUT_WR)  # the client gives up half-way through its own body
            assert raw.recv(65536) == b""  # nobody is left to answer
        # 499, as for a client that leaves later on: not a 400, which would blame its request.
        wait_for(lambda: metric(client, "vit_rejections_total" + left) == before + 1)
    assert _healthy_quickly(target, samples) < 2.0


@pytest.mark.parametrize(
    ("path", "opening"),
    [
        ("/classify", b'{"images": ['),
        ("/v2/models/fashion-mnist-vit/infer", b'{"inputs": [{"name": "image", "data": ['),
    ],
)
def test_a_json_body_of_too_many_values_is_refused_before_the_rest_arrives(target, path, opening):
    """Values are counted by commas as the body arrives: a client that declared the whole body
    limit and sent a tenth of it, all empty strings, is answered 413 without sending the rest."""
    declared = Settings().max_body_bytes
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {declared}\r\n\r\n"
    status, body = send(target.url, head.encode() + opening + b'"",' * (declared // 30), timeout=10)
    assert (status, body["error_type"]) == (413, "payload_too_large"), body


def test_an_endless_header_is_refused_with_431_not_buffered(target, samples):
    """httptools sets no bound on a request's head: the server's own (VIT_MAX_HEADER_BYTES) answers
    long before the megabytes a client may send, and the connection closes."""
    with socket.create_connection(("127.0.0.1", _port(target))) as raw:
        raw.settimeout(10)
        raw.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\nX-Endless: ")
        with contextlib.suppress(ConnectionError):  # refused while it sends: as it should be
            for _ in range(64):
                raw.sendall(b"a" * 65536)
        head, body = _answer_of(raw)
    assert head.startswith(b"HTTP/1.1 431 "), head
    assert body["error_type"] == "headers_too_large"
    assert _healthy_quickly(target, samples) < 2.0


@pytest.mark.parametrize("where", ["a header", "the URL"])
def test_a_head_over_the_bound_is_refused_when_it_arrives_whole_too(target, samples, where):
    """Most heads arrive in one read, which the chunk count never sees: counted by what was parsed."""
    bound = Settings().max_header_bytes
    for size, expected in ((bound - 200, 200), (bound + 200, 431)):
        filler = "a" * size
        head = (
            f"GET /readyz?{filler} HTTP/1.1\r\nHost: x\r\n"
            if where == "the URL"
            else (f"GET /readyz HTTP/1.1\r\nHost: x\r\nX-Filler: {filler}\r\n")
        )
        status, body = send(target.url, (head + "Connection: close\r\n\r\n").encode(), timeout=10)
        assert status == expected, (size, body)
    assert body["error_type"] == "headers_too_large"
    assert _healthy_quickly(target, samples) < 2.0


def test_heads_within_the_bound_and_pipelined_requests_after_large_bodies_are_served(target, photo_1024):
    """Nothing honest is refused: 20 KB of headers, and a request sent right behind another's body
    whose last read, larger than the bound, also brings the start of its head (pipelining)."""
    with target.client() as client:
        headers = {f"X-Trace-{i}": "t" * 200 for i in range(100)}
        assert client.get("/readyz", headers=headers).status_code == 200
    tail = Settings().max_header_bytes + 8192
    assert len(photo_1024) > tail
    upload = (
        f"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: {len(photo_1024)}\r\n\r\n"
    ).encode() + photo_1024
    with socket.create_connection(("127.0.0.1", _port(target))) as raw:
        raw.settimeout(10)
        raw.sendall(upload[:-tail])
        time.sleep(0.3)  # each write arrives as a read of its own
        raw.sendall(upload[-tail:] + b"GET /readyz HTTP/1.1\r\nHost: x\r\n")
        time.sleep(0.3)
        raw.sendall(b"Connection: close\r\n\r\n")
        replies = _until_closed(raw)
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", replies) == [b"200", b"200"]


def test_what_the_http_layer_answers_itself_is_counted_and_logged_too(target):
    """Malformed requests and heads over the bound never reach the app; /metrics must still add up."""
    series = 'vit_requests_total{{route="unmatched",status="{}"}}'
    too_large = f"GET /readyz HTTP/1.1\r\nHost: x\r\nX-Filler: {'a' * Settings().max_header_bytes}\r\n\r\n"
    two_lengths = "POST /classify HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd"
    with target.client() as client:
        before = {status: metric(client, series.format(status)) for status in (400, 431)}
        assert send(target.url, too_large.encode(), timeout=10)[0] == 431
        assert send(target.url, two_lengths.encode(), timeout=10)[0] == 400
        for status in (400, 431):
            wait_for(lambda status=status: metric(client, series.format(status)) == before[status] + 1)
    wait_for(lambda: '"route": "unmatched", "status": 431' in target.log)


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,  # a TLS hello on a plain port
        b"NOT A REQUEST\r\n\r\n",
        b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
        b"POST /classify HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
)
def test_garbage_on_the_wire_gets_a_4xx_or_a_close(target, samples, garbage):
    with socket.create_connection(("127.0.0.1", _port(target))) as raw:
        raw.settimeout(10)
        raw.sendall(garbage)
        try:
            reply = raw.recv(65536)
        except ConnectionResetError:
            reply = b""
    status_line = reply.split(b"\r\n", 1)[0]
    assert reply == b"" or status_line.split(b" ")[1].startswith(b"4"), status_line
    assert _healthy_quickly(target, samples) < 2.0
