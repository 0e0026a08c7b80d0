"""The process layout for real: a supervisor, two front-ends and one engine on loopback, and what
happens when any of them dies. Nothing accepted is lost, nothing leaks, the totals add up."""

import collections
import contextlib
import errno
import itertools
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from bench.cpu import process_tree
from bench.load import closed_loop, multipart_upload
from bench.server import ServerProcess, run_server
from service.frontend.engine_link import MAX_MESSAGE
from service.settings import Settings
from service.shm_ring import hello
from service.supervisor import Supervisor
from tests.conftest import metric, wait_for

SHM = Path("/dev/shm")


def children(server: ServerProcess) -> dict[str, int]:
    """The server's processes by name (engine, frontend-0, ...), from their command lines."""
    named = {}
    for pid in process_tree(server.process.pid)[1:]:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if b"service.engine.process" in argv or b"service.frontend.worker" in argv:
            named[argv[-2].decode()] = pid
    return named


def _png_files(samples, count: int = 1):
    return [("file", (f"{i}.png", samples[i].encoded(), "image/png")) for i in range(count)]


@pytest.fixture
def shm_before():
    return set(SHM.iterdir())


def test_the_ring_is_an_anonymous_memfd_that_every_process_maps(samples, shm_before):
    with run_server(frontend_processes=2) as server, server.client() as client:
        assert client.post("/classify", files=_png_files(samples)).status_code == 200
        named = children(server)
        assert set(named) == {"engine", "frontend-0", "frontend-1"}
        for pid in named.values():
            assert "memfd:vit-serve-ring" in Path(f"/proc/{pid}/maps").read_text()
        assert not set(SHM.iterdir()) - shm_before  # nothing new in /dev/shm  # nothing in /dev/shm, ever
        assert server.stop() == 0
    assert not set(SHM.iterdir()) - shm_before  # nothing new in /dev/shm


def test_a_front_end_runs_its_event_loop_decode_threads_and_log_writer_and_no_blas_pool(samples):
    settings = Settings(frontend_processes=2)
    with run_server(frontend_processes=2) as server, server.client() as client:
        assert client.post("/classify", files=_png_files(samples)).status_code == 200
        threads = len(list(Path(f"/proc/{children(server)['frontend-0']}/task").iterdir()))
        assert threads <= 1 + settings.resolved_preprocess_threads(frontends=2) + 1


def test_both_front_ends_serve_and_the_metrics_add_up_across_them(samples):
    with run_server(frontend_processes=2) as server:
        sent = 60

        def classify(i: int) -> int:
            # A fresh connection each time, so the kernel hands them to both front-ends.
            with httpx.Client(base_url=server.url, timeout=30) as client:
                return client.post("/classify", files=_png_files(samples[i % 10 :])).status_code

        with ThreadPoolExecutor(6) as pool:
            assert list(pool.map(classify, range(sent))) == [200] * sent
        with server.client() as client:
            text = client.get("/metrics").text
            assert metric(client, "vit_images_classified_total") == sent
            assert metric(client, "vit_batch_size_images_sum") == sent  # the engine's batches
            assert metric(client, "vit_queue_wait_seconds_count") == sent
            assert metric(client, "vit_event_loop_lag_seconds_count") > 0  # each front-end samples its loop
            assert 'vit_queue_depth_images{graph="plain"} 0.0' in text  # each graph's queue apart, now empty
        served = [line for line in text.splitlines() if line.startswith("vit_requests_total")]
        assert sum(float(line.rsplit(" ", 1)[1]) for line in served if 'route="/classify"' in line) == sent
        assert server.stop() == 0
    access = [json.loads(line) for line in server.lines if '"route": "/classify"' in line]
    assert {entry["proc"] for entry in access} == {"frontend-0", "frontend-1"}


