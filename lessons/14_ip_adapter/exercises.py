"""Lesson 14 exercise: IP-Adapter's decoupled cross-attention.

Fill in the region between `# TODO begin` and `# TODO end`, then grade it:

    python lessons/14_ip_adapter/grade.py

lesson.py checks your function on a real layer of the trained adapter as soon as it no longer raises
NotImplementedError.
"""
from __future__ import annotations

import math  # noqa: F401

import torch
from einops import rearrange  # noqa: F401  ("b m (h d) -> b h m d" splits the heads)


def decoupled_cross_attention(x: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None,
                              image_tokens: torch.Tensor, w: dict, heads: int, ip_lambda: float) -> torch.Tensor:
    """One cross-attention layer of a UNet with an IP-Adapter (Ye et al. 2023: eq. 5, with lambda as in eq. 8):

        Z = softmax(Q K^T / sqrt(d)) V  +  lambda * softmax(Q K'^T / sqrt(d)) V'
        out = Z W_O + b_O

    Input:
        x             [B, N, C]   the UNet's pixel tokens (they make the queries)
        text          [B, M, Cc]  the prompt encoder's output (keys and values of the text branch)
        text_mask     [B, M] bool, True = a real token (False = padding, never attended), or None (all real)
        image_tokens  [B, n, Cc]  the image prompt's tokens (keys and values of the image branch; all real)
        w             dict of torch.nn.Linear layers:
                        "to_q" (C -> H*d), "to_k", "to_v" (Cc -> H*d, the frozen text projections),
                        "to_k_ip", "to_v_ip" (Cc -> H*d, the adapter's new projections W'_k, W'_v),
                        "to_out" (H*d -> C, with a bias)
        heads         H; each head has d = (H*d) / H channels
        ip_lambda     lambda, the weight of the image prompt (0 gives back the text-only layer)
    Output:
        [B, N, C]
    """
    # TODO begin
    raise NotImplementedError
    # TODO end
