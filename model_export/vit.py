"""A plain-PyTorch Vision Transformer and its [class]-token family.

One model covers the plain ViT, DeiT (a distillation token and its own head), registers
(Darcet et al., 2024), DeiT III and DINOv2 (LayerScale, position embeddings for the patches
only), global-average-pooled ViTs with `fc_norm`, and the DINOv2 classifier, which reads the
[class] token beside the patch mean. Parameter names follow timm's layout (`cls_token`,
`dist_token`, `reg_token`, `pos_embed`, `blocks.N.attn.qkv`, `blocks.N.ls1.gamma`, `head`),
so a timm checkpoint maps onto this module almost one to one.

The sequence is always [class] [distillation] [register x R] [patch x N], each prefix kind
optional; `num_prefix_tokens` is the one count that says which rows are not patches.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import get_args

import torch
import torch.nn.functional as F
from torch import nn

# What the classifier reads (see VisionTransformer.forward_head), and the kinds of prefix rows:
# named once, in the torch-free manifest that the server reads.
from model_export.manifest import Head, PrefixToken

HEADS: tuple[str, ...] = get_args(Head)
# LayerScale's starting value when training from scratch (timm's default; imports overwrite it).
LAYER_SCALE_INIT = 1e-5


@dataclass(frozen=True)
class ViTConfig:
    img_size: int = 224  # square input side in pixels; must be a multiple of patch_size
    patch_size: int = 16  # side of one square patch (and stride of the patch conv)
    in_chans: int = 3  # 3 for RGB, 1 for greyscale
    num_classes: int = 1000  # classifier outputs
    embed_dim: int = 768  # token width D
    depth: int = 12  # encoder blocks
    num_heads: int = 12  # attention heads; embed_dim must divide evenly
    mlp_dim: int = 3072  # hidden width of each block's MLP
    qkv_bias: bool = True  # bias on the fused q/k/v projection
    layer_norm_eps: float = 1e-6  # timm and torchvision use 1e-6, Hugging Face ViT/DeiT 1e-12
    class_token: bool = True  # a learned [class] token as row 0 (timm class_token=False drops it)
    distillation_token: bool = False  # DeiT's second learned token, row 1, read by the distillation head
    reg_tokens: int = 0  # learned register tokens after those (timm reg_tokens, DINOv2 with registers)
    no_embed_class: bool = False  # position embedding covers the patches only, not the prefix (DeiT III, timm)
    layer_scale: bool = False  # learned per-channel scale on each residual branch (DeiT III, DINOv2)
    fc_norm: bool = False  # the final norm follows the pooling (timm fc_norm) instead of every token
    head: Head = "token"  # token: x[:, 0]; avg: patch mean; distilled: DeiT's two heads; token+patch_mean: DINOv2

    def __post_init__(self) -> None:
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {', '.join(HEADS)}, not {self.head!r}")
        if self.reg_tokens < 0:
            raise ValueError(f"reg_tokens must be >= 0, not {self.reg_tokens}")
        if self.distillation_token and not self.class_token:
            raise ValueError("a distillation token needs the class token before it")
        if self.head != "avg" and not self.class_token:
            raise ValueError(f"head {self.head!r} reads the class token, which this model does not have")
        if self.head == "distilled" and not self.distillation_token:
            raise ValueError("the distilled head needs the distillation token")
        if self.fc_norm and self.head not in ("token", "avg"):
            raise ValueError(f"fc_norm applies to the token or avg head, not {self.head!r}")

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def prefix_tokens(self) -> list[PrefixToken]:
        """The kind of each row before the patches, in order."""
        kinds: list[PrefixToken] = ["class"] if self.class_token else []
        kinds += ["distillation"] if self.distillation_token else []
        return kinds + ["register"] * self.reg_tokens

    @property
    def num_prefix_tokens(self) -> int:
        return len(self.prefix_tokens)

    @property
    def pos_embed_prefix_rows(self) -> int:
        """Rows of the position table that belong to prefix tokens: all of them, or none."""
        return 0 if self.no_embed_class else self.num_prefix_tokens

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def multiply_adds(self) -> int:
        """Multiply-adds in one image's forward pass (the matrix products; norms and softmax are noise)."""
        tokens, d = self.num_patches + self.num_prefix_tokens, self.embed_dim
        patch_embed = self.num_patches * self.in_chans * self.patch_size**2 * d
        attention = tokens * d * 3 * d + 2 * tokens * tokens * d + tokens * d * d  # qkv, scores and mix, proj
        mlp = 2 * tokens * d * self.mlp_dim
        head = (1 if self.head in ("token", "avg") else 2) * d * self.num_classes
        return patch_embed + self.depth * (attention + mlp) + head


