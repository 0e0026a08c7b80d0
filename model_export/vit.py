"""A plain-PyTorch Vision Transformer whose classifier reads the [class] token.

Parameter names follow timm's layout (`cls_token`, `pos_embed`, `blocks.N.attn.qkv`, `head`),
so a timm checkpoint maps onto this module almost one to one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Pooling = Literal["token", "avg"]


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
    layer_norm_eps: float = 1e-6  # timm and torchvision use 1e-6, Hugging Face 1e-12
    pool: Pooling = "token"  # "token": classify x[:, 0]; "avg": mean of the patch tokens

    def __post_init__(self) -> None:
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.pool not in ("token", "avg"):
            raise ValueError(f"pool must be 'token' or 'avg', not {self.pool!r}")

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def multiply_adds(self) -> int:
        """Multiply-adds in one image's forward pass (the matrix products; norms and softmax are noise)."""
        tokens, d = self.num_patches + 1, self.embed_dim
        patch_embed = self.num_patches * self.in_chans * self.patch_size**2 * d
        attention = tokens * d * 3 * d + 2 * tokens * tokens * d + tokens * d * d  # qkv, scores and mix, proj
        mlp = 2 * tokens * d * self.mlp_dim
        return patch_embed + self.depth * (attention + mlp) + d * self.num_classes


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
        q, k, v = qkv.unbind(0)  # each (B, H, 1 + N, head_dim)
        if need_weights:
            # Explicit softmax so the attention map itself can be returned (and exported).
            weights = (q @ k.transpose(-2, -1) * self.head_dim**-0.5).softmax(dim=-1)  # (B, H, 1 + N, 1 + N)
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


class Block(nn.Module):
    """Pre-norm encoder block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg.embed_dim, cfg.num_heads, cfg.qkv_bias)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(cfg.embed_dim, cfg.mlp_dim)

    def forward(self, x: torch.Tensor, need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        attended, weights = self.attn(self.norm1(x), need_weights)
        x = x + attended
        return x + self.mlp(self.norm2(x)), weights


class VisionTransformer(nn.Module):
    num_prefix_tokens = 1  # the [class] token; position-embedding row 0 belongs to it

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.embed_dim
        self.patch_embed = nn.Conv2d(cfg.in_chans, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix_tokens + cfg.num_patches, d))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.head = nn.Linear(d, cfg.num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # A zero [class] token would start identical for every image and only learn through
        # attention; a small random start (as in ViT and timm) gives it its own gradient path.
        _trunc_normal(self.cls_token, std=0.02)
        _trunc_normal(self.pos_embed, std=0.02)
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
        nn.init.zeros_(self.patch_embed.bias)
        # A zero head makes every class equally likely at step 0, a calm start for fine-tuning too.
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images)  # (B, D, H/p, W/p)
        x = x.flatten(2).transpose(1, 2)  # (B, N, D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, D)
        return torch.cat([cls, x], dim=1) + self.pos_embed  # (B, 1 + N, D)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        x = self.embed(images)
        for block in self.blocks:
            x, _ = block(x)
        return self.norm(x)  # (B, 1 + N, D)

    def forward_features_with_attention(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Features plus every block's attention weights, each (B, H, 1 + N, 1 + N)."""
        x = self.embed(images)
        attentions = []
        for block in self.blocks:
            x, weights = block(x, need_weights=True)
            attentions.append(weights)
        return self.norm(x), attentions  # type: ignore[return-value]

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Logits (B, num_classes), or with pre_logits the pooled feature the head reads (B, D)."""
        if self.cfg.pool == "token":
            pooled = features[:, 0]  # the [class] token's output is the image summary, (B, D)
        else:
            pooled = features[:, self.num_prefix_tokens :].mean(dim=1)  # mean of patch tokens, (B, D)
        return pooled if pre_logits else self.head(pooled)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))


def class_token_attention(attentions: list[torch.Tensor], grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the [class] token looked, as two (B, grid, grid) maps that each sum to 1.

    last layer: the class token's attention row in the final block, mean over heads.
    rollout: attention rollout (Abnar & Zuidema, 2020): each block's head-mean attention plus
    the residual path (0.5 A + 0.5 I, rows renormalised), multiplied through the depth.
    """
    last = attentions[-1].mean(dim=1)[:, 0, 1:]  # (B, N)
    tokens = attentions[0].shape[-1]
    eye = torch.eye(tokens, dtype=attentions[0].dtype, device=attentions[0].device)
    rollout = eye.expand(attentions[0].shape[0], tokens, tokens)
    for weights in attentions:
        mixed = 0.5 * weights.mean(dim=1) + 0.5 * eye
        rollout = (mixed / mixed.sum(dim=-1, keepdim=True)) @ rollout  # (B, 1 + N, 1 + N)
    maps = []
    for row in (last, rollout[:, 0, 1:]):
        maps.append((row / row.sum(dim=-1, keepdim=True)).reshape(-1, grid, grid))
    return maps[0], maps[1]


def resample_pos_embed(pos_embed: torch.Tensor, new_grid: int, num_prefix_tokens: int = 1) -> torch.Tensor:
    """Resize the patch rows of a (1, prefix + g*g, D) table to new_grid; prefix rows are kept as they are."""
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    old_grid = math.isqrt(patches.shape[1])
    if old_grid * old_grid != patches.shape[1]:
        raise ValueError(f"position embedding has {patches.shape[1]} patch rows, not a square grid")
    if old_grid == new_grid:
        return pos_embed
    d = patches.shape[-1]
    grid = patches.reshape(1, old_grid, old_grid, d).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False, antialias=True)
    patches = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, d).to(pos_embed.dtype)
    return torch.cat([prefix, patches], dim=1)
