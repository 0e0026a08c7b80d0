"""explain=true: where the [class] token looked, from the same inference run."""

import base64
import io

import numpy as np
from PIL import Image

BACKGROUND_LEVEL = 10  # Fashion-MNIST background is 0; a 4x4 patch with a brighter mean holds garment


def _explain(client, samples):
    files = [("file", (f"{i}.png", s.encoded(), "image/png")) for i, s in enumerate(samples)]
    response = client.post("/classify?explain=true", files=files)
    assert response.status_code == 200, response.text
    return response.json()["results"]


def test_explain_returns_normalised_grids_and_a_heatmap(client, samples):
    (result,) = _explain(client, samples[:1])
    attention = result["attention"]
    for name in ("rollout", "last_layer"):
        grid = np.array(attention[name])
        assert grid.shape == (7, 7)  # 28 px / 4 px patches
        assert (grid >= 0).all() and abs(grid.sum() - 1.0) < 1e-4
    heatmap = Image.open(io.BytesIO(base64.b64decode(attention["heatmap_png"])))
    assert heatmap.format == "PNG" and heatmap.size == (28, 28) and heatmap.mode == "RGB"  # the model's view


def test_explain_gives_the_same_predictions_and_plain_requests_carry_no_maps(client, samples):
    files = {"file": ("x.png", samples[3].encoded(), "image/png")}
    plain = client.post("/classify?top_k=10", files=files).json()["results"][0]
    explained = client.post("/classify?top_k=10&explain=true", files=files).json()["results"][0]
    assert "attention" not in plain
    assert [p["class_id"] for p in plain["predictions"]] == [p["class_id"] for p in explained["predictions"]]
    assert np.allclose([p["score"] for p in plain["predictions"]], [p["score"] for p in explained["predictions"]])


def test_attention_mass_falls_on_the_garment_more_than_its_area(client, samples):
    results = []
    for start in range(0, 64, 16):
        results += _explain(client, samples[start : start + 16])
    mass_shares, area_shares = [], []
    for sample, result in zip(samples, results, strict=False):
        patch_means = sample.pixels.reshape(7, 4, 7, 4).mean(axis=(1, 3))
        garment = patch_means > BACKGROUND_LEVEL
        rollout = np.array(result["attention"]["rollout"])
        mass_shares.append(rollout[garment].sum())
        area_shares.append(garment.mean())
    mass, area = float(np.mean(mass_shares)), float(np.mean(area_shares))
    print(f"attention rollout: {mass:.1%} of the mass on garment patches, which cover {area:.1%} of the image")
    assert mass > area
