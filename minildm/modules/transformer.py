"""The Transformer layer inside the UNet (lecture: "LDM: Cross-Attention in Noise Model").

SpatialTransformer treats every pixel of a UNet feature map phi_i(z_t) [B, C, h, w] as a token and lets
it attend to the prompt:

    x   = proj_in(GroupNorm(phi))                         1x1 conv (or Linear per token, SD v2), C -> d * n_h
    x   = rearrange(x, "b c h w -> b (h w) c")            h*w tokens
    repeat depth times (BasicTransformerBlock):
        x += SelfAttn(LN1 x)                              attn1: Q, K, V from the pixels
        x += CrossAttn(LN2 x, tau_theta(y), mask)         attn2: Q = W_Q phi, K = W_K tau(y), V = W_V tau(y)
        x += FF(LN3 x)                                    GEGLU feed-forward
    out = phi + proj_out(rearrange(x, "b (h w) c -> b c h w"))    proj_out zero-initialised

The slide's table is the LDM paper's appendix table of this block (Rombach et al. 2022, arXiv:2112.10752):
LayerNorm, Conv1x1 c -> d * n_h, Reshape, T x [SelfAttention, MLP, CrossAttention], Reshape, Conv1x1
d * n_h -> c. How the LDM code, and so this file, differs from it: inside a block the cross-attention comes
between self-attention and the MLP (the table lists it last); each sublayer is pre-norm (its own LayerNorm)
with a residual; the input norm is a GroupNorm over channels (the table's LayerNorm); and the whole layer is
residual around a zero-initialised proj_out, so a freshly built SpatialTransformer is exactly the identity
and training starts from the plain convolutional UNet.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from minildm.modules.attention import Attention


class GEGLU(nn.Module):
    """Gated-GELU feed-forward (Shazeer 2020): FF(x) = W_2 ( (x W_a) * GELU(x W_g) ).  x [B, N, dim]."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner = mult * dim
        self.proj_in = nn.Linear(dim, 2 * inner)  # [W_a | W_g] in one matmul
        self.dropout = nn.Dropout(dropout)
        self.proj_out = nn.Linear(inner, dim)  # W_2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj_in(x).chunk(2, dim=-1)
        return self.proj_out(self.dropout(a * F.gelu(gate)))


class BasicTransformerBlock(nn.Module):
    """x += attn1(norm1 x); x += attn2(norm2 x, context, mask); x += ff(norm3 x).  x [B, N, dim].

    attn1 is self-attention over the N pixels; attn2 is cross-attention to the prompt context
    [B, M, context_dim] (adapters find it by the name `attn2`).
    """

    def __init__(self, dim: int, context_dim: int, heads: int = 4, dim_head: int = 32,
                 dropout: float = 0.0, kernel: str = "naive"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, None, heads, dim_head, kernel, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, context_dim, heads, dim_head, kernel, dropout)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = GEGLU(dim, dropout=dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context, mask)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """phi [B, C, h, w], context [B, M, context_dim], mask [B, M] | None -> [B, C, h, w] (residual)."""

    def __init__(self, channels: int, context_dim: int, heads: int = 4, dim_head: int = 32, depth: int = 1,
                 dropout: float = 0.0, norm_groups: int = 32, kernel: str = "naive", proj_linear: bool = False):
        super().__init__()
        inner = heads * dim_head  # d * n_h in the slide's table
        self.proj_linear = proj_linear  # the same map either way: a 1x1 conv is a Linear applied at every pixel
        self.norm = nn.GroupNorm(norm_groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if proj_linear else nn.Conv2d(channels, inner, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner, context_dim, heads, dim_head, dropout, kernel) for _ in range(depth)]
        )
        self.proj_out = nn.Linear(inner, channels) if proj_linear else nn.Conv2d(inner, channels, kernel_size=1)
        nn.init.zeros_(self.proj_out.weight)  # zero-init: a fresh SpatialTransformer is the identity
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, phi: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h, w = phi.shape[-2:]
        x = self.norm(phi)
        if self.proj_linear:  # every pixel is a query token
            x = self.proj_in(rearrange(x, "b c h w -> b (h w) c"))
        else:
            x = rearrange(self.proj_in(x), "b c h w -> b (h w) c")
        for block in self.transformer_blocks:
            x = block(x, context, mask)
        if self.proj_linear:
            x = rearrange(self.proj_out(x), "b (h w) c -> b c h w", h=h, w=w)
        else:
            x = self.proj_out(rearrange(x, "b (h w) c -> b c h w", h=h, w=w))
        return phi + x
