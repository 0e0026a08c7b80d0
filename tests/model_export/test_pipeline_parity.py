"""Over HTTP, for real photos, the service answers what the library's own inference pipeline
answers: transformers' `pipeline("image-classification")` with the saved processor, and timm's
`resolve_data_config` + `create_transform` on the model loaded back from its saved folder.

One timm and one Hugging Face layout per new feature: distillation (timm deit_*_distilled, HF
DeiT with teacher), registers and LayerScale (timm vit_*_reg4_gap, HF DINOv2 with registers),
pooled heads (avg + fc_norm without a class token; DINOv2's [class] + patch mean).
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import pytest
import timm
import torch
import transformers
from PIL import Image

from bench.server import run_server
from tests.conftest import encode
from tests.model_export.families import Member

# Probabilities may differ by this much: the libraries resize with their own code (torchvision's
# tensor kernels for transformers, Pillow for timm), the service with Pillow, a grey level apart at most.
PROBABILITY_TOLERANCE = 1e-3
# scikit-image's sample photos, square and not: 512x512, 400x600, 300x451 and 427x640, so the
# truncated long side and the rounding of an odd crop margin are both exercised.
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
PARITY_LAYOUTS = ["timm-deit-distilled", "timm-reg4-gap", "hf-deit-teacher", "hf-dinov2-registers"]


@pytest.fixture(scope="module")
def photos() -> dict[str, bytes]:
    from skimage import data

    return {name: encode(Image.fromarray(getattr(data, name)()), "PNG") for name in PHOTOS}


def _library_pipeline(member: Member) -> Callable[[Image.Image], np.ndarray]:
    """Every class's probability for an image, as the library's own pipeline computes it from the saved files."""
    num_classes = len(member.manifest.labels)
    if member.library == "hf":
        classifier = transformers.pipeline("image-classification", model=str(member.saved), device="cpu")
        label2id = classifier.model.config.label2id

        def hf(image: Image.Image) -> np.ndarray:
            probabilities = np.zeros(num_classes)
            for answer in classifier(image, top_k=num_classes):
                probabilities[label2id[answer["label"]]] = answer["score"]
            return probabilities

        return hf
    model = timm.create_model(f"local-dir:{member.saved}", pretrained=True).eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))

    def timm_pipeline(image: Image.Image) -> np.ndarray:
        with torch.no_grad():
            return model(transform(image).unsqueeze(0)).softmax(dim=-1)[0].numpy()

    return timm_pipeline


@pytest.mark.parametrize("name", PARITY_LAYOUTS)
def test_http_answer_for_real_photos_matches_the_librarys_pipeline(family, photos, name):
    member = family(name)
    num_classes = len(member.manifest.labels)
    files = [("file", (f"{photo}.png", data, "image/png")) for photo, data in photos.items()]
    # One front-end and small batches: this is about the numbers, not the throughput.
    with run_server(member.out, frontend_processes=1, max_batch_size=2) as server, server.client() as client:
        response = client.post(f"/classify?top_k={num_classes}", files=files)
        assert response.status_code == 200, response.text
        results = response.json()["results"]
        if "class" not in member.prefix_tokens:  # no class token, no explain graph: refused, not guessed
            refused = client.post("/classify?explain=true", files=files[:1])
            assert refused.status_code == 422 and refused.json()["error_type"] == "invalid_parameter", refused.text
        assert server.stop() == 0, server.log
    library = _library_pipeline(member)
    for (photo, data), result in zip(photos.items(), results, strict=True):
        served = np.zeros(num_classes)
        for prediction in result["predictions"]:
            served[prediction["class_id"]] = prediction["score"]
        expected = library(Image.open(io.BytesIO(data)).convert("RGB"))
        assert result["filename"] == f"{photo}.png" and len(result["predictions"]) == num_classes
        assert np.abs(served - expected).max() <= PROBABILITY_TOLERANCE, (photo, served, expected)
