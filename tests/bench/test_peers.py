"""vit-bench peers' own logic on fake results: the gate, the ratios, the report's shape, and the
helpers that talk to a server. The peers themselves are too heavy for CI (make bench-peers)."""

import json
import re
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from functools import partial

import pytest

from bench.load import multipart_upload
from bench.peers import NAMES, Peer, multipart_request, results_top1, torchserve_peer
from bench.peers.common import ENV_DEVICE, ENV_MODEL, OnnxClassifier, multipart_files
from bench.peers.report import Gate, Level, PeersResult, System, check_gate, plot
from bench.peers.run import Contender, Entrant, PeerError, exchange, take_turns
from service.settings import DEFAULT_MODEL_DIR


def _level(system: str, concurrency: int, images_per_s: float, p99_ms: float = 50.0, round_: int = 0) -> Level:
    return Level(system, concurrency, images_per_s, p99_ms / 2, p99_ms, 0, int(images_per_s * 2), 0.5, round_)


def _result() -> PeersResult:
    result = PeersResult(
        model="fashion-mnist-vit",
        variant="fp32",
        device="cpu",
        machine={
            "cpu": "Some CPU",
            "cores": 2,
            "kernel_flags": ["avx2"],
            "gpu": None,
            "python": "CPython 3.11.7 (/usr/bin/python3.11)",
        },
        onnxruntime="1.0",
        upload="248x248 JPEG (20000 bytes)",
        images_per_request=1,
        limit_images_per_s=1000.0,
        limit_layout="2 session(s) x 1 thread, batch 1",
    )
    result.systems = [
        System("service", "0.1.0", "its defaults"),
        System("litserve", "1.0", "2 workers", Gate("litserve", 100, 0)),
        System("mosec", "2.0", "2 + 2 processes", Gate("mosec", 100, 0)),
        System("bentoml", "3.0", "2 workers", Gate("bentoml", 100, 7)),
        System("rayserve", "-", "-", note="not installed here: make bench-peers"),
    ]
    result.levels = [
        _level("service", 4, 300.0, 20.0),
        _level("service", 16, 400.0, 60.0),
        _level("service", 64, 420.0, 200.0),
        _level("litserve", 4, 150.0, 40.0),
        _level("litserve", 16, 500.0, 50.0),
        _level("mosec", 4, 200.0, 30.0),
        _level("mosec", 16, 100.0, 90.0),
    ]
    return result


def test_the_gate_refuses_a_peer_whose_top1_differs_or_is_missing():
    reference = [3, 1, 4, 1, 5]
    assert check_gate("p", reference, [3, 1, 4, 1, 5]).passed
    wrong = check_gate("p", reference, [3, 1, 4, 2, 5])
    assert not wrong.passed and wrong.mismatches == 1
    assert wrong.verdict == "wrong: 1 of 5 top-1 differ from the service's"
    short = check_gate("p", reference, [3, 1, 4])
    assert not short.passed and short.mismatches == 2
    broken = Gate("p", 5, 5, error="answered 500")
    assert not broken.passed and broken.verdict == "failed: answered 500"


def _entrants(names: list[str], events: list[str], fails_to_start: str = "") -> list[Entrant]:
    """Entrants that note when they come up and go down, and one that will not start a second time."""

    def start(name: str) -> Iterator[Contender]:
        if name == fails_to_start and f"up {name}" in events:
            raise PeerError("no 200 within 300 s")
        events.append(f"up {name}")
        try:
            yield Contender(name, "http://127.0.0.1:1", 1, b"")
        finally:
            events.append(f"down {name}")

    return [Entrant(name, partial(contextmanager(start), name)) for name in names]


def test_each_server_is_up_alone_for_its_turn_and_the_order_reverses_every_round():
    events: list[str] = []

    def time_one(contender: Contender, clients: int, round_: int) -> Level | None:
        events.append(f"{contender.name} c={clients}")
        return _level(contender.name, clients, 100.0, round_=round_)

    levels, broken = take_turns(_entrants(["service", "mosec"], events), [4, 16], 3, time_one)
    turn = ["up {0}", "{0} c=4", "{0} c=16", "down {0}"]
    service, mosec = ([step.format(name) for step in turn] for name in ("service", "mosec"))
    assert events == service + mosec + mosec + service + service + mosec
    assert [(level.round, level.system) for level in levels[:4]] == [(0, "service")] * 2 + [(0, "mosec")] * 2
    assert len(levels) == 12 and broken == {}


