"""POST /embed: the final [class]-token vector, from the same graph run as the logits."""

import base64

import numpy as np
import pytest
import torch
import tritonclient.http as triton
from PIL import Image
from skimage import data

from model_export.checkpoints import import_checkpoint
from model_export.manifest import Manifest
from model_export.onnx_export import normalise
from service.frontend.decode import Decoder
from service.settings import DEFAULT_MODEL_DIR
from tests.conftest import encode
from tests.model_export.test_default_model import WEIGHTS_DIR

PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "camera", "horse", "immunohistochemistry", "hubble_deep_field"]


def _embed(client, images: list[bytes], **query) -> np.ndarray:
    files = [("file", (f"{i}.png", image, "image/png")) for i, image in enumerate(images)]
    response = client.post("/embed", files=files, params=query)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["dimension"] == 64 and [r["filename"] for r in body["results"]] == [
        f"{i}.png" for i in range(len(images))
    ]
    return np.array([r["embedding"] for r in body["results"]], dtype=np.float32)


def test_the_embedding_is_the_class_token_after_the_final_norm_as_pytorch_computes_it(client, samples):
    images = [s.encoded() for s in samples[:6]]
    served = _embed(client, images)
    manifest = Manifest.read(DEFAULT_MODEL_DIR)
    decoder = Decoder(manifest.preprocessing, max_pixels=10**6)
    pixels = torch.from_numpy(np.stack([decoder.decode(image) for image in images]))
    model = import_checkpoint(WEIGHTS_DIR).model
    with torch.no_grad():
        expected = model.forward_features(normalise(pixels, manifest.preprocessing))[:, 0].numpy()
    assert np.abs(served - expected).max() <= 1e-4


def test_normalize_gives_unit_vectors_in_the_same_direction(client, samples):
    images = [s.encoded() for s in samples[:3]]
    raw, unit = _embed(client, images), _embed(client, images, normalize="true")
    assert np.allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-5)
    assert np.allclose(unit, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-5)


def test_same_inputs_and_limits_as_classify(client, samples):
    png = samples[0].encoded()
    as_json = client.post("/embed", json={"images": [base64.b64encode(png).decode()]})
    assert as_json.status_code == 200
    raw = client.post("/embed", content=png, headers={"content-type": "image/png"})
    assert raw.json()["results"][0]["embedding"] == as_json.json()["results"][0]["embedding"]
    too_many = client.post("/embed", json={"images": [base64.b64encode(png).decode()] * 33})
    assert too_many.status_code == 413 and too_many.json()["error_type"] == "too_many_images"


def test_the_oip_embedding_output_is_the_same_vector(server, client, samples):
    png = samples[1].encoded()
    triton_client = triton.InferenceServerClient(url=server.url.removeprefix("http://"))
    image = triton.InferInput("image", [1], "BYTES")
    image.set_data_from_numpy(np.array([png], dtype=np.object_))
    result = triton_client.infer("fashion-mnist-vit", [image], outputs=[triton.InferRequestedOutput("embedding")])
    assert np.allclose(result.as_numpy("embedding")[0], _embed(client, [png])[0], atol=1e-6)


def _photo(name: str) -> Image.Image:
    return Image.fromarray(getattr(data, name)()).convert("RGB")


@pytest.fixture(scope="module")
def photos() -> dict[str, Image.Image]:
    return {name: _photo(name) for name in PHOTOS}


def test_crops_of_a_real_photo_find_that_photo_among_others(client, photos):
    """Nearest neighbours by cosine similarity: the embedding carries the image, not the pixels' place."""
    gallery = _embed(client, [encode(photo, "PNG") for photo in photos.values()], normalize="true")
    found = total = 0
    for index, photo in enumerate(photos.values()):
        width, height = photo.size
        boxes = [(0, 0, 0.9, 0.9), (0.1, 0.1, 1, 1), (0.05, 0.05, 0.95, 0.95), (0.1, 0, 1, 0.9)]
        crops = [photo.crop((int(a * width), int(b * height), int(c * width), int(d * height))) for a, b, c, d in boxes]
        queries = _embed(client, [encode(crop, "PNG") for crop in crops], normalize="true")
        found += int(((queries @ gallery.T).argmax(axis=1) == index).sum())
        total += len(crops)
    print(f"{found} of {total} crops found their photo")
    # The default model was trained on 28x28 greyscale clothes; chance would be 1 in 8.
    assert found / total >= 0.75, (found, total)
