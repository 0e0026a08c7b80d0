"""POST /classify against a real uvicorn process with the real default model."""

import base64

import numpy as np
import onnxruntime as ort

from model_export.manifest import Manifest
from service.frontend.decode import Decoder
from service.settings import DEFAULT_MODEL_DIR


def _labels(response) -> list[str]:
    assert response.status_code == 200, response.text
    return [result["predictions"][0]["label"] for result in response.json()["results"]]


def test_fashion_mnist_png_and_jpeg_get_the_right_labels(client, samples):
    for fmt in ("PNG", "JPEG"):
        predicted = []
        for batch in range(0, len(samples), 25):
            chunk = samples[batch : batch + 25]
            files = [
                ("file", (f"{i}.{fmt.lower()}", s.encoded(fmt), f"image/{fmt.lower()}")) for i, s in enumerate(chunk)
            ]
            predicted += _labels(client.post("/classify", files=files))
        accuracy = np.mean([p == s.label for p, s in zip(predicted, samples, strict=True)])
        assert accuracy >= 0.85, (fmt, accuracy)


def test_served_scores_equal_onnxruntime_on_the_same_preprocessing(client, samples):
    manifest = Manifest.read(DEFAULT_MODEL_DIR)
    decoder = Decoder(manifest.preprocessing, max_pixels=10**8)
    data = [s.encoded("PNG") for s in samples[:8]]
    pixels = np.stack([decoder.decode(d) for d in data])
    session = ort.InferenceSession(str(DEFAULT_MODEL_DIR / "model.onnx"), providers=["CPUExecutionProvider"])
    logits, _ = session.run(None, {"pixels": pixels, "pixel_values": np.empty((0, 1, 28, 28), np.float32)})
    expected = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)

    response = client.post(
        "/classify?top_k=10", files=[("file", (f"{i}.png", d, "image/png")) for i, d in enumerate(data)]
    )
    for row, result in zip(expected, response.json()["results"], strict=True):
        served = {p["class_id"]: p["score"] for p in result["predictions"]}
        assert np.allclose([served[c] for c in range(10)], row, atol=1e-5)


def test_response_shape_matches_the_hugging_face_pipeline_plus_class_ids(client, samples):
    response = client.post("/classify?top_k=3", files={"file": ("boot.png", samples[0].encoded(), "image/png")})
    body = response.json()
    assert body["model"] == "fashion-mnist-vit"
    (result,) = body["results"]
    assert result["filename"] == "boot.png"
    predictions = result["predictions"]
    assert [set(p) for p in predictions] == [{"label", "class_id", "score"}] * 3
    scores = [p["score"] for p in predictions]
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1.0 + 1e-6
    for header in ("x-preprocess-time-ms", "x-queue-time-ms", "x-inference-time-ms"):
        assert float(response.headers[header]) >= 0


def test_raw_body_and_json_base64_give_the_same_answer_as_multipart(client, samples):
    data = samples[1].encoded("PNG")
    multipart = client.post("/classify", files={"file": ("x.png", data, "image/png")}).json()["results"][0]
    raw = client.post("/classify", content=data, headers={"content-type": "image/png"}).json()["results"][0]
    octet = client.post("/classify", content=data, headers={"content-type": "application/octet-stream"})
    as_json = client.post("/classify", json={"images": [base64.b64encode(data).decode()]}).json()["results"][0]
    assert raw["predictions"] == multipart["predictions"] == as_json["predictions"]
    assert octet.json()["results"][0]["predictions"] == multipart["predictions"]
    assert (raw["filename"], as_json["filename"]) == ("body", "images[0]")


def test_default_top_k_and_full_top_k(client, samples):
    files = {"file": ("x.png", samples[2].encoded(), "image/png")}
    assert len(client.post("/classify", files=files).json()["results"][0]["predictions"]) == 5
    everything = client.post("/classify?top_k=10", files=files).json()["results"][0]["predictions"]
    assert sorted(p["class_id"] for p in everything) == list(range(10))
    assert abs(sum(p["score"] for p in everything) - 1.0) < 1e-5


def test_model_endpoint_reports_the_provider_read_from_the_session(client, expected_provider):
    (model,) = client.get("/v1/models").json()["models"]
    assert model["provider"] == expected_provider == client.get("/readyz").json()["provider"]
    assert model["labels"][9] == "Ankle boot"
    assert model["input_size"] == {"channels": 1, "height": 28, "width": 28}
    assert model["batching"]["max_batch_size"] >= 1 and model["batching"]["session_workers"] >= 1
    assert model["onnx_sha256"] == Manifest.read(DEFAULT_MODEL_DIR).onnx_sha256
