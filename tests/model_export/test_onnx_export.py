import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from model_export.checkpoints import default_preprocessing, sha256_file
from model_export.manifest import EXPLAIN_OUTPUT_NAMES, INPUT_NAME, LOGITS_NAME, MANIFEST_METADATA_KEY, Manifest, Source
from model_export.onnx_export import FP32_TOLERANCE, ExportError, export_onnx, verify_onnx, write_artifact
from model_export.vit import VisionTransformer, ViTConfig


def _model(pool: str = "token") -> VisionTransformer:
    torch.manual_seed(0)
    cfg = ViTConfig(img_size=32, patch_size=8, num_classes=5, embed_dim=32, depth=2, num_heads=2, mlp_dim=64, pool=pool)
    model = VisionTransformer(cfg).eval()
    torch.nn.init.normal_(model.head.weight)
    return model


def _manifest(model: VisionTransformer) -> Manifest:
    return Manifest(
        name="tiny",
        labels=[f"c{i}" for i in range(5)],
        preprocessing=default_preprocessing("timm", 32, 3),
        pooling=model.cfg.pool,
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
    assert [b["batch"] for b in on_disk.verification["batches"]] == [1, 2, 3, 8]
    assert all(b["max_abs_diff"] <= FP32_TOLERANCE for b in on_disk.verification["batches"])


def test_graph_metadata_carries_the_same_manifest(artifact):
    _, out, manifest = artifact
    props = {p.key: p.value for p in onnx.load(str(out / "model.onnx")).metadata_props}
    embedded = Manifest.model_validate(json.loads(props[MANIFEST_METADATA_KEY]))
    assert embedded == manifest.model_copy(update={"onnx_sha256": None, "explain_onnx_sha256": None})


def test_batch_axis_is_dynamic_and_names_are_the_constants(artifact):
    model, out, _ = artifact
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    (graph_input,), (graph_output,) = session.get_inputs(), session.get_outputs()
    assert (graph_input.name, graph_output.name) == (INPUT_NAME, LOGITS_NAME)
    assert isinstance(graph_input.shape[0], str) and graph_input.shape[1:] == [3, 32, 32]
    x = np.random.default_rng(0).standard_normal((13, 3, 32, 32), dtype=np.float32)  # never traced
    (logits,) = session.run(None, {INPUT_NAME: x})
    with torch.no_grad():
        assert np.abs(logits - model(torch.from_numpy(x)).numpy()).max() <= FP32_TOLERANCE


def test_the_class_token_slice_and_the_head_are_in_the_graph(artifact):
    _, out, _ = artifact
    graph = onnx.load(str(out / "model.onnx")).graph
    producers = {output: node for node in graph.node for output in node.output}
    head = producers[LOGITS_NAME]
    assert head.op_type == "Gemm" and head.input[1] == "model.head.weight"
    pooled = producers[head.input[0]]  # x[:, 0] after the final norm
    assert pooled.op_type == "Gather" and onnx.helper.get_attribute_value(pooled.attribute[0]) == 1
    index = onnx.numpy_helper.to_array(producers[pooled.input[1]].attribute[0].t)
    assert index.shape == () and int(index) == 0
    assert producers[pooled.input[0]].op_type == "LayerNormalization"


def test_avg_pooling_exports_and_verifies_too(tmp_path):
    model = _model(pool="avg")
    manifest = write_artifact(model, tmp_path, _manifest(model))
    assert manifest.pooling == "avg"


def test_verification_catches_a_graph_that_differs_from_the_model(tmp_path):
    model = _model()
    export_onnx(model, tmp_path / "model.onnx")
    with torch.no_grad():
        model.head.bias += 1e-3  # the model moved on; the graph did not
    with pytest.raises(ExportError, match="differs from PyTorch"):
        verify_onnx(model, tmp_path / "model.onnx")


def test_an_old_opset_is_refused(tmp_path):
    model = _model()
    with pytest.raises(ExportError, match="opset 13"):
        export_onnx(model, tmp_path / "m.onnx", opset=13)


def test_explain_graph_outputs_logits_and_two_normalised_maps(artifact):
    model, out, manifest = artifact
    assert manifest.explain_onnx_sha256 == sha256_file(out / "model_explain.onnx")
    assert all(b["max_abs_diff"] <= FP32_TOLERANCE for b in manifest.verification["explain_batches"])
    session = ort.InferenceSession(str(out / "model_explain.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == EXPLAIN_OUTPUT_NAMES
    x = np.random.default_rng(1).standard_normal((3, 3, 32, 32), dtype=np.float32)
    logits, last_layer, rollout = session.run(None, {INPUT_NAME: x})
    plain = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert np.abs(logits - plain.run(None, {INPUT_NAME: x})[0]).max() <= FP32_TOLERANCE
    for grid in (last_layer, rollout):
        assert grid.shape == (3, 4, 4) and (grid >= 0).all()
        assert np.allclose(grid.sum(axis=(1, 2)), 1.0, atol=1e-5)


def test_no_explain_writes_only_the_plain_graph(tmp_path):
    model = _model()
    manifest = write_artifact(model, tmp_path, _manifest(model), explain=False)
    assert manifest.explain_onnx_file is None and not (tmp_path / "model_explain.onnx").exists()
