"""Export-time swap of each block's attention for onnxruntime's fused `Attention` operator.

onnxruntime's transformer optimizer finds no Attention pattern in a fused-qkv + SDPA graph, so
instead of hoping for a fusion after export, the exporter writes the operator itself: one
com.microsoft `Attention` node per block takes the normed tokens and the qkv projection, and
runs projection, scaled dot-product and softmax in one kernel (a flash kernel on CUDA).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from model_export.vit import Attention, VisionTransformer

CONTRIB_DOMAIN = "com.microsoft"


class _ContribAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, num_heads):
        # The eager maths of Attention.forward, so that tracing sees the true values and shapes.
        b, n, d = x.shape
        qkv = (x @ weight + bias).reshape(b, n, 3, num_heads, d // num_heads).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(*qkv.unbind(0)).transpose(1, 2).reshape(b, n, d)

    @staticmethod
    def symbolic(g, x, weight, bias, num_heads):
        out = g.op(f"{CONTRIB_DOMAIN}::Attention", x, weight, bias, num_heads_i=num_heads)
        out.setType(x.type())  # the operator keeps the input's (B, N, D) shape
        return out


class _FusedAttention(nn.Module):
    def __init__(self, attention: Attention) -> None:
        super().__init__()
        self.inner = attention

    def forward(self, x: torch.Tensor, need_weights: bool = False) -> tuple[torch.Tensor, None]:
        if need_weights:
            raise ValueError("the fused Attention operator does not return attention weights")
        qkv = self.inner.qkv
        # The operator wants weights as (D, 3D), q|k|v along the columns: the Linear's transpose.
        bias = qkv.bias if qkv.bias is not None else torch.zeros(qkv.out_features)
        out = _ContribAttention.apply(x, qkv.weight.t(), bias, self.inner.num_heads)
        return self.inner.proj(out), None


def with_fused_attention(model: VisionTransformer) -> VisionTransformer:
    """A copy of `model` whose blocks export as com.microsoft Attention; the original is untouched."""
    fused = copy.deepcopy(model)
    for block in fused.blocks:
        assert isinstance(block.attn, Attention)
        block.attn = _FusedAttention(block.attn)
    return fused
