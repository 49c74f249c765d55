"""Lesson 09 exercises: how the noise model eps_theta(z_t, t, tau_theta(y)) hears t and y.

Fill in the code between `# TODO begin` and `# TODO end`, then grade with

    python lessons/09_unet_cross_attention/grade.py

einops (rearrange, einsum) is the tidy way to split heads; plain torch works too.
"""
from __future__ import annotations

import math

import torch
from einops import einsum, rearrange  # noqa: F401  (for you to use)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (the Transformer's position encoding, used for t).

    Input:
        t:          LongTensor [B] of timesteps
        dim:        even embedding width; half = dim // 2 frequencies
        max_period: the slowest frequency's period
    Output:
        emb: float32 tensor [B, dim] laid out as [cos(t f_0), ..., cos(t f_{half-1}), sin(t f_0), ..., sin(t f_{half-1})]
             with frequencies f_i = max_period ** (-i / half), i = 0..half-1 (f_0 = 1, geometrically slower after)
    """
    # TODO begin ------------------------------------------------------
    raise NotImplementedError("exercise: timestep_embedding")
    # TODO end --------------------------------------------------------


def cross_attention(x: torch.Tensor, context: torch.Tensor, w_q: torch.Tensor, w_k: torch.Tensor, w_v: torch.Tensor,
                    heads: int, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-head cross-attention from image tokens to prompt tokens (LDM eq. 3, before the output layer).

    Q = x W_Q, K = context W_K, V = context W_V; split the inner width into `heads` heads of d = inner / heads;
    per head P = softmax(Q K^T / sqrt(d)) over the prompt tokens and O = P V; merge the heads back.

    Input:
        x:       float tensor [B, N, C], N = h * w flattened UNet features phi_i(z_t)
        context: float tensor [B, M, C_ctx], the prompt encoding tau_theta(y)
        w_q:     [C, inner];  w_k, w_v: [C_ctx, inner]  (inner = heads * d; x @ w_q gives Q)
        heads:   number of heads
        mask:    bool [B, M] or None; True = a real prompt token, False = padding that gets zero weight
    Output:
        out:   float tensor [B, N, inner], heads merged as (head, d): out[..., h*d:(h+1)*d] is head h
        probs: float tensor [B, heads, N, M], the attention weights (each row sums to 1 over the M tokens)
    """
    # TODO begin ------------------------------------------------------
    raise NotImplementedError("exercise: cross_attention")
    # TODO end --------------------------------------------------------