def test_a_server_that_breaks_keeps_no_figures_and_the_others_go_on():
    events: list[str] = []

    def time_one(contender: Contender, clients: int, round_: int) -> Level | None:
        if contender.name == "litserve":
            raise ConnectionResetError("gone")
        if clients == 16 and round_ == 1:
            return None  # nothing finished inside the window: not broken, and no higher level this round
        return _level(contender.name, clients, 100.0, round_=round_)

    entrants = _entrants(["service", "mosec", "litserve"], events, fails_to_start="mosec")
    levels, broken = take_turns(entrants, [4, 16, 64], 2, time_one)
    assert broken == {"litserve": "ConnectionResetError('gone')", "mosec": "PeerError('no 200 within 300 s')"}
    assert "down litserve" in events  # stopped, though it broke while timed
    assert [(level.round, level.system, level.concurrency) for level in levels] == [
        (0, "service", 4),
        (0, "service", 16),
        (0, "service", 64),
        (1, "service", 4),
    ]


def test_over_rounds_the_ratio_is_the_median_of_each_rounds_own():
    result = _result()
    result.rounds = 3
    result.levels = [
        _level("service", 16, 400.0, round_=0),
        _level("mosec", 16, 500.0, round_=0),
        _level("service", 16, 600.0, round_=1),
        _level("mosec", 16, 500.0, round_=1),
        _level("service", 16, 900.0, round_=2),
        _level("mosec", 16, 800.0, round_=2),
    ]
    (row,) = result.ratios()
    assert row["per_round"] == pytest.approx([0.8, 1.2, 900 / 800])
    assert row["service_over_best_peer"] == pytest.approx(900 / 800)
    assert row["rounds_ahead"] == 2
    # The medians of each server's own figures: 600 over 500, not the ratio's median.
    assert (row["service_images_per_s"], row["best_peer_images_per_s"]) == (600.0, 500.0)
    table = result.markdown()
    assert "3 rounds: in each, each server started, timed at every level and stopped in turn" in table
    assert "; CPython 3.11.7 (/usr/bin/python3.11)." in table
    assert "| server | concurrency | median of 3 rounds: images/s |" in table
    assert "| 16 | 600.0 | mosec | 500.0 | 1.12x | 50.0 / 50.0 | 0.80-1.20x | 2 of 3 rounds |" in table


def test_ratios_compare_the_service_with_the_best_peer_at_each_level():
    ratios = _result().ratios()
    # c=64: no peer has figures there, so no ratio; bentoml failed its gate and has none anywhere.
    assert [row["concurrency"] for row in ratios] == [4, 16]
    at4, at16 = ratios
    assert at4["best_peer"] == "mosec" and at4["service_over_best_peer"] == pytest.approx(300 / 200)
    assert at16["best_peer"] == "litserve" and at16["service_over_best_peer"] == pytest.approx(400 / 500)
    assert (at16["service_p99_ms"], at16["best_peer_p99_ms"]) == (60.0, 50.0)


def test_the_json_and_the_markdown_name_every_server_level_and_ratio(tmp_path):
    result = _result()
    data = json.loads(json.dumps(result.to_dict()))
    assert [s["name"] for s in data["systems"]] == ["service", "litserve", "mosec", "bentoml", "rayserve"]
    assert [s["gate_passed"] for s in data["systems"]] == [None, True, True, False, None]
    assert len(data["levels"]) == 7 and data["levels"][0]["cpu_ms_per_request"] == pytest.approx(1000 * 0.5 / 600)
    assert data["ratios"][1]["service_over_best_peer"] == pytest.approx(0.8)
    table = result.markdown()
    assert "| bentoml | 3.0 | 2 workers | wrong: 7 of 100 top-1 differ from the service's |" in table
    assert "| rayserve | - | - | not installed here: make bench-peers |" in table
    assert "| litserve | 16 | 500.0 | 25.0 | 50.0 | 0 | 0.50 |" in table
    assert "| 16 | 400.0 | litserve | 500.0 | 0.80x | 60.0 / 50.0 |" in table
    assert "| bentoml | 4 |" not in table  # never timed
    plot(result, tmp_path / "peers.png")
    assert (tmp_path / "peers.png").read_bytes().startswith(b"\x89PNG")


