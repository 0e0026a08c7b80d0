import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from model_export.checkpoints import default_preprocessing, sha256_file
from model_export.manifest import (
    EMBEDDING_NAME,
    EXPLAIN_OUTPUT_NAMES,
    INPUT_NAMES,
    LOGITS_NAME,
    MANIFEST_METADATA_KEY,
    OUTPUT_NAMES,
    PIXEL_VALUES_NAME,
    PIXELS_NAME,
    Manifest,
    Source,
)
from model_export.onnx_export import (
    FP32_TOLERANCE,
    VERIFY_BATCHES,
    ExportError,
    export_onnx,
    graph_description,
    normalise,
    verify_onnx,
    write_artifact,
)
from model_export.vit import VisionTransformer, ViTConfig


def _model(head: str = "token") -> VisionTransformer:
    torch.manual_seed(0)
    cfg = ViTConfig(img_size=32, patch_size=8, num_classes=5, embed_dim=32, depth=2, num_heads=2, mlp_dim=64, head=head)
    model = VisionTransformer(cfg).eval()
    torch.nn.init.normal_(model.head.weight)
    return model


def _manifest(model: VisionTransformer) -> Manifest:
    return Manifest(
        name="tiny",
        labels=[f"c{i}" for i in range(5)],
        preprocessing=default_preprocessing("timm", 32, 3),
        **graph_description(model.cfg),
        opset=17,
        config=model.cfg.to_dict(),
        source=Source(checkpoint="w.safetensors", layout="timm", sha256="ab" * 32),
    )


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("artifact")
    model = _model()
    return model, out, write_artifact(model, out, _manifest(model))


def test_artifact_has_the_graph_and_a_manifest_with_hashes(artifact):
    _, out, manifest = artifact
    on_disk = Manifest.read(out)
    assert on_disk == manifest
    assert on_disk.onnx_sha256 == sha256_file(out / "model.onnx")
    assert on_disk.source.sha256 == "ab" * 32
    assert [(b["batch"], b["tensor_batch"]) for b in on_disk.verification["batches"]] == list(VERIFY_BATCHES)
    assert all(b["max_abs_diff"] <= FP32_TOLERANCE for b in on_disk.verification["batches"])


def test_graph_metadata_carries_the_same_manifest(artifact):
    _, out, manifest = artifact
    props = {p.key: p.value for p in onnx.load(str(out / "model.onnx")).metadata_props}
    embedded = Manifest.model_validate(json.loads(props[MANIFEST_METADATA_KEY]))
    assert embedded == manifest.model_copy(update={"onnx_sha256": None, "explain_onnx_sha256": None})


def _session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _pixels(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)


NO_TENSORS = np.empty((0, 3, 32, 32), dtype=np.float32)


def test_batch_axes_are_dynamic_and_names_are_the_constants(artifact):
    model, out, manifest = artifact
    session = _session(out / "model.onnx")
    pixels, tensors = session.get_inputs()
    assert [i.name for i in session.get_inputs()] == INPUT_NAMES == manifest.input_names
    assert [o.name for o in session.get_outputs()] == OUTPUT_NAMES == manifest.output_names
    assert pixels.type == "tensor(uint8)" and pixels.shape[1:] == [32, 32, 3]
    assert tensors.type == "tensor(float)" and tensors.shape[1:] == [3, 32, 32]
    assert all(isinstance(graph_input.shape[0], str) for graph_input in (pixels, tensors))
    x = _pixels(13)  # a batch size never traced
    logits, embedding = session.run(None, {PIXELS_NAME: x, PIXEL_VALUES_NAME: NO_TENSORS})
    with torch.no_grad():
        features = model.forward_features(normalise(torch.from_numpy(x), manifest.preprocessing))
        assert np.abs(logits - model.forward_head(features).numpy()).max() <= FP32_TOLERANCE
        assert np.abs(embedding - features[:, 0].numpy()).max() <= FP32_TOLERANCE


