from dataclasses import replace

import pytest
import torch

from model_export.vit import PRESETS, VisionTransformer, ViTConfig, class_token_attention, preset, resample_pos_embed

SMALL = ViTConfig(img_size=32, patch_size=8, num_classes=5, embed_dim=32, depth=2, num_heads=4, mlp_dim=64)


def test_shapes_follow_the_token_bookkeeping():
    model = VisionTransformer(SMALL).eval()
    images = torch.randn(3, 3, 32, 32)
    features = model.forward_features(images)
    assert features.shape == (3, 1 + 16, 32)  # class token + 4x4 patches
    assert model(images).shape == (3, 5)
    assert model.pos_embed.shape == (1, 1 + 16, 32)


def test_token_pooling_reads_only_the_class_token():
    model = VisionTransformer(SMALL).eval()
    torch.nn.init.normal_(model.head.weight)
    features = torch.randn(2, 17, 32)
    changed = features.clone()
    changed[:, 1:] = torch.randn(2, 16, 32)
    assert torch.equal(model.forward_head(features), model.forward_head(changed))
    changed[:, 0] += 1.0
    assert not torch.allclose(model.forward_head(features), model.forward_head(changed))


def test_avg_pooling_reads_the_patch_tokens_not_the_class_token():
    model = VisionTransformer(ViTConfig(**{**SMALL.to_dict(), "head": "avg"})).eval()
    torch.nn.init.normal_(model.head.weight)
    features = torch.randn(2, 17, 32)
    changed = features.clone()
    changed[:, 0] += 5.0
    assert torch.equal(model.forward_head(features), model.forward_head(changed))
    assert torch.allclose(model.forward_head(features), model.head(features[:, 1:].mean(1)))


def test_attention_path_matches_the_fused_path():
    model = VisionTransformer(SMALL).eval()
    images = torch.randn(2, 3, 32, 32)
    features, attentions = model.forward_features_with_attention(images)
    assert torch.allclose(features, model.forward_features(images), atol=1e-5)
    assert len(attentions) == SMALL.depth
    assert attentions[0].shape == (2, 4, 17, 17)
    assert torch.allclose(attentions[-1].sum(-1), torch.ones(2, 4, 17), atol=1e-5)


@pytest.mark.parametrize(
    ("name", "params"),
    [
        # Parameter counts of the reference ViTs with a 1000-class head (timm reports the same).
        ("vit_tiny_patch16_224", 5_717_416),
        ("vit_small_patch16_224", 22_050_664),
        ("vit_base_patch16_224", 86_567_656),
        ("vit_large_patch16_224", 304_326_632),
    ],
)
def test_presets_have_the_standard_sizes(name, params):
    with torch.device("meta"):
        model = VisionTransformer(PRESETS[name])
    assert sum(p.numel() for p in model.parameters()) == params


def test_preset_overrides_and_bad_shapes_are_refused():
    assert preset("vit_base_patch16_224", img_size=384).grid_size == 24
    with pytest.raises(ValueError, match="multiple of patch_size"):
        preset("vit_base_patch16_224", img_size=230)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        ViTConfig(embed_dim=100, num_heads=12)
    with pytest.raises(ValueError, match="unknown preset"):
        preset("vit_huge")


def test_class_token_and_position_init_is_a_small_truncated_normal():
    torch.manual_seed(0)
    model = VisionTransformer(preset("vit_base_patch16_224", num_classes=10))
    for tensor in (model.cls_token, model.pos_embed):
        assert 0.012 < tensor.std().item() < 0.02  # a normal truncated at 2 std has std 0.88 * 0.02
        assert tensor.abs().max().item() <= 0.04 + 1e-7


def test_class_token_receives_gradient_and_changes_in_training():
    torch.manual_seed(0)
    model = VisionTransformer(SMALL)
    before = model.cls_token.detach().clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 5, (8,))
    for _ in range(3):  # the zero head passes no gradient back on the very first step
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert model.cls_token.grad is not None and model.cls_token.grad.abs().sum() > 0
    assert not torch.allclose(model.cls_token, before)