def _standard(embed_dim: int, depth: int, num_heads: int, patch: int = 16, img: int = 224) -> ViTConfig:
    return ViTConfig(
        img_size=img, patch_size=patch, embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_dim=4 * embed_dim
    )


PRESETS: dict[str, ViTConfig] = {
    "vit_tiny_patch16_224": _standard(192, 12, 3),
    "vit_small_patch16_224": _standard(384, 12, 6),
    "vit_base_patch16_224": _standard(768, 12, 12),
    "vit_large_patch16_224": _standard(1024, 24, 16),
    # The embedded default model: 28x28 greyscale Fashion-MNIST, 7x7 patches of 4 px.
    "vit_fashion_mnist": ViTConfig(
        img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=64, depth=6, num_heads=4, mlp_dim=256
    ),
}


def preset(name: str, **overrides: object) -> ViTConfig:
    try:
        base = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None
    return replace(base, **overrides)  # type: ignore[arg-type]


def _trunc_normal(tensor: torch.Tensor, std: float) -> None:
    # Bounds at two standard deviations: trunc_normal_'s defaults (+-2 absolute) truncate nothing at std 0.02.
    nn.init.trunc_normal_(tensor, std=std, a=-2 * std, b=2 * std)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, P + N, head_dim)
        if need_weights:
            # Explicit softmax so the attention map itself can be returned (and exported).
            weights = (q @ k.transpose(-2, -1) * self.head_dim**-0.5).softmax(dim=-1)  # (B, H, P + N, P + N)
            out = weights @ v
        else:
            weights = None
            out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d)), weights


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    """A learned per-channel gain on a residual branch (Touvron et al., 2021), so deep models start near identity."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), LAYER_SCALE_INIT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm encoder block: x + ls1(attn(norm(x))), then x + ls2(mlp(norm(x))); ls is identity without LayerScale."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg.embed_dim, cfg.num_heads, cfg.qkv_bias)
        self.ls1 = LayerScale(cfg.embed_dim) if cfg.layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(cfg.embed_dim, cfg.mlp_dim)
        self.ls2 = LayerScale(cfg.embed_dim) if cfg.layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor, need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        attended, weights = self.attn(self.norm1(x), need_weights)
        x = x + self.ls1(attended)
        return x + self.ls2(self.mlp(self.norm2(x))), weights


class VisionTransformer(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_prefix_tokens = cfg.num_prefix_tokens  # rows before the patches: pooling, resampling, explain
        d = cfg.embed_dim
        self.patch_embed = nn.Conv2d(cfg.in_chans, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d)) if cfg.class_token else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, d)) if cfg.distillation_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, cfg.reg_tokens, d)) if cfg.reg_tokens else None
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.pos_embed_prefix_rows + cfg.num_patches, d))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        # One final norm: on every token (the usual place), or on the pooled vector (timm fc_norm).
        self.norm = nn.Identity() if cfg.fc_norm else nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.fc_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps) if cfg.fc_norm else nn.Identity()
        self.head = nn.Linear(2 * d if cfg.head == "token+patch_mean" else d, cfg.num_classes)
        self.head_dist = nn.Linear(d, cfg.num_classes) if cfg.head == "distilled" else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # A zero [class] token would start identical for every image and only learn through
        # attention; a small random start (as in ViT and timm) gives it its own gradient path.
        for token in (self.cls_token, self.dist_token, self.reg_token, self.pos_embed):
            if token is not None:
                _trunc_normal(token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                _trunc_normal(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        fan_in = self.patch_embed.in_channels * self.patch_embed.kernel_size[0] * self.patch_embed.kernel_size[1]
        _trunc_normal(self.patch_embed.weight, std=math.sqrt(1.0 / fan_in))
        if self.patch_embed.bias is not None:
            nn.init.zeros_(self.patch_embed.bias)
        # A zero head makes every class equally likely at step 0, a calm start for fine-tuning too.
        for head in (self.head, self.head_dist):
            if head is not None:
                nn.init.zeros_(head.weight)
                nn.init.zeros_(head.bias)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images)  # (B, D, H/p, W/p)
        x = x.flatten(2).transpose(1, 2)  # (B, N, D)
        tokens = [t for t in (self.cls_token, self.dist_token, self.reg_token) if t is not None]
        prefix = [t.expand(x.shape[0], -1, -1) for t in tokens]  # (B, 1, D), (B, 1, D), (B, R, D): P rows
        if self.cfg.no_embed_class:
            # The table has rows for the patches only: add, then put the prefix tokens in front.
            return torch.cat([*prefix, x + self.pos_embed], dim=1)  # (B, P + N, D)
        return torch.cat([*prefix, x], dim=1) + self.pos_embed  # (B, P + N, D)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        x = self.embed(images)
        for block in self.blocks:
            x, _ = block(x)
        return self.norm(x)  # (B, P + N, D)

    def forward_features_with_attention(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Features plus every block's attention weights, each (B, H, P + N, P + N)."""
        x = self.embed(images)
        attentions = []
        for block in self.blocks:
            x, weights = block(x, need_weights=True)
            attentions.append(weights)
        return self.norm(x), attentions

    def patch_mean(self, features: torch.Tensor) -> torch.Tensor:
        """Mean of the patch rows only, (B, D): the prefix rows are not part of the image."""
        return features[:, self.num_prefix_tokens :].mean(dim=1)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) from the final tokens (B, P + N, D)."""
        head = self.cfg.head
        if head == "token":
            return self.head(self.fc_norm(features[:, 0]))  # the [class] token's output is the image summary
        if head == "avg":
            return self.head(self.fc_norm(self.patch_mean(features)))
        if head == "distilled":
            assert self.head_dist is not None
            # DeiT: a class head on row 0 and a distillation head on row 1; inference averages the two.
            return (self.head(features[:, 0]) + self.head_dist(features[:, 1])) / 2
        # DINOv2: one linear layer on the [class] token beside the patch mean, (B, 2D).
        return self.head(torch.cat([features[:, 0], self.patch_mean(features)], dim=1))

    def embedding(self, features: torch.Tensor) -> torch.Tensor:
        """The image's vector, (B, D): the [class] token's final output after whatever final norm
        it gets, before any head, when there is one; otherwise the pooled vector the head reads."""
        if not self.cfg.class_token:
            return self.fc_norm(self.patch_mean(features))
        cls = features[:, 0]  # (B, D)
        return self.fc_norm(cls) if self.cfg.head == "token" else cls  # fc_norm is for what the head pools

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))


def class_token_attention(
    attentions: list[torch.Tensor], grid: int, num_prefix_tokens: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where the [class] token (row 0) looked: two (B, grid, grid) patch maps that each sum to 1,
    and the (B, P) shares of its last-layer attention that went to each prefix row.

    last layer: the class token's attention row in the final block, mean over heads.
    rollout: attention rollout (Abnar & Zuidema, 2020): each block's head-mean attention plus
    the residual path (0.5 A + 0.5 I, rows renormalised), multiplied through the depth.
    The maps cover the patches only; the prefix shares plus the patches' share sum to 1.
    """
    last_row = attentions[-1].mean(dim=1)[:, 0]  # (B, P + N)
    prefix_shares = last_row[:, :num_prefix_tokens]  # (B, P): the class token itself, distillation, registers
    tokens = attentions[0].shape[-1]
    eye = torch.eye(tokens, dtype=attentions[0].dtype, device=attentions[0].device)
    rollout = eye.expand(attentions[0].shape[0], tokens, tokens)
    for weights in attentions:
        mixed = 0.5 * weights.mean(dim=1) + 0.5 * eye
        rollout = (mixed / mixed.sum(dim=-1, keepdim=True)) @ rollout  # (B, P + N, P + N)
    maps = []
    for row in (last_row[:, num_prefix_tokens:], rollout[:, 0, num_prefix_tokens:]):  # each (B, N)
        maps.append((row / row.sum(dim=-1, keepdim=True)).reshape(-1, grid, grid))
    return maps[0], maps[1], prefix_shares


def resample_pos_embed(
    pos_embed: torch.Tensor, new_grid: int, num_prefix_rows: int = 1, antialias: bool = True
) -> torch.Tensor:
    """Resize the patch rows of a (1, prefix + g*g, D) table to new_grid; prefix rows are kept as they are.

    Bicubic, as timm and Hugging Face do; antialias=False matches transformers' ViT, DeiT and
    DINOv2 (timm and DINOv2-with-registers antialias)."""
    prefix, patches = pos_embed[:, :num_prefix_rows], pos_embed[:, num_prefix_rows:]
    old_grid = math.isqrt(patches.shape[1])
    if old_grid * old_grid != patches.shape[1]:
        raise ValueError(f"position embedding has {patches.shape[1]} patch rows, not a square grid")
    if old_grid == new_grid:
        return pos_embed
    d = patches.shape[-1]
    grid = patches.reshape(1, old_grid, old_grid, d).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False, antialias=antialias)
    patches = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, d).to(pos_embed.dtype)
    return torch.cat([prefix, patches], dim=1)