def _response(connection: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """The next response on a raw keep-alive connection: status, headers (lower-case names) and body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = connection.recv(65536)
        assert chunk, "the server closed the connection"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    status_line, *lines = head.decode().split("\r\n")
    headers = {name.lower(): value.strip() for name, value in (line.split(":", 1) for line in lines)}
    while len(body) < int(headers["content-length"]):
        body += connection.recv(65536)
    return int(status_line.split()[1]), headers, body


def _front_end_of(connection: socket.socket) -> str:
    """Which process answered on this connection: generated request IDs start with a per-process prefix."""
    connection.sendall(b"GET /livez HTTP/1.1\r\nHost: test\r\n\r\n")
    return _response(connection)[1]["x-request-id"][:16]


def _process_name_behind(server: ServerProcess, connection: socket.socket) -> str:
    """The name of the front-end serving this connection, from the access log line of a request on it."""
    probe = f"probe-{connection.getsockname()[1]}"
    connection.sendall(f"GET /v1/models HTTP/1.1\r\nHost: test\r\nX-Request-Id: {probe}\r\n\r\n".encode())
    assert _response(connection)[0] == 200
    wait_for(lambda: f'"request_id": "{probe}"' in server.log)
    line = next(line for line in server.lines if f'"request_id": "{probe}"' in line)
    return str(json.loads(line)["proc"])


@contextlib.contextmanager
def _connections_by_front_end(server: ServerProcess, wanted: int) -> Iterator[list[list[socket.socket]]]:
    """New connections, grouped by the front-end the kernel gave each, until both have `wanted`."""
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    by_front_end: dict[str, list[socket.socket]] = collections.defaultdict(list)
    try:
        while len(by_front_end) < 2 or min(len(held) for held in by_front_end.values()) < wanted:
            connection = socket.create_connection((host, int(port)))
            by_front_end[_front_end_of(connection)].append(connection)
        yield list(by_front_end.values())
    finally:
        for connection in itertools.chain(*by_front_end.values()):
            connection.close()


def test_a_burst_of_new_connections_reaches_every_front_end():
    """As a gateway opens its pool at once: each front-end has its own socket on the port, and the
    kernel spreads the connections, rather than the first front-end awake taking them all."""
    with run_server(frontend_processes=2) as server:
        host, port = server.url.removeprefix("http://").rsplit(":", 1)
        connections = [socket.create_connection((host, int(port))) for _ in range(32)]
        try:
            served = collections.Counter(_front_end_of(connection) for connection in connections)
        finally:
            for connection in connections:
                connection.close()
        assert len(served) == 2 and min(served.values()) >= 4, served


def test_one_front_end_may_hold_most_of_the_queue_and_the_bound_holds_over_both(photo_1024):
    """However the kernel spreads connections, the queue is one: two full requests on one front-end
    are both admitted, and the other front-end then refuses, until they are answered."""
    with (
        run_server(frontend_processes=2, max_queue_images=32, max_images_per_request=16) as server,
        _connections_by_front_end(server, 2) as (busy, quiet),
    ):
        upload = multipart_upload(server.url, "/classify", [photo_1024] * 16)
        engine = children(server)["engine"]
        os.kill(engine, signal.SIGSTOP)  # so that both stay admitted until the refusal is seen
        try:
            for connection in busy[:2]:
                connection.sendall(upload)
            with server.client() as client:
                wait_for(lambda: metric(client, "vit_images_in_flight") == 32)
            quiet[0].sendall(multipart_upload(server.url, "/classify", [photo_1024]))
            status, _, body = _response(quiet[0])
            assert status == 429 and json.loads(body)["error_type"] == "overloaded"
        finally:
            os.kill(engine, signal.SIGCONT)
        for connection in busy[:2]:
            status, _, body = _response(connection)
            assert status == 200 and len(json.loads(body)["results"]) == 16
        quiet[0].sendall(upload)
        assert _response(quiet[0])[0] == 200
        assert server.stop() == 0


def test_a_dead_front_ends_images_no_longer_hold_the_queue(photo_1024):
    with (
        run_server(frontend_processes=2, max_queue_images=16, max_images_per_request=16) as server,
        _connections_by_front_end(server, 1) as (doomed, survivor),
    ):
        victim = children(server)[_process_name_behind(server, doomed[0])]
        engine = children(server)["engine"]
        os.kill(engine, signal.SIGSTOP)  # so that the whole queue is still held when its front-end dies
        try:
            doomed[0].sendall(multipart_upload(server.url, "/classify", [photo_1024] * 16))
            with server.client() as client:
                wait_for(lambda: metric(client, "vit_images_in_flight") == 16)
            os.kill(victim, signal.SIGKILL)
            wait_for(lambda: "exited with -9: starting it again" in server.log)
            survivor[0].sendall(multipart_upload(server.url, "/classify", [photo_1024] * 16))
        finally:
            os.kill(engine, signal.SIGCONT)
        status, _, body = _response(survivor[0])
        assert status == 200 and len(json.loads(body)["results"]) == 16
        assert server.stop() == 0  # stopped while the dead one's successor starts: a clean stop all the same


def test_a_second_server_on_the_same_port_refuses_to_start():
    with run_server(frontend_processes=2) as server:
        port = server.url.rsplit(":", 1)[1]
        second = subprocess.run(
            [sys.executable, "-m", "service.cli", "--host", "127.0.0.1", "--port", port],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 3 and f"cannot listen on 127.0.0.1:{port}" in second.stderr + second.stdout
        assert server.stop() == 0


def test_a_killed_front_end_is_replaced_and_the_others_keep_serving(samples, shm_before):
    with run_server(frontend_processes=2) as server:
        victim = children(server)["frontend-0"]
        files = _png_files(samples)
        killed = threading.Timer(1.0, os.kill, (victim, signal.SIGKILL))
        killed.start()
        outcomes = closed_loop(server.url, lambda c: c.post("/classify", files=files), clients=8, duration_s=4.0)
        killed.join()
        statuses = [o.status for o in outcomes]
        # Connections the dead process held fail without an answer (status 0); every answer is a 200.
        assert set(statuses) <= {200, 0} and statuses.count(200) > 0.9 * len(statuses)
        wait_for(lambda: children(server).get("frontend-0") not in (None, victim))
        wait_for(lambda: "frontend-0 ready" in server.log.split("exited with -9", 1)[-1])
        with server.client() as client:
            assert all(client.post("/classify", files=files).status_code == 200 for _ in range(20))
        assert "front-end 0 disconnected" in server.log
        assert server.stop() == 0
    assert not set(SHM.iterdir()) - shm_before  # nothing new in /dev/shm


def test_a_killed_engine_means_503_at_once_then_a_new_engine_and_nothing_accepted_lost(photo_1024, samples):
    with run_server(frontend_processes=2, max_batch_size=2, request_timeout_s=60) as server:
        engine = children(server)["engine"]
        # Stopped first, so that all four requests are still in it when it dies: running, it answers
        # them in a few hundred milliseconds, at times before the last one is admitted.
        os.kill(engine, signal.SIGSTOP)
        files = [("file", (f"{i}.jpg", photo_1024, "image/jpeg")) for i in range(16)]
        with ThreadPoolExecutor(4) as pool, server.client() as client:
            accepted = [pool.submit(client.post, "/classify", files=files) for _ in range(4)]
            wait_for(lambda: metric(client, "vit_requests_in_flight") >= 4)
            os.kill(engine, signal.SIGKILL)
            wait_for(lambda: client.get("/readyz").status_code == 503, timeout=2.0)
            assert "engine is not running" in client.get("/readyz").json()["reason"]
            refused = client.post("/classify", files=_png_files(samples))
            assert refused.status_code == 503 and refused.json()["error_type"] == "not_ready"
            assert refused.headers["retry-after"] == "1"
            wait_for(lambda: client.get("/readyz").status_code == 200)
            assert children(server)["engine"] != engine
            # Requests accepted before the death were sent again to the new engine and answered.
            assert [f.result().status_code for f in accepted] == [200] * 4
            assert all(len(f.result().json()["results"]) == 16 for f in accepted)
        assert "the engine exited with -9: starting it again" in server.log
        assert server.stop() == 0


def _engine_address(supervisor: int) -> str:
    """The engine's abstract socket name, as any process on the host can read it."""
    for line in Path("/proc/net/unix").read_text().splitlines():
        name = line.split()[-1]
        if name.startswith(f"@vit-serve-engine-{supervisor}-"):
            return "\0" + name[1:]
    raise AssertionError("no engine socket")


def test_only_the_servers_own_front_ends_may_talk_to_its_engine(samples):
    """The engine's socket has an abstract name, which every process in the network namespace can
    see and connect to: it welcomes only front-ends its own supervisor started, and the name stays
    the server's while a dead engine is replaced, so nothing else can take it and welcome them."""
    with run_server(frontend_processes=1) as server, server.client() as client:
        address = _engine_address(server.process.pid)
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as stranger:
            stranger.settimeout(10)
            stranger.connect(address)
            answer = b""
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # closed at once, unread
                stranger.sendall(hello(0))
                answer = stranger.recv(MAX_MESSAGE)
            assert answer == b""  # never welcomed
        wait_for(lambda: "not a front-end of this server" in server.log)
        os.kill(children(server)["engine"], signal.SIGKILL)
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as squatter:
            with pytest.raises(OSError) as taken:
                squatter.bind(address)
            assert taken.value.errno == errno.EADDRINUSE
        wait_for(lambda: "the engine exited with -9: starting it again" in server.log)
        wait_for(lambda: client.get("/readyz").status_code == 200)
        assert client.post("/classify", files=_png_files(samples)).status_code == 200
        assert server.stop() == 0


def test_a_stuck_engine_is_killed_and_restarted_and_the_server_serves_again(samples, shm_before):
    """SIGSTOP is an engine that hangs with its connections open (a GPU stuck in a kernel): what it
    holds is answered 504 at the deadline, and once an image is still in it VIT_ENGINE_STALL_S
    later, it is killed and restarted as after a death."""
    with run_server(frontend_processes=2, engine_stall_s=0.5) as server, server.client() as client:
        engine = children(server)["engine"]
        os.kill(engine, signal.SIGSTOP)
        late = client.post("/classify", files=_png_files(samples), headers={"X-Request-Timeout": "0.5"})
        assert late.status_code == 504
        wait_for(lambda: children(server).get("engine") not in (None, engine), timeout=10)
        wait_for(lambda: client.get("/readyz").status_code == 200)
        assert client.post("/classify", files=_png_files(samples)).status_code == 200
        assert "the engine is stuck" in server.log and "the engine exited with -9: starting it again" in server.log
        assert server.stop() == 0
    assert not set(SHM.iterdir()) - shm_before


def test_a_restarted_engine_that_hangs_before_it_is_ready_is_killed_and_replaced(samples, shm_before):
    """The GPU that hung one engine may hang its successor's start, where no front-end watches it yet:
    a restart must be ready within twice the first start and VIT_ENGINE_STALL_S."""
    with run_server(frontend_processes=1, engine_stall_s=1) as server, server.client() as client:
        first = children(server)["engine"]
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: children(server).get("engine") not in (None, first), timeout=10)
        second = children(server)["engine"]
        os.kill(second, signal.SIGSTOP)  # long before it could load the model and say it is ready
        wait_for(lambda: children(server).get("engine") not in (None, first, second), timeout=20)
        wait_for(lambda: "s after its restart (VIT_ENGINE_STALL_S=1): killing it" in server.log)
        wait_for(lambda: client.get("/readyz").status_code == 200)
        assert client.post("/classify", files=_png_files(samples)).status_code == 200
        assert server.stop() == 0
    assert not set(SHM.iterdir()) - shm_before