def test_resample_keeps_the_class_row_and_interpolates_the_grid():
    grid = torch.linspace(0, 1, 4)
    smooth = (grid[:, None] + grid[None, :]).reshape(1, 16, 1).expand(1, 16, 8)
    table = torch.cat([torch.full((1, 1, 8), 7.0), smooth], dim=1)
    resampled = resample_pos_embed(table, new_grid=8)
    assert resampled.shape == (1, 1 + 64, 8)
    assert torch.equal(resampled[:, 0], table[:, 0])
    patches = resampled[0, 1:, 0].reshape(8, 8)
    assert patches[0, 0] < patches[0, -1] < patches[-1, -1]  # the gradient's direction survives
    assert resample_pos_embed(table, new_grid=4) is table
    with pytest.raises(ValueError, match="square grid"):
        resample_pos_embed(table[:, :-1], new_grid=4)


def test_attention_maps_are_grids_that_sum_to_one():
    model = VisionTransformer(SMALL).eval()
    with torch.no_grad():
        _, attentions = model.forward_features_with_attention(torch.randn(2, 3, 32, 32))
        last, rollout, prefix = class_token_attention(attentions, grid=4)
    for grid in (last, rollout):
        assert grid.shape == (2, 4, 4) and (grid >= 0).all()
        assert torch.allclose(grid.sum(dim=(1, 2)), torch.ones(2))
    # The class token's own share: what the patches did not get of its last-layer attention.
    assert prefix.shape == (2, 1)
    assert torch.allclose(prefix[:, 0], 1 - attentions[-1].mean(dim=1)[:, 0, 1:].sum(-1))


def test_rollout_of_uniform_attention_is_uniform_and_follows_a_focused_class_token():
    uniform = [torch.full((1, 2, 17, 17), 1 / 17) for _ in range(3)]
    _, rollout, _ = class_token_attention(uniform, grid=4)
    assert torch.allclose(rollout, torch.full((1, 4, 4), 1 / 16))
    focused = torch.full((1, 2, 17, 17), 1 / 17)
    focused[:, :, 0] = 0
    focused[:, :, 0, 6] = 1.0  # the class token looks only at patch 5 (row 1, col 1)
    last, rollout, _ = class_token_attention([focused], grid=4)
    assert last[0, 1, 1] == 1.0 and rollout[0].argmax() == 5


FAMILY = ViTConfig(
    img_size=32, patch_size=8, num_classes=5, embed_dim=32, depth=2, num_heads=4, mlp_dim=64,
    distillation_token=True, reg_tokens=3, head="distilled",
)  # fmt: skip


@pytest.mark.parametrize("no_embed_class", [False, True])
def test_prefix_rows_come_first_and_the_position_table_covers_them_or_not(no_embed_class):
    cfg = replace(FAMILY, no_embed_class=no_embed_class)
    model = VisionTransformer(cfg).eval()
    assert cfg.prefix_tokens == ["class", "distillation", "register", "register", "register"]
    assert model.num_prefix_tokens == 5
    assert model.pos_embed.shape == (1, (0 if no_embed_class else 5) + 16, 32)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        x = model.embed(images)
        patches = model.patch_embed(images).flatten(2).transpose(1, 2)
    assert x.shape == (2, 5 + 16, 32)
    assert torch.equal(x[:, 5:], patches + model.pos_embed[:, -16:])  # patch rows: patch + their own table rows
    prefix_rows = torch.cat([model.cls_token, model.dist_token, model.reg_token], dim=1)
    expected = prefix_rows if no_embed_class else prefix_rows + model.pos_embed[:, :5]
    assert torch.equal(x[:, :5], expected.expand(2, -1, -1))


