"""Open Inference Protocol v2, spoken by the real client: tritonclient[http] against a live server."""

import base64
import importlib.metadata

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from model_export.manifest import Manifest
from service.frontend.decode import Decoder
from service.settings import DEFAULT_MODEL_DIR

MODEL = "fashion-mnist-vit"


@pytest.fixture(scope="module")
def triton_client(server):
    client = triton.InferenceServerClient(url=server.url.removeprefix("http://"))
    yield client
    client.close()


def _image_input(samples) -> triton.InferInput:
    data = np.array([s.encoded("PNG") for s in samples], dtype=np.object_)
    image = triton.InferInput("image", [len(samples)], "BYTES")
    image.set_data_from_numpy(data, binary_data=True)
    return image


def test_health_and_metadata(triton_client):
    assert triton_client.is_server_live() and triton_client.is_server_ready()
    assert triton_client.is_model_ready(MODEL)
    assert not triton_client.is_model_ready("other-model")
    server = triton_client.get_server_metadata()
    assert "binary_tensor_data" in server["extensions"]
    assert server["version"] == importlib.metadata.version("vit-serve")  # the package's, from one place
    metadata = triton_client.get_model_metadata(MODEL)
    assert {i["name"]: i["datatype"] for i in metadata["inputs"]} == {"image": "BYTES", "pixel_values": "FP32"}
    assert metadata["outputs"] == [
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
        {"name": "embedding", "datatype": "FP32", "shape": [-1, 64]},
    ]


def test_encoded_images_as_bytes_give_probabilities(triton_client, samples, client):
    chosen = samples[:6]
    result = triton_client.infer(MODEL, [_image_input(chosen)], outputs=[triton.InferRequestedOutput("probabilities")])
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (6, 10) and np.allclose(probabilities.sum(1), 1.0, atol=1e-5)
    files = [("file", (f"{i}.png", s.encoded("PNG"), "image/png")) for i, s in enumerate(chosen)]
    rest = client.post("/classify?top_k=1", files=files).json()["results"]
    assert list(probabilities.argmax(1)) == [r["predictions"][0]["class_id"] for r in rest]


def test_preprocessed_fp32_tensor_gives_the_same_probabilities(triton_client, samples):
    manifest = Manifest.read(DEFAULT_MODEL_DIR)
    prep = manifest.preprocessing
    decoder = Decoder(prep, max_pixels=10**6)
    chosen = samples[:4]
    pixels = np.stack([decoder.decode(s.encoded("PNG")) for s in chosen]).transpose(0, 3, 1, 2)
    batch = ((pixels / 255.0 - prep.mean[0]) / prep.std[0]).astype(np.float32)  # what the graph does for images
    tensor = triton.InferInput("pixel_values", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch, binary_data=True)
    from_tensor = triton_client.infer(MODEL, [tensor]).as_numpy("probabilities")
    from_images = triton_client.infer(MODEL, [_image_input(chosen)]).as_numpy("probabilities")
    assert np.allclose(from_tensor, from_images, atol=1e-6)
    as_json = triton.InferInput("pixel_values", list(batch.shape), "FP32")
    as_json.set_data_from_numpy(batch, binary_data=False)
    json_result = triton_client.infer(
        MODEL, [as_json], outputs=[triton.InferRequestedOutput("probabilities", binary_data=False)]
    )
    assert np.allclose(json_result.as_numpy("probabilities"), from_tensor, atol=1e-6)


def test_classification_parameter_returns_top_k_labels(triton_client, samples):
    chosen = samples[:3]
    requested = triton.InferRequestedOutput("probabilities", class_count=3)
    labels = triton_client.infer(MODEL, [_image_input(chosen)], outputs=[requested]).as_numpy("probabilities")
    assert labels.shape == (3, 3)
    for row in labels:
        scores = [float(entry.decode().split(":")[0]) for entry in row]
        assert scores == sorted(scores, reverse=True)
        score, index, label = row[0].decode().split(":", 2)
        assert Manifest.read(DEFAULT_MODEL_DIR).labels[int(index)] == label


