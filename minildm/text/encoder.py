"""Prompt encoder tau_theta(y): a small Transformer trained jointly with the UNet (LDM's "prompt model").

    h_0 = E[tokens] + P[0..L-1]                         token embedding + learned positions
    h_l = h_{l-1} + SelfAttn(LN(h_{l-1}), mask)         pre-norm Transformer block, l = 1..depth
    h_l = h_l + MLP(LN(h_l))
    tau_theta(y) = LN(h_depth)                          [B, L, dim] -> keys/values of the UNet's cross-attention

Padding tokens (id 0) are masked as keys, so the outputs at real positions do not depend on how much
padding follows. The start token <s> is always present, so no query ever has zero visible keys.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from minildm.modules.attention import Attention
from minildm.text.tokenizer import PAD_ID


@dataclass
class TextEncoderConfig:
    vocab_size: int
    max_len: int = 16  # longest token sequence (start token included)
    dim: int = 128  # width d of the context vectors given to cross-attention
    depth: int = 2  # number of Transformer blocks
    heads: int = 4
    dim_head: int = 32
    mlp_mult: int = 4  # MLP hidden width = mlp_mult * dim
    dropout: float = 0.0
    kernel: str = "naive"  # attention kernel, see modules/attention.py


class TransformerBlock(nn.Module):
    """Pre-norm block: x += SelfAttn(LN x, mask); x += MLP(LN x).  x [B, L, dim]."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.attn = Attention(cfg.dim, heads=cfg.heads, dim_head=cfg.dim_head, kernel=cfg.kernel, dropout=cfg.dropout)
        self.norm2 = nn.LayerNorm(cfg.dim)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.dim, cfg.mlp_mult * cfg.dim),
            nn.GELU(),
            nn.Linear(cfg.mlp_mult * cfg.dim, cfg.dim),
            nn.Dropout(cfg.dropout),
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask=mask)
        return x + self.mlp(self.norm2(x))


class PromptEncoder(nn.Module):
    """tokens [B, L] (L <= max_len) -> (context [B, L, dim], mask [B, L] bool, True = real token)."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.token_emb = nn.Embedding(cfg.vocab_size, cfg.dim)  # E
        self.pos_emb = nn.Parameter(torch.zeros(cfg.max_len, cfg.dim))  # P, learned positions
        nn.init.normal_(self.token_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb, std=0.02)
        self.blocks = nn.ModuleList([TransformerBlock(cfg) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.dim)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if tokens.ndim != 2 or tokens.shape[1] > self.cfg.max_len:
            raise ValueError(
                f"PromptEncoder expects tokens [B, L] with L <= {self.cfg.max_len}, got {tuple(tokens.shape)}; "
                "use the Tokenizer that was built with this max_len."
            )
        mask = tokens != PAD_ID  # key-padding mask, True = real token
        x = self.token_emb(tokens) + self.pos_emb[: tokens.shape[1]]  # h_0 = E[tokens] + P
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x), mask
