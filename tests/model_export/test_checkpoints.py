import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from model_export.checkpoints import (
    CheckpointError,
    detect_layout,
    import_checkpoint,
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
