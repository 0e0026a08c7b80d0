"""Hostile bodies against the live server: each one a 4xx with its documented error_type, at once,
while the server stays ready and the work of honest clients beside it keeps succeeding."""

import threading

import pytest

from bench.hostile import cases, send
from bench.server import run_server
from model_export.manifest import Manifest
from service.settings import DEFAULT_MODEL_DIR
from tests.service.test_processes import _png_files


@pytest.fixture(scope="module")
def busy_server(samples):
    """The default server, with an honest client classifying throughout the module."""
    with run_server(frontend_processes=2) as server:
        stop, statuses = threading.Event(), []

        def honest() -> None:
            with server.client() as client:
                while not stop.is_set():
                    statuses.append(client.post("/classify", files=_png_files(samples)).status_code)

        worker = threading.Thread(target=honest)
        worker.start()
        yield server
        stop.set()
        worker.join()
        assert statuses and set(statuses) == {200}, set(statuses)
        assert server.stop() == 0


CASES = cases(Manifest.read(DEFAULT_MODEL_DIR))


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_a_hostile_body_gets_its_4xx_and_the_server_stays_ready(busy_server, case):
    status, body = send(busy_server.url, case.build())
    assert (status, body.get("error_type")) == (case.status, case.error_type), body
    assert body["error"]
    with busy_server.client() as client:
        assert client.get("/readyz").status_code == 200
