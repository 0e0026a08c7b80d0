"""Ten times the admitted capacity for 20 s on loopback: fast 429s, no broken deadlines, flat memory."""

import contextlib
import socket
import statistics
import time
from collections.abc import Iterator

from bench.load import closed_loop, rss_mb
from bench.server import ServerProcess, run_server

QUEUE_IMAGES = 4
CLIENTS = 10 * QUEUE_IMAGES
DURATION_S = 20.0
TIMEOUT_S = 5.0


def _latency_histogram(text: str, status: int) -> dict[float, float]:
    """Cumulative counts of /classify responses with `status` by the server's own latency bucket (seconds)."""
    buckets = {}
    for line in text.splitlines():
        if (
            line.startswith("vit_request_duration_seconds_bucket{")
            and 'route="/classify"' in line
            and f'status="{status}"' in line
        ):
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            buckets[float(bound)] = float(line.rsplit(" ", 1)[1])
    return buckets


def _median_bound(histogram: dict[float, float]) -> float:
    """The smallest bucket bound that holds at least half of the responses."""
    total = histogram[float("inf")]
    return min(bound for bound, count in histogram.items() if count >= total / 2)


def test_ten_times_capacity_is_refused_fast_and_memory_stays_flat(photo_1024):
    with run_server(
        max_queue_images=QUEUE_IMAGES, max_images_per_request=QUEUE_IMAGES, request_timeout_s=TIMEOUT_S
    ) as server:
        files = {"file": ("photo.jpg", photo_1024, "image/jpeg")}
        rss: list[float] = []
        outcomes = closed_loop(
            server.url,
            lambda client: client.post("/classify", files=files),
            clients=CLIENTS,
            duration_s=DURATION_S,
            on_tick=lambda: rss.append(rss_mb(server.process.pid)),
        )

        with server.client() as client:
            started = time.perf_counter()
            assert client.post("/classify", files=files).status_code == 200
            after_ms = (time.perf_counter() - started) * 1000
            metrics = client.get("/metrics").text
            server_side, served = _latency_histogram(metrics, 429), _latency_histogram(metrics, 200)
        assert server.stop() == 0

    statuses = [o.status for o in outcomes]
    refused = sorted(o.latency_s * 1000 for o in outcomes if o.status == 429)
    accepted = [o.latency_s for o in outcomes if o.status == 200]
    quarter = len(rss) // 4
    growth = max(rss[quarter:]) - statistics.mean(rss[quarter : 2 * quarter])
    p50 = refused[len(refused) // 2]
    p95 = refused[int(len(refused) * 0.95)]  # as the clients saw it, their own queueing included
    total = server_side[float("inf")]
    shares = {bound: server_side[bound] / total for bound in (0.025, 0.05, 0.1)}
    print(
        f"{len(outcomes)} requests: {len(accepted)} accepted, {len(refused)} refused with 429; server-side 429s "
        + ", ".join(f"{share:.1%} within {bound * 1000:.0f} ms" for bound, share in shares.items())
        + "; "
        f"client-side (load generator included) p50 {p50:.1f} ms, p95 {p95:.1f} ms; "
        f"slowest accepted {max(accepted):.2f} s; RSS {rss[quarter]:.0f} -> {rss[-1]:.0f} MB; "
        f"first request after: {after_ms:.1f} ms; server-side medians: "
        f"429 <= {_median_bound(server_side) * 1000:g} ms, 200 <= {_median_bound(served) * 1000:g} ms"
    )
    assert set(statuses) <= {200, 429}, set(statuses)  # no 5xx, no 504: deadlines held
    assert len(refused) > len(accepted) > 0
    assert total == len(refused)
    # A refusal costs no decode and no wait for a batch slot, so it is never slower than the work
    # it turns away. How fast in milliseconds is the machine's business (a benchmark's, not a
    # test's): closed-loop clients keep about CLIENTS requests waiting their turn on the event
    # loop, and on 2 shared cores 88-99.9% of 429s came within 100 ms from run to run.
    assert _median_bound(server_side) <= _median_bound(served), (shares, served)
    assert max(accepted) < TIMEOUT_S
    assert growth < 25, rss  # MB beyond the warmed-up level: flat, not a leak


def _head(url: str, length: int, boundary: str = "b") -> bytes:
    return (
        f"POST /classify HTTP/1.1\r\nHost: {url}\r\nContent-Length: {length}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n"
    ).encode()


def test_admission_reserves_what_a_body_of_that_size_holds_before_reading_it(photo_1024):
    """Once a front-end has read bodies of some size, a body's Content-Length tells how many images
    it likely holds: those are reserved at admission, and a request that could not fit is refused
    before a byte of its body is read (here: never sent)."""
    files = [("file", (f"{i}.jpg", photo_1024, "image/jpeg")) for i in range(8)]
    with run_server(frontend_processes=1, max_queue_images=8, max_images_per_request=8) as server:
        with server.client() as client:
            primed = client.post("/classify", files=files)
            assert primed.status_code == 200
        length = int(primed.request.headers["content-length"])
        port = int(server.url.rsplit(":", 1)[1])
        with (
            socket.create_connection(("127.0.0.1", port)) as holder,
            socket.create_connection(("127.0.0.1", port)) as late,
        ):
            holder.sendall(_head(server.url, length) + b"--b\r\n")  # admitted, its body still coming
            time.sleep(0.5)
            late.sendall(_head(server.url, length))  # the same size, and not a byte of body
            late.settimeout(10)
            answer = late.recv(65536).decode("latin-1")
        assert answer.startswith("HTTP/1.1 429"), answer
        assert '"error_type":"overloaded"' in answer.replace(" ", "")
        assert server.stop() == 0


def _multipart(images: list[bytes]) -> bytes:
    parts = b"".join(
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="%d.jpg"\r\n'
        b"Content-Type: image/jpeg\r\n\r\n" % i + image + b"\r\n"
        for i, image in enumerate(images)
    )
    return parts + b"--b--\r\n"


def _through_images(body: bytes, images: int) -> bytes:
    """The body up to the delimiter that ends its `images`-th part (and opens the next)."""
    end = 0
    for _ in range(images + 1):
        end = body.index(b"--b\r\n", end) + len(b"--b\r\n")
    return body[:end]


@contextlib.contextmanager
def _four_slots(connections: int) -> Iterator[tuple[ServerProcess, list[socket.socket]]]:
    """A fresh server, one front-end with four image slots, and raw connections to it."""
    with run_server(frontend_processes=1, max_queue_images=4, max_images_per_request=4) as server:
        port = int(server.url.rsplit(":", 1)[1])
        with contextlib.ExitStack() as stack:
            sockets = [stack.enter_context(socket.create_connection(("127.0.0.1", port))) for _ in range(connections)]
            for sock in sockets:
                sock.settimeout(10)
            yield server, sockets
        assert server.stop() == 0


def _send_through(sock: socket.socket, url: str, body: bytes, images: int) -> bytes:
    """Send the head and the body up to its `images`-th image; the rest, left to send."""
    sent = _through_images(body, images)
    sock.sendall(_head(url, len(body)) + sent)
    return body[len(sent) :]


def _answer(sock: socket.socket) -> str:
    return sock.recv(65536).decode("latin-1")


def test_a_streamed_body_is_refused_at_its_first_image_that_finds_no_room(photo_1024):
    """A fresh front-end knows no image sizes, so it admits every body as one image. As a multipart
    body streams in, its own images so far tell how many it holds: slots for those are kept at
    once, and a body they do not fit is refused there (here: its later images are never sent).
    The refusal teaches the size: the next such body is refused before a byte of it is read."""
    holding, large = _multipart([photo_1024] * 2), _multipart([photo_1024] * 4)
    with _four_slots(3) as (server, (holder, late, later)):
        rest = _send_through(holder, server.url, holding, 1)  # two slots, kept while the rest is coming
        time.sleep(0.5)
        _send_through(late, server.url, large, 1)
        refused = _answer(late)
        later.sendall(_head(server.url, len(large)))
        refused_at_once = _answer(later)
        holder.sendall(rest)
        served = _answer(holder)
    assert refused.startswith("HTTP/1.1 429"), refused
    assert '"error_type":"overloaded"' in refused.replace(" ", "")
    assert refused_at_once.startswith("HTTP/1.1 429"), refused_at_once
    assert served.startswith("HTTP/1.1 200"), served


def test_a_streamed_body_keeps_a_slot_per_image_it_holds_and_no_more(photo_1024):
    """Two images' worth of a four-slot front-end, held while the body streams in, leave two: a
    second body of two images is served beside it, not refused for one slot."""
    pair = _multipart([photo_1024] * 2)
    with _four_slots(2) as (server, (holder, beside)):
        rest = _send_through(holder, server.url, pair, 1)
        time.sleep(0.5)
        beside.sendall(_head(server.url, len(pair)) + pair)
        served_beside = _answer(beside)
        holder.sendall(rest)
        served = _answer(holder)
    assert served_beside.startswith("HTTP/1.1 200"), served_beside
    assert served.startswith("HTTP/1.1 200"), served


def test_an_empty_image_refused_for_room_teaches_admission_nothing(photo_1024):
    """Empty images carry no bytes, so a body refused at one says nothing about image sizes: it
    must not teach admission a size of zero bytes, by which the next body would be sized."""
    holding, empty_first, single = (
        _multipart([photo_1024] * 2),
        _multipart([b"", b"", b"", photo_1024]),
        _multipart([photo_1024]),
    )
    with _four_slots(3) as (server, (holder, late, next_one)):
        rest = _send_through(holder, server.url, holding, 1)  # two slots, kept while the rest is coming
        time.sleep(0.5)
        # Empty images take the last two slots one by one; the third finds no room.
        _send_through(late, server.url, empty_first, 3)
        refused = _answer(late)
        next_one.sendall(_head(server.url, len(single)) + single)  # before anything else is learnt
        served = _answer(next_one)
        holder.sendall(rest)
        served_holder = _answer(holder)
    assert refused.startswith("HTTP/1.1 429"), refused
    assert served.startswith("HTTP/1.1 200"), served
    assert served_holder.startswith("HTTP/1.1 200"), served_holder
