"""A real reverse proxy in front: Debian's nginx on loopback, the example config, the service under /vit."""

import shutil
import socket
import subprocess
import time

import httpx
import pytest

from bench.server import run_server
from tests.conftest import REPO

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    """The service with VIT_ROOT_PATH=/vit behind docker/nginx/vit.conf; yields the gateway's URL."""
    work = tmp_path_factory.mktemp("nginx")
    with run_server(root_path="/vit", max_body_bytes=1_000_000) as server:
        service_port = server.url.rsplit(":", 1)[1]
        port = _free_port()
        site = (REPO / "docker/nginx/vit.conf").read_text()
        site = site.replace("127.0.0.1:8000", f"127.0.0.1:{service_port}").replace(
            "127.0.0.1:8080", f"127.0.0.1:{port}"
        )
        (work / "vit.conf").write_text(site)
        (work / "nginx.conf").write_text(
            f"worker_processes 1;\npid {work}/nginx.pid;\nerror_log {work}/error.log;\nevents {{}}\n"
            f"http {{\n  access_log off;\n  client_body_temp_path {work}/body;\n  proxy_temp_path {work}/proxy;\n"
            f"  fastcgi_temp_path {work}/fastcgi;\n  uwsgi_temp_path {work}/uwsgi;\n  scgi_temp_path {work}/scgi;\n"
            f"  include {work}/vit.conf;\n}}\n"
        )
        nginx = subprocess.Popen([NGINX, "-p", str(work), "-c", str(work / "nginx.conf"), "-g", "daemon off;"])
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:  # nginx has no readiness signal of its own: poll its port until it answers
            try:
                httpx.get(f"{url}/vit/livez", timeout=1)
                break
            except httpx.TransportError:
                assert nginx.poll() is None and time.monotonic() < deadline, (work / "error.log").read_text()
                time.sleep(0.05)
        yield url
        nginx.terminate()
        nginx.wait(timeout=10)
        assert server.stop() == 0


def test_classify_through_the_gateway(gateway, samples):
    files = {"file": ("trouser.png", next(s for s in samples if s.label == "Trouser").encoded(), "image/png")}
    response = httpx.post(f"{gateway}/vit/classify", files=files, headers={"X-Request-ID": "via-nginx-1"})
    assert response.status_code == 200, response.text
    assert response.json()["results"][0]["predictions"][0]["label"] == "Trouser"
    assert response.headers["x-request-id"] == "via-nginx-1"


def test_docs_work_under_the_prefix(gateway):
    docs = httpx.get(f"{gateway}/vit/docs")
    assert docs.status_code == 200 and "/vit/openapi.json" in docs.text
    spec = httpx.get(f"{gateway}/vit/openapi.json")
    assert spec.status_code == 200 and "/classify" in spec.json()["paths"]
    assert httpx.get(f"{gateway}/vit/").status_code == 200  # the demo page, whose fetches are relative


def test_oversized_uploads_get_a_clear_json_413_from_either_limit(gateway):
    over_service = httpx.post(
        f"{gateway}/vit/classify", content=b"\xff" * 2_000_000, headers={"content-type": "image/jpeg"}
    )
    assert over_service.status_code == 413 and over_service.json()["error_type"] == "payload_too_large"
    over_gateway = httpx.post(
        f"{gateway}/vit/classify", content=b"\xff" * 23_000_000, headers={"content-type": "image/jpeg"}
    )
    assert over_gateway.status_code == 413
    assert over_gateway.json() == {
        "error": "request body exceeds the gateway limit of 21 MiB",
        "error_type": "payload_too_large",
    }
