"""Probes, docs, start-up and the SIGTERM drain, on real processes."""

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from bench.server import run_server
from service.settings import DEFAULT_MODEL_DIR
from tests.conftest import REPO, metric, wait_for


def test_probes_report_alive_started_and_ready(client, expected_provider):
    for path in ("/livez", "/v2/health/live"):
        assert client.get(path).json()["status"] == "alive"
    assert client.get("/startupz").json() == {"status": "started", "reason": None, "provider": expected_provider}
    for path in ("/readyz", "/v2/health/ready"):
        response = client.get(path)
        assert response.status_code == 200 and response.json()["status"] == "ready"


def test_openapi_documents_the_request_and_error_bodies(client):
    spec = client.get("/openapi.json").json()
    classify = spec["paths"]["/classify"]["post"]
    assert set(classify["requestBody"]["content"]) >= {"multipart/form-data", "image/png", "application/json"}
    assert {"200", "400", "413", "415", "422", "429", "503", "504"} <= set(classify["responses"])
    assert "ClassifyResponse" in spec["components"]["schemas"]
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger-ui" in docs.text


def test_the_serving_path_never_imports_torch():
    code = (
        "import sys, service.cli, service.supervisor, service.frontend.worker, service.engine.process\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('torch', 'onnx', 'safetensors')]\n"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_a_bad_model_folder_fails_start_up_clearly(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "--model", str(tmp_path), "--port", "0"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode == 3  # uvicorn's start-up failure status
    assert "no manifest.json or model.onnx" in result.stderr


@pytest.mark.parametrize("field", ["onnx_file", "explain_onnx_file"])
def test_a_manifest_that_points_outside_its_folder_fails_start_up_clearly(tmp_path, field):
    """A model folder may come from someone else: its graphs are files in it, never paths elsewhere."""
    shutil.copytree(DEFAULT_MODEL_DIR, tmp_path / "model")
    manifest = json.loads((tmp_path / "model/manifest.json").read_text())
    manifest[field] = str(DEFAULT_MODEL_DIR / "model.onnx")  # a real graph, elsewhere
    (tmp_path / "model/manifest.json").write_text(json.dumps(manifest))
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "--model", str(tmp_path / "model"), "--port", "0"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode == 3
    assert "must be a file name in the model folder, not a path" in result.stderr


def test_sigterm_drains_in_flight_requests_and_exits_zero(photo_1024):
    with run_server(drain_grace_s=60) as server, server.client() as client:
        files = [("file", (f"{i}.jpg", photo_1024, "image/jpeg")) for i in range(16)]
        requests = 12  # 192 images: within the queue's 256 however the kernel spreads the connections
        with ThreadPoolExecutor(requests) as pool:
            futures = [pool.submit(client.post, "/classify", files=files) for _ in range(requests)]
            deadline = time.monotonic() + 30
            while (in_flight := metric(client, "vit_requests_in_flight")) < requests:
                assert time.monotonic() < deadline
                if in_flight and any(f.done() for f in futures):
                    break  # a loaded machine answered one before the last was admitted: drain those in flight
            server.process.send_signal(signal.SIGTERM)
            # The listener stays open while draining: readiness says so and new work is refused. The
            # signal reaches the front-ends through the supervisor, which a loaded machine may
            # schedule after this process's next request.
            wait_for(lambda: client.get("/readyz").status_code == 503, timeout=10)
            ready = client.get("/readyz")
            assert ready.status_code == 503 and ready.json()["reason"].startswith("draining")
            refused = client.post("/classify", files=files[:1])
            assert refused.status_code == 503 and refused.json()["error_type"] == "draining"
            assert refused.headers["connection"] == "close"  # the retry reconnects, through the gateway
            responses = [f.result() for f in futures]
        # Every request admitted before the signal is answered in full; any later one is refused as draining.
        answered = [r for r in responses if r.status_code == 200]
        assert len(answered) >= in_flight
        assert all(len(r.json()["results"]) == 16 for r in answered)
        refusals = [(r.status_code, r.json()["error_type"]) for r in responses if r.status_code != 200]
        assert all(refusal == (503, "draining") for refusal in refusals), refusals
        assert server.process.wait(timeout=60) == 0
        assert "drained" in server.log


def test_a_second_signal_stops_at_once():
    with run_server() as server:
        server.process.send_signal(signal.SIGTERM)
        server.process.send_signal(signal.SIGINT)
        stopped = threading.Event()
        threading.Thread(target=lambda: (server.process.wait(), stopped.set()), daemon=True).start()
        assert stopped.wait(timeout=30)