def test_every_peer_has_a_name_and_the_service_response_parses():
    assert NAMES == ["litserve", "bentoml", "rayserve", "pytriton", "mosec", "torchserve"]
    body = json.dumps({"results": [{"predictions": [{"class_id": 7, "label": "x", "score": 0.9}]}] * 2}).encode()
    assert results_top1(body) == [7, 7]


def test_a_framework_that_batches_requests_gets_the_services_images_per_pass_in_whole_requests():
    by_images = Peer("a", "a", "a", multipart_request, results_top1, lambda *_: "")
    by_requests = replace(by_images, batches_requests=True)
    assert [by_images.batch_limit(8, per_request) for per_request in (1, 3, 8, 32)] == [8, 8, 8, 8]
    assert [by_requests.batch_limit(8, per_request) for per_request in (1, 3, 8, 32)] == [8, 2, 1, 1]


def test_multipart_bodies_split_back_into_their_uploads():
    images = [b"\xff\xd8\xff first", b"\x89PNG\r\n\x1a\n\r\n\r\nsecond with blank lines", b""]
    request = multipart_upload("http://127.0.0.1:1", "/classify", images)
    body = request.split(b"\r\n\r\n", 1)[1]
    assert multipart_files(body) == images


def test_torchserve_gets_each_image_under_its_own_name_and_answers_each_request_of_a_batch(monkeypatch, samples):
    photos = [sample.encoded("JPEG", quality=90) for sample in samples[:2]]
    request = torchserve_peer.request("http://127.0.0.1:1", photos, "image/jpeg")
    head, body = request.split(b"\r\n\r\n", 1)
    assert head.startswith(b"POST /predictions/vit HTTP/1.1")
    # Its worker keeps one value per field name: parts that shared one would arrive as the last image.
    assert re.findall(rb'; name="([^"]+)"', body) == [b"file0", b"file1"]
    assert multipart_files(body) == photos
    monkeypatch.setenv(ENV_MODEL, str(DEFAULT_MODEL_DIR))
    monkeypatch.setenv(ENV_DEVICE, "cpu")
    handler = torchserve_peer.Handler()
    handler.initialize(context=None)
    # A batch as TorchServe's worker hands it over: per request, its form's fields as bytearrays.
    batch = [{"file0": bytearray(photos[0]), "file1": bytearray(photos[1])}, {"file0": bytearray(photos[1])}]
    answers = handler.handle(batch, context=None)
    reference = OnnxClassifier(DEFAULT_MODEL_DIR, "cpu")
    expected = [int(row.argmax()) for row in reference.logits(reference.decode_all(photos))]
    assert [results_top1(json.dumps(answer).encode()) for answer in answers] == [expected, expected[1:]]


def _serve_once(answers: list[bytes]) -> int:
    """A loopback server that reads each request head and sends the next canned answer."""
    listener = socket.create_server(("127.0.0.1", 0))

    def run() -> None:
        connection, _ = listener.accept()
        with connection, listener:
            for answer in answers:
                connection.recv(65536)
                connection.sendall(answer)

    threading.Thread(target=run, daemon=True).start()
    return int(listener.getsockname()[1])


def test_exchange_reads_answers_by_content_length_on_one_connection():
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\nhello"
    refused = b"HTTP/1.1 429 Too Many Requests\r\ncontent-length: 0\r\n\r\n"
    port = _serve_once([ok, refused])
    answers = exchange(f"http://127.0.0.1:{port}", [b"GET / HTTP/1.1\r\n\r\n"] * 2, timeout_s=5)
    assert answers == [(200, b"hello"), (429, b"")]


def test_exchange_refuses_an_answer_the_load_generator_could_not_time():
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    port = _serve_once([chunked])
    with pytest.raises(PeerError, match="without Content-Length"):
        exchange(f"http://127.0.0.1:{port}", [b"GET / HTTP/1.1\r\n\r\n"], timeout_s=5)