def test_an_engine_that_hangs_through_the_drain_is_killed_and_the_port_refuses_once_the_front_ends_left(
    shm_before,
):
    with run_server(frontend_processes=1, engine_stall_s=2, drain_grace_s=0.5) as server:
        port = int(server.url.rsplit(":", 1)[1])
        os.kill(children(server)["engine"], signal.SIGSTOP)
        server.process.send_signal(signal.SIGTERM)
        wait_for(lambda: "frontend-0" not in children(server), timeout=10)
        with pytest.raises(ConnectionRefusedError):  # not queued where nobody accepts, then reset
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        assert server.process.wait(timeout=20) == 1
        wait_for(lambda: "engine had not stopped 2 s after it was told to" in server.log)
    assert not set(SHM.iterdir()) - shm_before


def test_with_no_restarts_left_an_engine_death_stops_the_server_non_zero(shm_before):
    with run_server(frontend_processes=2, engine_restarts=0) as server:
        named = children(server)
        os.kill(named["engine"], signal.SIGKILL)
        assert server.process.wait(timeout=60) == 1
        assert "VIT_ENGINE_RESTARTS=0" in server.log
        for pid in named.values():
            assert not Path(f"/proc/{pid}").exists()
    assert not set(SHM.iterdir()) - shm_before  # nothing new in /dev/shm