def test_the_graph_normalises_pixels_as_the_manifest_says(artifact):
    """Pixels in, and the same pixels normalised outside the graph in: the same rows, pixels first."""
    _, out, manifest = artifact
    x = _pixels(4, seed=3)
    normalised = normalise(torch.from_numpy(x), manifest.preprocessing).numpy()
    session = _session(out / "model.onnx")
    logits, embedding = session.run(None, {PIXELS_NAME: x, PIXEL_VALUES_NAME: normalised[:2]})
    assert logits.shape == (6, 5) and embedding.shape == (6, 32)
    assert np.abs(logits[:2] - logits[4:]).max() <= 1e-5 and np.abs(embedding[:2] - embedding[4:]).max() <= 1e-5


def test_the_class_token_slice_and_the_head_are_in_the_graph(artifact):
    _, out, _ = artifact
    graph = onnx.load(str(out / "model.onnx")).graph
    producers = {output: node for node in graph.node for output in node.output}
    assert producers[EMBEDDING_NAME].op_type == "Gather"  # the embedding is the same slice, before the head
    head = producers[LOGITS_NAME]
    assert head.op_type == "Gemm" and head.input[1] == "model.head.weight"
    pooled = producers[head.input[0]]  # x[:, 0] after the final norm
    assert pooled.op_type == "Gather" and onnx.helper.get_attribute_value(pooled.attribute[0]) == 1
    index = onnx.numpy_helper.to_array(producers[pooled.input[1]].attribute[0].t)
    assert index.shape == () and int(index) == 0
    assert producers[pooled.input[0]].op_type == "LayerNormalization"


def test_avg_pooling_exports_and_verifies_too(tmp_path):
    model = _model(head="avg")
    manifest = write_artifact(model, tmp_path, _manifest(model))
    assert (manifest.pooling, manifest.head, manifest.prefix_tokens) == ("avg", "avg", ["class"])


def test_verification_catches_a_graph_that_differs_from_the_model(tmp_path):
    model = _model()
    preprocessing = _manifest(model).preprocessing
    export_onnx(model, tmp_path / "model.onnx", preprocessing)
    with torch.no_grad():
        model.head.bias += 1e-3  # the model moved on; the graph did not
    with pytest.raises(ExportError, match="differs from PyTorch"):
        verify_onnx(model, tmp_path / "model.onnx", preprocessing)


def test_an_old_opset_is_refused(tmp_path):
    model = _model()
    with pytest.raises(ExportError, match="opset 13"):
        export_onnx(model, tmp_path / "m.onnx", _manifest(model).preprocessing, opset=13)


def test_explain_graph_outputs_logits_and_two_normalised_maps(artifact):
    model, out, manifest = artifact
    assert manifest.explain_onnx_sha256 == sha256_file(out / "model_explain.onnx")
    assert all(b["max_abs_diff"] <= FP32_TOLERANCE for b in manifest.verification["explain_batches"])
    session = _session(out / "model_explain.onnx")
    assert [o.name for o in session.get_outputs()] == EXPLAIN_OUTPUT_NAMES
    feeds = {PIXELS_NAME: _pixels(3, seed=1), PIXEL_VALUES_NAME: NO_TENSORS}
    logits, embedding, last_layer, rollout, prefix = session.run(None, feeds)
    plain = _session(out / "model.onnx").run(None, feeds)
    assert np.abs(logits - plain[0]).max() <= FP32_TOLERANCE and np.abs(embedding - plain[1]).max() <= FP32_TOLERANCE
    for grid in (last_layer, rollout):
        assert grid.shape == (3, 4, 4) and (grid >= 0).all()
        assert np.allclose(grid.sum(axis=(1, 2)), 1.0, atol=1e-5)
    assert prefix.shape == (3, 1) and ((prefix > 0) & (prefix < 1)).all()  # the class token's share of itself


def test_no_explain_writes_only_the_plain_graph(tmp_path):
    model = _model()
    manifest = write_artifact(model, tmp_path, _manifest(model), explain=False)
    assert manifest.explain_onnx_file is None and not (tmp_path / "model_explain.onnx").exists()
