"""API keys, request IDs, structured logs and CORS, on real servers."""

import json
import re

import pytest

from bench.server import run_server
from tests.conftest import wait_for

KEYS = "k1-a8f3e0c4d2,k2-77b19e5a01"


@pytest.fixture(scope="module")
def guarded():
    with run_server(api_keys=KEYS, metrics_require_key="true") as server:
        yield server
        assert server.stop() == 0


def test_inference_needs_a_key_and_probes_stay_open(guarded, samples):
    files = {"file": ("x.png", samples[0].encoded(), "image/png")}
    with guarded.client() as client:
        refused = client.post("/classify", files=files)
        assert refused.status_code == 401 and refused.json()["error_type"] == "unauthorized"
        assert refused.headers["www-authenticate"] == "Bearer"
        assert client.post("/classify", files=files, headers={"X-API-Key": "wrong"}).status_code == 401
        assert (
            client.post("/classify", files=files, headers={"Authorization": "Bearer k1-a8f3e0c4d2"}).status_code == 200
        )
        assert client.post("/classify", files=files, headers={"X-API-Key": "k2-77b19e5a01"}).status_code == 200
        assert client.post("/embed", files=files).status_code == 401
        assert client.post("/embed", files=files, headers={"X-API-Key": "k2-77b19e5a01"}).status_code == 200
        assert client.post("/v2/models/fashion-mnist-vit/infer", json={"inputs": []}).status_code == 401
        for probe in ("/livez", "/readyz", "/startupz", "/v2/health/ready"):
            assert client.get(probe).status_code == 200
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"X-API-Key": "k1-a8f3e0c4d2"}).status_code == 200


def test_keys_never_reach_the_logs(guarded, samples):
    with guarded.client() as client:
        client.post(
            "/classify",
            files={"file": ("x.png", samples[0].encoded(), "image/png")},
            headers={"X-API-Key": "k1-a8f3e0c4d2"},
        )
        client.post(
            "/classify",
            files={"file": ("x.png", samples[0].encoded(), "image/png")},
            headers={"X-API-Key": "guess-123"},
        )
    assert "k1-a8f3e0c4d2" not in guarded.log and "k2-77b19e5a01" not in guarded.log and "guess-123" not in guarded.log


def test_request_ids_are_echoed_generated_and_logged_without_image_bytes(server, client, samples):
    data = samples[5].encoded()
    given = client.post(
        "/classify", files={"file": ("x.png", data, "image/png")}, headers={"X-Request-ID": "trace-42.a"}
    )
    assert given.headers["x-request-id"] == "trace-42.a"
    generated = client.get("/v1/models")
    assert re.fullmatch(r"[0-9a-f]{32}", generated.headers["x-request-id"])
    odd = client.get("/v1/models", headers={"X-Request-ID": "bad id\twith spaces"})
    assert re.fullmatch(r"[0-9a-f]{32}", odd.headers["x-request-id"])
    wait_for(lambda: "trace-42.a" in server.log)  # log lines are written in batches, a moment later
    entries = [json.loads(line) for line in server.log.splitlines() if line.startswith("{")]
    (access,) = [e for e in entries if e.get("request_id") == "trace-42.a"]
    assert access["route"] == "/classify" and access["status"] == 200 and access["duration_ms"] > 0
    assert data.hex()[:64] not in server.log and "PNG" not in server.log


def test_cors_is_off_by_default_and_on_for_configured_origins(client):
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    assert "access-control-allow-origin" not in client.options("/classify", headers=preflight).headers
    with run_server(cors_origins="https://app.example") as server, server.client() as cors_client:
        allowed = cors_client.options("/classify", headers=preflight)
        assert allowed.headers["access-control-allow-origin"] == "https://app.example"
        other = cors_client.options("/classify", headers={**preflight, "Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
        assert (other.status_code, other.json()) == (
            400,
            {"error": "Disallowed CORS origin", "error_type": "bad_request"},
        )  # in every error's shape, not Starlette's plain text
        assert server.stop() == 0
