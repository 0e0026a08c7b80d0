"""Concurrency against a real server: batches form, overload is refused, deadlines and disconnects drop work."""

import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from bench.host_path import trivial_model
from bench.server import run_server
from tests.conftest import encode, metric, wait_for

POISON = 200  # a pixel value the poisoned graph cannot index: onnxruntime fails the whole batch holding it


def _classify(client, data: bytes, count: int = 1, **headers):
    files = [("file", (f"{i}.jpg", data, "image/jpeg")) for i in range(count)]
    return client.post("/classify", files=files, headers=headers)


def test_concurrent_requests_are_batched_and_metrics_move(samples, expected_provider):
    with run_server(max_wait_ms=20, max_batch_size=16) as server, server.client() as client:
        data = [s.encoded("PNG") for s in samples[:64]]
        with ThreadPoolExecutor(32) as pool:
            responses = list(
                pool.map(lambda d: client.post("/classify", content=d, headers={"content-type": "image/png"}), data)
            )
        assert all(r.status_code == 200 for r in responses)
        batches = metric(client, "vit_batch_size_images_count")
        images = metric(client, "vit_batch_size_images_sum")
        assert images == 64 and batches < 64  # some batch held more than one image
        assert metric(client, "vit_images_classified_total") == 64
        assert metric(client, "vit_requests_total") >= 64
        assert metric(client, "vit_queue_wait_seconds_count") == 64
        assert metric(client, "vit_preprocess_seconds_count") == 64
        assert metric(client, "vit_inference_seconds_count") == batches
        assert metric(client, "vit_batch_gather_seconds_count") == batches
        assert 0 < metric(client, "vit_batch_gather_seconds_sum") < metric(client, "vit_inference_seconds_sum")
        assert (
            f'vit_model_info{{model="fashion-mnist-vit",provider="{expected_provider}",'
            'variant="fp32+fused-attention"} 1.0' in client.get("/metrics").text
        )
        assert server.stop() == 0


def test_a_request_with_many_images_spans_batches_and_keeps_its_order(samples):
    with run_server(max_batch_size=4) as server, server.client() as client:
        files = [("file", (f"{i}.png", s.encoded(), "image/png")) for i, s in enumerate(samples[:10])]
        results = client.post("/classify", files=files).json()["results"]
        assert [r["filename"] for r in results] == [f"{i}.png" for i in range(10)]
        singles = [client.post("/classify", files=[f]).json()["results"][0]["predictions"] for f in files]
        assert [r["predictions"] for r in results] == singles
        assert metric(client, "vit_batch_size_images_count") >= 3 + 10
        assert server.stop() == 0


def test_overload_is_answered_429_with_retry_after(photo_1024):
    with run_server(max_queue_images=8, max_images_per_request=8, retry_after_s=2) as server, server.client() as client:
        with ThreadPoolExecutor(16) as pool:
            responses = list(pool.map(lambda _: _classify(client, photo_1024, 8), range(16)))
        statuses = [r.status_code for r in responses]
        assert 200 in statuses and 429 in statuses, statuses
        refused = next(r for r in responses if r.status_code == 429)
        assert refused.headers["retry-after"] == "2"
        assert refused.json()["error_type"] == "overloaded"
        assert metric(client, "vit_rejections_total") >= statuses.count(429)
        assert _classify(client, photo_1024).status_code == 200  # and it serves normally right after
        assert server.stop() == 0


def test_deadline_passed_is_504_and_counted(photo_12mp):
    with run_server() as server, server.client() as client:
        response = _classify(client, photo_12mp, 4, **{"X-Request-Timeout": "0.001"})
        assert response.status_code == 504 and response.json()["error_type"] == "deadline_exceeded"
        assert 'vit_rejections_total{reason="deadline"}' in client.get("/metrics").text
        assert _classify(client, photo_12mp).status_code == 200
        assert server.stop() == 0