def test_each_head_reads_what_it_says():
    features = torch.randn(2, 5 + 16, 32)
    distilled = VisionTransformer(FAMILY).eval()
    for head in (distilled.head, distilled.head_dist):
        torch.nn.init.normal_(head.weight)
    expected = (distilled.head(features[:, 0]) + distilled.head_dist(features[:, 1])) / 2
    assert torch.allclose(distilled.forward_head(features), expected)
    dinov2 = VisionTransformer(replace(FAMILY, distillation_token=False, head="token+patch_mean")).eval()
    torch.nn.init.normal_(dinov2.head.weight)
    rows = torch.randn(2, 4 + 16, 32)  # the class token, 3 registers, 16 patches
    assert dinov2.head.in_features == 64
    assert torch.allclose(dinov2.forward_head(rows), dinov2.head(torch.cat([rows[:, 0], rows[:, 4:].mean(1)], 1)))
    pooled = VisionTransformer(replace(FAMILY, class_token=False, distillation_token=False, head="avg")).eval()
    torch.nn.init.normal_(pooled.head.weight)
    changed = rows[:, 1:].clone()  # 3 registers, 16 patches
    changed[:, :3] += 5.0  # registers are not patches: the mean never sees them
    assert torch.equal(pooled.forward_head(rows[:, 1:]), pooled.forward_head(changed))


def test_the_embedding_is_the_class_token_or_without_one_the_pooled_vector():
    features = torch.randn(2, 5 + 16, 32)
    assert torch.equal(VisionTransformer(FAMILY).embedding(features), features[:, 0])
    no_class = VisionTransformer(replace(FAMILY, class_token=False, distillation_token=False, head="avg", fc_norm=True))
    with torch.no_grad():
        torch.nn.init.normal_(no_class.fc_norm.weight)
        assert torch.allclose(no_class.embedding(features[:, 1:]), no_class.fc_norm(features[:, 4:].mean(1)))


def test_layer_scale_gains_scale_each_residual_branch():
    model = VisionTransformer(replace(SMALL, layer_scale=True)).eval()
    assert model.blocks[0].ls1.gamma.shape == (32,)
    x = torch.randn(2, 17, 32)
    with torch.no_grad():
        for block in model.blocks:
            block.ls1.gamma.zero_()
            block.ls2.gamma.zero_()
        assert torch.equal(model.blocks[0](x)[0], x)  # zero gains: the block is the identity
        model.blocks[0].ls2.gamma.fill_(2.0)
        residual = x + 2.0 * model.blocks[0].mlp(model.blocks[0].norm2(x))
        assert torch.allclose(model.blocks[0](x)[0], residual)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"class_token": False}, "distillation token needs the class token"),
        ({"distillation_token": False}, "distilled head needs the distillation token"),
        ({"distillation_token": False, "class_token": False, "head": "token"}, "reads the class token"),
        ({"fc_norm": True}, "fc_norm applies to the token or avg head"),
        ({"head": "max"}, "head must be one of"),
        ({"reg_tokens": -1}, "reg_tokens must be >= 0"),
    ],
)
def test_inconsistent_prefix_and_head_settings_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        replace(FAMILY, **changes)


def test_multiply_adds_count_the_prefix_tokens_and_the_wider_heads():
    plain = replace(FAMILY, distillation_token=False, reg_tokens=0, head="token")
    assert FAMILY.multiply_adds() > plain.multiply_adds()
    assert replace(plain, head="token+patch_mean").multiply_adds() - plain.multiply_adds() == 32 * 5


def test_resample_without_prefix_rows_and_without_antialias():
    table = torch.randn(1, 16, 8)
    smooth = resample_pos_embed(table, new_grid=2, num_prefix_rows=0)
    sharp = resample_pos_embed(table, new_grid=2, num_prefix_rows=0, antialias=False)
    assert smooth.shape == sharp.shape == (1, 4, 8)
    assert not torch.allclose(smooth, sharp)  # downsampling: antialiasing averages more of the grid