def test_an_upload_whose_engine_goes_during_the_drain_is_answered_503_when_its_body_is_in(photo_1024, shm_before):
    """No engine comes back while the server drains: an upload still arriving when it went is
    answered as soon as its body is whole, not at its deadline (60 s here)."""
    with run_server(frontend_processes=1, request_timeout_s=60) as server, server.client() as client:
        upload = multipart_upload(server.url, "/classify", [photo_1024])
        host, port = server.url.removeprefix("http://").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=30) as connection:
            connection.sendall(upload[: len(upload) // 2])
            wait_for(lambda: metric(client, "vit_requests_in_flight") == 1)
            server.process.send_signal(signal.SIGTERM)
            wait_for(lambda: "draining: 1 request(s) in flight" in server.log)
            os.kill(children(server)["engine"], signal.SIGKILL)
            wait_for(lambda: "lost the engine" in server.log)
            sent = time.monotonic()
            connection.sendall(upload[len(upload) // 2 :])
            status, headers, body = _response(connection)
        assert (status, json.loads(body)["error_type"]) == (503, "not_ready")
        assert headers["connection"] == "close"  # the server is going: a retry goes to another replica
        assert time.monotonic() - sent < 5
        assert server.process.wait(timeout=30) == 1  # the engine died
    assert not set(SHM.iterdir()) - shm_before  # nothing new in /dev/shm


def test_a_request_still_waiting_when_the_drain_grace_passes_is_answered_503_not_cut_off(samples, shm_before):
    with run_server(frontend_processes=1, drain_grace_s=1, request_timeout_s=60, retry_after_s=3) as server:
        engine = children(server)["engine"]
        os.kill(engine, signal.SIGSTOP)  # the request's image waits in it, past the grace
        try:
            with ThreadPoolExecutor(1) as pool, server.client() as client:
                waiting = pool.submit(client.post, "/classify", files=_png_files(samples))
                wait_for(lambda: metric(client, "vit_requests_in_flight") == 1)
                server.process.send_signal(signal.SIGTERM)
                response = waiting.result(timeout=20)
        finally:
            os.kill(engine, signal.SIGCONT)
        assert (response.status_code, response.json()["error_type"]) == (503, "draining"), response.text
        assert response.headers["retry-after"] == "3"
        wait_for(lambda: "drain grace passed" in server.log)
        server.process.wait(timeout=30)
    assert not set(SHM.iterdir()) - shm_before  # nothing new in /dev/shm


def test_a_front_end_still_waiting_for_the_engine_leaves_at_once_when_told_to_stop(shm_before):
    """Its start-up waits for the engine's welcome, up to 10 minutes for a large model; a stop must
    not wait that out for an engine that may never come (here one stopped with SIGSTOP)."""
    with run_server(frontend_processes=2) as server:
        named = children(server)
        os.kill(named["engine"], signal.SIGSTOP)  # it welcomes no one from now on
        os.kill(named["frontend-0"], signal.SIGKILL)
        wait_for(lambda: children(server).get("frontend-0", named["frontend-0"]) != named["frontend-0"])
        starting = children(server)["frontend-0"]
        try:
            wait_for(lambda: server.log.count("Waiting for application startup.") == 3)  # the first two, and it
            server.process.kill()  # the kernel sends each child SIGTERM (PR_SET_PDEATHSIG)
            server.process.wait()
            wait_for(lambda: not Path(f"/proc/{starting}").exists(), timeout=10)
            assert "stopping before serving" in server.log
        finally:  # so that a front-end that does wait fails this test instead of hanging the run
            for pid in (named["engine"], starting):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    assert not set(SHM.iterdir()) - shm_before  # nothing new in /dev/shm


def test_an_engine_stops_however_many_signals_come_at_once(shm_before):
    """Kubernetes' SIGTERM, a supervisor's death and an operator's Ctrl-C can arrive together; a
    second signal must not find the first one's handler half done."""
    with run_server(frontend_processes=2, engine_restarts=0, drain_grace_s=1) as server:
        engine = children(server)["engine"]
        deadline = time.monotonic() + 0.5
        with contextlib.suppress(ProcessLookupError):
            while time.monotonic() < deadline:
                os.kill(engine, signal.SIGTERM)
        assert server.process.wait(timeout=60) == 1  # the engine left, with no restarts allowed
        # It drained and exited; it was neither killed by one of the signals (-15) nor left hanging.
        assert "the engine exited with 0" in server.log
        wait_for(lambda: not Path(f"/proc/{engine}").exists(), timeout=30)
    assert not set(SHM.iterdir()) - shm_before  # nothing new in /dev/shm


def test_kill_9_of_the_supervisor_takes_every_process_with_it(samples, shm_before):
    with run_server(frontend_processes=2) as server, server.client() as client:
        named = children(server)
        assert client.post("/classify", files=_png_files(samples)).status_code == 200
        server.process.kill()
        server.process.wait()
        deadline = time.monotonic() + 30
        while any(Path(f"/proc/{pid}").exists() for pid in named.values()):
            assert time.monotonic() < deadline, "a child outlived the supervisor"
            time.sleep(0.05)
    assert not set(SHM.iterdir()) - shm_before  # nothing new in /dev/shm


def test_a_killed_servers_metrics_folder_goes_at_the_next_start_and_a_running_ones_stays(tmp_path):
    """The metrics folders live in the temp dir, which in a pod is an emptyDir that outlives a killed
    container, whose supervisor is pid 1 in every incarnation: a folder named after a running pid
    is no sign that its server runs."""
    folders = lambda: set(tmp_path.glob("vit-serve-metrics-*"))  # noqa: E731
    env = {"TMPDIR": str(tmp_path)}
    with run_server(environment=env, frontend_processes=1) as killed:
        (left,) = folders()
        killed.process.kill()
        killed.process.wait()
    named_after_a_live_pid = tmp_path / f"vit-serve-metrics-{os.getpid()}-left"
    named_after_a_live_pid.mkdir()
    with run_server(environment=env, frontend_processes=1) as running:
        (own,) = folders()
        assert own not in (left, named_after_a_live_pid)
        with run_server(environment=env, frontend_processes=1) as another:
            assert len(folders()) == 2 and own in folders()
            with running.client() as client:
                assert client.get("/metrics").status_code == 200
            assert another.stop() == 0
        assert folders() == {own}
        assert running.stop() == 0
    assert not folders()


def test_start_up_finds_each_ready_report_whichever_wait_read_it():
    """The engine's report and the front-ends' can arrive in one wake-up; waiting for the engine
    alone then reads theirs too, and the wait for the front-ends must still see them."""
    supervisor = Supervisor(Settings(frontend_processes=2), "127.0.0.1", 0)
    try:
        engine = supervisor.spawn("engine")
        frontends = [supervisor.spawn("frontend", k) for k in range(2)]
        everyone = [engine, *frontends]
        deadline = time.monotonic() + 60
        while len(select.select([child.status for child in everyone], [], [], 1)[0]) < len(everyone):
            assert time.monotonic() < deadline, "a child never reported"
        supervisor.wait_ready([engine])
        waiting = threading.Thread(target=supervisor.wait_ready, args=(frontends,), daemon=True)
        waiting.start()
        waiting.join(timeout=10)
        assert not waiting.is_alive()
    finally:
        supervisor.stop()


def test_a_started_process_hides_its_start_up_heap_from_the_collector():
    """settle_heap, which the engine and each front-end call once started: the collector no
    longer walks what start-up built, and young collections come every 10,000 allocations, not 700."""
    probe = (
        "import gc, json; from service.boot import settle_heap; settle_heap(); "
        "print(json.dumps([gc.get_freeze_count(), gc.get_threshold()[0]]))"
    )
    frozen, young_every = json.loads(subprocess.check_output([sys.executable, "-c", probe]))
    assert frozen > 10_000  # service.boot brings pydantic and the settings with it
    assert young_every == 10_000