def test_a_client_that_disconnects_has_its_images_dropped(photo_12mp):
    with run_server(max_images_per_request=32, max_queue_images=64) as server, server.client() as client:
        boundary = "b0undary"
        part = (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="p.jpg"\r\n'
                "Content-Type: image/jpeg\r\n\r\n"
            ).encode()
            + photo_12mp
            + b"\r\n"
        )
        body = part * 16 + f"--{boundary}--\r\n".encode()
        port = int(server.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as raw:
            head = (
                f"POST /classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
                f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n"
            )
            raw.sendall(head.encode() + body)
            wait_for(lambda: metric(client, "vit_requests_in_flight") == 1)
        # 16 twelve-megapixel decodes outlast the close: the request is cancelled, not run for nobody.
        wait_for(lambda: 'reason="client_disconnected"' in client.get("/metrics").text)
        wait_for(lambda: metric(client, "vit_requests_in_flight") == 0)
        assert metric(client, "vit_images_classified_total") == 0
        assert server.stop() == 0


# A GPU host is made a CPU machine by hiding its devices from CUDA.
NO_GPU = {"CUDA_VISIBLE_DEVICES": ""}


@pytest.mark.parametrize("strict", [True, False])
def test_requested_cuda_on_a_cpu_machine_is_caught(strict, samples):
    if strict:
        message = "CUDA was requested but the session runs on CPUExecutionProvider"
        with (
            pytest.raises(RuntimeError, match=message),
            run_server(environment=NO_GPU, providers="cuda", require_requested_provider="true"),
        ):
            pass
        return
    with run_server(environment=NO_GPU, providers="cuda") as server, server.client() as client:
        (model,) = client.get("/v1/models").json()["models"]
        assert model["requested_providers"] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
        assert model["provider"] == "CPUExecutionProvider"
        assert "CUDA was requested" in server.log
        assert server.stop() == 0


def _poisoned_model(folder: Path) -> Path:
    """The host-path bench's trivial graph, with its first pixel read through a 128-entry table:
    a batch holding a brighter image fails in onnxruntime (index out of bounds), as a real fault would."""
    trivial_model(folder)
    model = onnx.load(folder / "model.onnx")
    (cast,) = [node for node in model.graph.node if node.op_type == "Cast" and node.input[0] == "first_pixel"]
    position = list(model.graph.node).index(cast)
    model.graph.node.remove(cast)
    model.graph.node.insert(position, helper.make_node("Cast", ["first_pixel"], ["index"], to=TensorProto.INT64))
    model.graph.node.insert(position + 1, helper.make_node("Gather", ["table", "index"], ["pixel_value"]))
    model.graph.initializer.append(numpy_helper.from_array(np.arange(128, dtype=np.float32), "table"))
    onnx.save(model, folder / "model.onnx")
    return folder


def test_a_failed_batch_fails_only_its_own_requests(tmp_path):
    def grey(value: int) -> bytes:
        return encode(Image.new("RGB", (248, 248), (value,) * 3), "PNG")

    def post(value: int):
        return client.post("/classify", content=grey(value), headers={"content-type": "image/png"})

    # Batches of two, the first image waiting for company: three requests at once make one batch
    # of two and one alone, whichever order they arrive in.
    with run_server(_poisoned_model(tmp_path / "poisoned"), max_batch_size=2, max_wait_ms=1000) as server:
        with server.client() as client, ThreadPoolExecutor(3) as pool:
            good, poisoned, other = pool.map(post, [10, POISON, 20])
            assert poisoned.status_code == 500 and poisoned.json()["error_type"] == "inference_failed"
            # At most the poisoned image's batch-mate fails with it, with the same clear error.
            failed = [r for r in (good, other) if r.status_code != 200]
            assert len(failed) <= 1
            assert all(r.status_code == 500 and r.json()["error_type"] == "inference_failed" for r in failed)
            # The engine kept serving: the next request is answered, and the server is ready.
            assert post(30).status_code == 200
            assert client.get("/readyz").status_code == 200
        assert server.stop() == 0