def test_errors_use_the_protocols_error_body(triton_client, client, samples):
    with pytest.raises(InferenceServerException, match="unknown model"):
        triton_client.infer("other-model", [_image_input(samples[:1])])
    broken = triton.InferInput("image", [1], "BYTES")
    broken.set_data_from_numpy(np.array([b"not an image"], dtype=np.object_))
    with pytest.raises(InferenceServerException, match="not a supported image format"):
        triton_client.infer(MODEL, [broken])
    wrong = triton.InferInput("pixel_values", [1, 3, 8, 8], "FP32")
    wrong.set_data_from_numpy(np.zeros((1, 3, 8, 8), dtype=np.float32))
    with pytest.raises(InferenceServerException, match=r"pixel_values' must be FP32 with shape \[N, 1, 28, 28\]"):
        triton_client.infer(MODEL, [wrong])
    response = client.post(f"/v2/models/{MODEL}/infer", json={"inputs": []})
    assert response.status_code == 400 and "error" in response.json()


def test_json_only_clients_can_send_base64_images(client, samples):
    body = {
        "inputs": [
            {
                "name": "image",
                "shape": [1],
                "datatype": "BYTES",
                "data": [base64.b64encode(samples[0].encoded()).decode()],
            }
        ],
        "outputs": [{"name": "probabilities", "parameters": {"classification": 2, "binary_data": False}}],
    }
    response = client.post(f"/v2/models/{MODEL}/infer", json=body)
    assert response.status_code == 200, response.text
    (output,) = response.json()["outputs"]
    assert output["shape"] == [1, 2] and output["data"][0].count(":") >= 2


def _pixel_values(values: np.ndarray, binary: bool) -> triton.InferInput:
    tensor = triton.InferInput("pixel_values", list(values.shape), "FP32")
    tensor.set_data_from_numpy(values.astype(np.float32), binary_data=binary)
    return tensor


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_non_finite_pixel_values_are_refused_by_either_encoding(triton_client, binary):
    values = np.zeros((2, 1, 28, 28), dtype=np.float32)
    values[1, 0, 3, 4] = np.nan if binary else np.inf  # JSON carries infinity as the literal Infinity
    with pytest.raises(InferenceServerException, match="non-finite numbers") as refused:
        triton_client.infer(MODEL, [_pixel_values(values, binary)])
    assert refused.value.status() == "400"


def test_an_output_json_cannot_carry_is_a_400_and_binary_output_carries_it(triton_client):
    """Finite, but far outside the preprocessed range: the graph overflows, and JSON has no NaN."""
    values = np.full((1, 1, 28, 28), 3e38, dtype=np.float32)
    as_json = triton.InferRequestedOutput("probabilities", binary_data=False)
    with pytest.raises(InferenceServerException, match="not finite, which JSON cannot carry"):
        triton_client.infer(MODEL, [_pixel_values(values, True)], outputs=[as_json])
    raw = triton_client.infer(
        MODEL, [_pixel_values(values, True)], outputs=[triton.InferRequestedOutput("probabilities")]
    )
    assert raw.as_numpy("probabilities").shape == (1, 10)


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"outputs": [{"name": "probabilities", "parameters": {"classification": True}}]}, "non-negative integer"),
        ({"outputs": [{"name": "probabilities", "parameters": {"binary_data": "false"}}]}, "binary_data parameter"),
        ({"parameters": {"binary_data_output": 0}}, "binary_data_output parameter"),
    ],
)
def test_parameters_of_the_wrong_type_are_refused_not_guessed(client, samples, parameters, message):
    image = {
        "name": "image",
        "shape": [1],
        "datatype": "BYTES",
        "data": [base64.b64encode(samples[0].encoded()).decode()],
    }
    response = client.post(f"/v2/models/{MODEL}/infer", json={"inputs": [image], **parameters})
    assert response.status_code == 400 and message in response.json()["error"], response.text
