import json
import pickle
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from model_export.checkpoints import (
    CheckpointError,
    detect_layout,
    from_hf,
    import_checkpoint,
    infer_shapes,
    load_strict,
    read_state_dict,
    strip_wrapper_prefixes,
)
from model_export.vit import VisionTransformer, ViTConfig

CFG = ViTConfig(img_size=32, patch_size=8, num_classes=4, embed_dim=64, depth=2, num_heads=1, mlp_dim=128)


@pytest.fixture
def state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return VisionTransformer(CFG).state_dict()


def test_wrapper_prefixes_are_stripped_however_nested():
    stripped = strip_wrapper_prefixes({"module._orig_mod.head.weight": torch.zeros(1), "cls_token": torch.zeros(1)})
    assert set(stripped) == {"head.weight", "cls_token"}


def test_missing_and_unexpected_keys_are_named(state):
    model = VisionTransformer(CFG)
    broken = dict(state)
    del broken["blocks.1.mlp.fc2.bias"]
    broken["blocks.0.ls1.gamma"] = torch.ones(64)
    with pytest.raises(CheckpointError) as error:
        load_strict(model, broken)
    assert "blocks.1.mlp.fc2.bias" in str(error.value) and "blocks.0.ls1.gamma" in str(error.value)


def test_shape_mismatch_names_the_key_and_both_shapes(state):
    broken = dict(state)
    broken["head.weight"] = torch.zeros(7, 64)
    with pytest.raises(CheckpointError, match=r"head\.weight: checkpoint has \(7, 64\), model expects \(4, 64\)"):
        load_strict(VisionTransformer(CFG), broken)


def test_a_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"cls_token": Exploit()}))
    with pytest.raises(CheckpointError, match="weights_only"):
        read_state_dict(path)
    assert not marker.exists()


def test_nested_training_checkpoints_and_all_suffixes_are_read(tmp_path, state):
    for suffix in (".pt", ".pth", ".bin"):
        torch.save({"epoch": 3, "model": {f"module.{k}": v for k, v in state.items()}}, tmp_path / f"c{suffix}")
        assert set(read_state_dict(tmp_path / f"c{suffix}")) == set(state)
    save_file(state, tmp_path / "c.safetensors")
    assert set(read_state_dict(tmp_path / "c.safetensors")) == set(state)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("weights.ckpt", b"x", "unsupported file type"),
        ("weights.safetensors", b"not safetensors", "not a readable safetensors"),
        ("missing.pt", None, "not found"),
    ],
)
def test_unreadable_files_say_why(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        read_state_dict(path)


def test_unknown_layout_is_refused():
    with pytest.raises(CheckpointError, match="unknown checkpoint layout"):
        detect_layout({"conv1.weight": torch.zeros(1), "fc.weight": torch.zeros(1)})


def test_an_hf_folder_without_config_or_weights_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        import_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64}))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        import_checkpoint(tmp_path)


def test_own_checkpoint_round_trips_at_a_new_resolution(tmp_path, state):
    save_file(state, tmp_path / "w.safetensors")
    imported = import_checkpoint(tmp_path / "w.safetensors", num_heads=1, img_size=48, labels=list("abcd"))
    assert imported.model.cfg.img_size == 48 and imported.model.pos_embed.shape == (1, 37, 64)
    assert torch.equal(imported.model.pos_embed[:, 0], state["pos_embed"][:, 0])
    assert imported.labels == list("abcd")
    assert len(imported.sha256) == 64
    with pytest.raises(CheckpointError, match="3 labels given for a head with 4 classes"):
        import_checkpoint(tmp_path / "w.safetensors", num_heads=1, labels=list("abc"))


def _family_state(**changes: object) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return VisionTransformer(replace(CFG, **changes)).state_dict()  # type: ignore[arg-type]


@pytest.mark.parametrize("no_embed_class", [False, True])
def test_the_position_table_says_whether_it_covers_the_prefix_tokens(no_embed_class):
    state = _family_state(reg_tokens=4, distillation_token=True, head="distilled", no_embed_class=no_embed_class)
    fields = infer_shapes(state)
    assert fields["no_embed_class"] is no_embed_class and fields["img_size"] == 32  # 4x4 patches either way
    assert (fields["reg_tokens"], fields["distillation_token"], fields["head"]) == (4, True, "distilled")


def test_a_position_table_that_fits_neither_reading_or_both_is_refused():
    state = _family_state(reg_tokens=4)
    state["pos_embed"] = torch.zeros(1, 18, 64)  # 18 - 5 = 13 and 18 are no squares
    with pytest.raises(CheckpointError, match="neither a square grid of patches nor one plus the 5 prefix tokens"):
        infer_shapes(state)
    state["pos_embed"] = torch.zeros(1, 9, 64)  # 3x3 patches alone, or 2x2 patches after 5 prefix rows
    with pytest.raises(CheckpointError, match="both a 3\\^2 grid and a 2\\^2 grid plus 5 prefix rows"):
        infer_shapes(state)
    assert infer_shapes(state, no_embed_class=True)["img_size"] == 3 * 8


def test_dinov2_registers_fold_the_class_position_row_into_the_token():
    cls, registers, table = torch.randn(1, 1, 8), torch.randn(1, 4, 8), torch.randn(1, 1 + 16, 8)
    hf = {
        "dinov2_with_registers.embeddings.cls_token": cls,
        "dinov2_with_registers.embeddings.register_tokens": registers,
        "dinov2_with_registers.embeddings.position_embeddings": table,
        "dinov2_with_registers.embeddings.mask_token": torch.zeros(1, 8),  # pretraining only: dropped
        "dinov2_with_registers.encoder.layer.0.layer_scale1.lambda1": torch.ones(8),
    }
    ours = from_hf(hf)
    assert set(ours) == {"cls_token", "reg_token", "pos_embed", "blocks.0.ls1.gamma"}
    assert torch.equal(ours["cls_token"], cls + table[:, :1]) and torch.equal(ours["pos_embed"], table[:, 1:])
    assert torch.equal(ours["reg_token"], registers)


def test_a_training_record_with_the_old_pool_key_imports(tmp_path, state):
    save_file(state, tmp_path / "weights.safetensors")
    record = {"config": {**CFG.to_dict(), "pool": "token"}, "labels": list("abcd"), "normalisation": {}}
    del record["config"]["head"]
    record["normalisation"] = {"mean": [0.5] * 3, "std": [0.5] * 3}
    (tmp_path / "training_record.json").write_text(json.dumps(record))
    imported = import_checkpoint(tmp_path)
    assert imported.layout == "native" and imported.model.cfg == CFG and imported.labels == list("abcd")


def test_head_names_the_pooling_where_the_shapes_cannot(tmp_path):
    # timm with global_pool="avg" and fc_norm=False: the same tensors as token pooling.
    import timm

    from tests.model_export.families import randomise

    reference = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=1, num_classes=3, global_pool="avg", fc_norm=False
    ).eval()
    randomise(reference, seed=7)
    save_file(reference.state_dict(), tmp_path / "gap.safetensors")
    images = torch.randn(2, 3, 32, 32)
    as_token = import_checkpoint(tmp_path / "gap.safetensors")
    as_avg = import_checkpoint(tmp_path / "gap.safetensors", head="avg")
    assert as_token.model.cfg.head == "token"
    with torch.no_grad():
        expected = reference(images)
        assert (as_avg.model(images) - expected).abs().max() <= 1e-5
        assert (as_token.model(images) - expected).abs().max() > 1e-2
