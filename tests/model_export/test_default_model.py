"""The embedded default model: trained here, exported by our exporter, accurate through ONNX Runtime."""

import json

import numpy as np
import onnxruntime as ort
import torch

from model_export.checkpoints import _native_config, import_checkpoint, sha256_file
from model_export.fashion_mnist import LABELS
from model_export.manifest import Manifest
from model_export.onnx_export import normalise
from model_export.vit import ViTConfig
from service.frontend.decode import Decoder
from service.settings import DEFAULT_MODEL_DIR
from tests.conftest import encode

WEIGHTS_DIR = DEFAULT_MODEL_DIR.parents[1] / "model_export" / "default_model"


def test_the_shipped_artifact_comes_from_the_shipped_weights():
    manifest = Manifest.read(DEFAULT_MODEL_DIR)
    assert manifest.labels == list(LABELS)
    assert manifest.source.layout == "native"
    assert manifest.source.sha256 == sha256_file(WEIGHTS_DIR / "weights.safetensors")
    assert manifest.onnx_sha256 == sha256_file(DEFAULT_MODEL_DIR / "model.onnx")
    record = json.loads((WEIGHTS_DIR / "training_record.json").read_text())
    # The recorded config (its head kind under the old name `pool`, migrated as the importer
    # does), with today's defaults for the fields added since: a plain ViT with one [class] token.
    assert ViTConfig(**_native_config(record)).to_dict() == manifest.config
    assert (manifest.prefix_tokens, manifest.head, manifest.pooling) == (["class"], "token", "token")
    assert record["epochs_completed"] == record["hyperparameters"]["epochs"]


def test_the_shipped_graph_matches_the_weights_in_pytorch():
    imported = import_checkpoint(WEIGHTS_DIR)
    pixels = torch.randint(0, 256, (4, 28, 28, 1), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = imported.model(normalise(pixels, imported.preprocessing)).numpy()
    session = ort.InferenceSession(str(DEFAULT_MODEL_DIR / "model.onnx"), providers=["CPUExecutionProvider"])
    actual, _ = session.run(None, {"pixels": pixels.numpy(), "pixel_values": np.empty((0, 1, 28, 28), np.float32)})
    assert np.abs(actual - expected).max() <= 1e-4


def test_top1_accuracy_on_the_full_test_split_through_onnxruntime(fashion_test_split):
    """Each test image as a PNG file, through the server's own decoder and the manifest's preprocessing."""
    from PIL import Image

    images, labels = fashion_test_split
    manifest = Manifest.read(DEFAULT_MODEL_DIR)
    decoder = Decoder(manifest.preprocessing, max_pixels=10**6)
    session = ort.InferenceSession(str(DEFAULT_MODEL_DIR / "model.onnx"), providers=["CPUExecutionProvider"])
    batch = np.empty((500, *decoder.shape), dtype=np.uint8)
    no_tensors = np.empty((0, 1, 28, 28), dtype=np.float32)
    correct = 0
    for start in range(0, len(images), len(batch)):
        chunk = images[start : start + len(batch)]
        for slot, image in zip(batch, chunk, strict=False):
            decoder.decode_into(encode(Image.fromarray(image), "PNG"), slot)
        logits, _ = session.run(None, {"pixels": batch[: len(chunk)], "pixel_values": no_tensors})
        correct += int((logits.argmax(1) == labels[start : start + len(chunk)]).sum())
    accuracy = correct / len(images)
    print(f"default model top-1 on {len(images)} Fashion-MNIST test images via ONNX Runtime: {accuracy:.4f}")
    assert len(images) == 10_000
    assert accuracy >= 0.90
