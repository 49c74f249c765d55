"""Scaled dot-product attention: three interchangeable kernels and the `Attention` module.

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d)) V                      (Vaswani et al.; LDM eq. 3)

Shapes: queries q [B, H, N, d], keys k [B, H, M, d], values v [B, H, M, e]; the softmax runs over the
KEY axis (each query's weights over the M keys sum to 1).

Kernels (same numbers, different memory):
- `attention`          the formula written out by hand; materialises the [B, H, N, M] score matrix.
- `chunked_attention`  flash-attention style: queries and keys in chunks with an online (running max,
                       running sum) softmax, so memory is O(q_chunk * k_chunk) instead of O(N * M).
- `sdpa_attention`     PyTorch's fused `F.scaled_dot_product_attention`, with our mask convention.

Masks are bool with True = "this key may be attended to": either a key-padding mask [B, M] (padded prompt
tokens) or anything broadcastable to [B, H, N, M]. A query row whose keys are ALL masked attends to nothing:
our choice is that its output is the zero vector (never NaN), which is also what PyTorch's SDPA returns.

`Attention` is the learnable layer used everywhere (prompt encoder, UNet self- and cross-attention,
adapters): Q = x W_Q, K = c W_K, V = c W_V with c = context (or x itself for self-attention).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import einsum, rearrange

KERNELS = ("naive", "chunked", "sdpa")
LOG2_E = math.log2(math.e)  # exp(x) = 2^(x log2(e)): the chunked kernel exponentiates in base 2


def _as_4d_mask(mask: torch.Tensor) -> torch.Tensor:
    """Key-padding mask [B, M] -> [B, 1, 1, M]; 4-d masks (broadcastable to [B, H, N, M]) pass through."""
    if mask.dtype != torch.bool:
        raise ValueError(f"Attention masks must be bool (True = attend), got {mask.dtype}; use mask.bool().")
    if mask.ndim == 2:
        return rearrange(mask, "b m -> b 1 1 m")
    if mask.ndim == 4:
        return mask
    raise ValueError(f"Attention mask must be [B, M] or broadcastable to [B, H, N, M], got shape {tuple(mask.shape)}.")


def attention_probs(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """P = softmax(Q K^T / sqrt(d)) over the key axis.  q [B,H,N,d], k [B,H,M,d] -> P [B,H,N,M] (float32).

    The softmax is written out (subtract the row max, exponentiate, normalise). Scores and softmax are
    computed in float32 even for bf16/fp16 inputs (Q K^T overflows fp16 easily); masked keys get exactly
    zero weight; fully-masked rows are all zeros.
    """
    scale = q.shape[-1] ** -0.5
    scores = einsum(q.float(), k.float(), "b h n d, b h m d -> b h n m") * scale  # S = Q K^T / sqrt(d)
    if mask is not None:
        scores = scores.masked_fill(~_as_4d_mask(mask), float("-inf"))  # masked keys: exp(-inf) = 0
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = row_max.masked_fill(row_max == float("-inf"), 0.0)  # fully-masked row: avoid -inf - (-inf) = NaN
    weights = torch.exp(scores - row_max)  # exp(S - max S): same softmax, no overflow
    return weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-30)  # P_nm = exp S_nm / sum_m' exp S_nm'


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Naive attention.  q [B,H,N,d], k [B,H,M,d], v [B,H,M,e], mask [B,M] | [B|1,H|1,N|1,M] -> [B,H,N,e]."""
    probs = attention_probs(q, k, mask)
    return einsum(probs.to(v.dtype), v, "b h n m, b h m e -> b h n e")  # O = P V


def _slice(mask: torch.Tensor, dim: int, start: int, end: int) -> torch.Tensor:
    """Slice a broadcastable mask along `dim`, leaving size-1 (broadcast) dimensions alone."""
    return mask if mask.shape[dim] == 1 else mask.narrow(dim, start, end - start)


def chunked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    q_chunk: int = 512,
    k_chunk: int = 1024,
) -> torch.Tensor:
    """Memory-efficient attention with an online softmax (Milakov & Gimelshein 2018; FlashAttention).

    Same inputs/outputs as `attention`. For each block of queries we stream over blocks of keys keeping,
    per query row, the running max m, the running normaliser l = sum exp(S - m) and the running numerator
    acc = sum exp(S - m) V. When a new key block raises the max to m', the old sums are rescaled by
    exp(m - m'). At the end O = acc / l. Only a [q_chunk, k_chunk] score block exists at any time.

    Speed on a CPU (bench/attention.py): every step below is one pass over the score block, so the
    kernel folds the 1/sqrt(d) into Q once instead of scaling every block and, when no gradient is
    needed, computes every block into one reused buffer and exponentiates in it. It works in base 2, as
    FlashAttention does: with S2 = S log2(e) (log2(e) folded into Q as well), exp(S - m) = 2^(S2 - m2),
    and PyTorch's CPU exp2 costs about half of its exp, the largest single pass. PyTorch's SDPA does
    the same arithmetic in one fused pass, which is where the rest of the gap comes from.
    """
    if q_chunk < 1 or k_chunk < 1:
        raise ValueError(f"Chunk sizes must be positive, got q_chunk={q_chunk}, k_chunk={k_chunk}.")
    mask = None if mask is None else _as_4d_mask(mask)
    n, m = q.shape[-2], k.shape[-2]
    # Q log2(e) / sqrt(d): S2 = (Q log2(e) / sqrt(d)) K^T = S log2(e), so exp(S - m) = 2^(S2 - m2) below
    q_scaled = q.float() * (q.shape[-1] ** -0.5 * LOG2_E)
    k, v_f = k.float(), v.float()
    in_place = not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
    out = q.new_empty(*q.shape[:-1], v.shape[-1])
    # without autograd, every full-size score block is computed into this one buffer: a fresh multi-MB block
    # per step would cost page faults and cache misses that the arithmetic does not
    batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2])
    block = q_scaled.new_empty(*batch, min(q_chunk, n), min(k_chunk, m)) if in_place else None
    for q0 in range(0, n, q_chunk):
        q1 = min(q0 + q_chunk, n)
        q_blk = q_scaled[:, :, q0:q1]
        row_max = q_blk.new_full((*q_blk.shape[:-1], 1), float("-inf"))  # m (in base 2: m2 = m log2(e))
        row_sum = torch.zeros_like(row_max)  # l
        acc = q_blk.new_zeros((*q_blk.shape[:-1], v.shape[-1]))  # sum exp(S - m) V
        for k0 in range(0, m, k_chunk):
            k1 = min(k0 + k_chunk, m)
            k_t = k[:, :, k0:k1].transpose(-1, -2)
            if block is not None and block.shape[-2:] == (q1 - q0, k1 - k0):
                scores = torch.matmul(q_blk, k_t, out=block)  # S2_blk = S_blk log2(e) [B, H, q_chunk, k_chunk]
            else:
                scores = q_blk @ k_t
            if mask is not None:
                blk_mask = _slice(_slice(mask, 2, q0, q1), 3, k0, k1)
                scores.masked_fill_(~blk_mask, float("-inf"))
            new_max = torch.maximum(row_max, scores.amax(dim=-1, keepdim=True))  # m' = max(m, max S_blk)
            safe_max = new_max.masked_fill(new_max == float("-inf"), 0.0)  # no visible key yet: keep sums at 0
            # exp(S_blk - m') = 2^(S2_blk - m2'): in the score block's own memory unless autograd needs it kept
            weights = scores.sub_(safe_max).exp2_() if in_place else torch.exp2(scores - safe_max)
            correction = torch.exp2(row_max - safe_max)  # exp(m - m') rescales what we summed so far
            row_sum = row_sum * correction + weights.sum(dim=-1, keepdim=True)  # l' = l e^(m-m') + sum exp(S-m')
            acc = acc * correction + weights @ v_f[:, :, k0:k1]  # acc' = acc e^(m-m') + exp(S-m') V
            row_max = new_max
        out[:, :, q0:q1] = (acc / row_sum.clamp_min(1e-30)).to(out.dtype)  # O = acc / l (0 for fully-masked rows)
    return out


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """PyTorch's fused kernel with our mask convention (bool, True = attend). Shapes as `attention`."""
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v)
    mask = _as_4d_mask(mask)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    # Some backends return NaN for fully-masked rows; enforce our "attend to nothing = 0" choice everywhere.
    return out.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)


class Attention(nn.Module):
    """Multi-head (self- or cross-) attention.

    Q = x W_Q,  K = c W_K,  V = c W_V,  out = concat_h softmax(Q_h K_h^T / sqrt(d)) V_h  W_O + b_O,
    with c = context for cross-attention (LDM: c = tau_theta(y), the prompt) or c = x for self-attention.

    `kernel` picks the attention kernel ("naive", "chunked", "sdpa"); all give the same numbers.
    `probs_hook(module, P) -> P` sees, and may replace, the probabilities P [B, H, N, M] the layer uses
    (the cross-attention maps per prompt token): `attention_maps.AttentionMaps` sets it to record them,
    with or without their gradient, or to edit them. While a hook is set the layer runs the naive kernel,
    the only one that materialises P.
    """

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        heads: int = 4,
        dim_head: int = 32,
        kernel: str = "naive",
        dropout: float = 0.0,
        qkv_bias: bool = False,
    ):
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"Unknown attention kernel {kernel!r}; choose one of {KERNELS}.")
        context_dim = query_dim if context_dim is None else context_dim
        inner = heads * dim_head
        self.heads, self.dim_head, self.kernel = heads, dim_head, kernel
        # LDM/SD's UNet has no biases on Q, K, V; CLIP's text transformer has them (qkv_bias=True).
        self.to_q = nn.Linear(query_dim, inner, bias=qkv_bias)  # W_Q (+ b_Q)
        self.to_k = nn.Linear(context_dim, inner, bias=qkv_bias)  # W_K (+ b_K)
        self.to_v = nn.Linear(context_dim, inner, bias=qkv_bias)  # W_V (+ b_V)
        self.to_out = nn.Linear(inner, query_dim)  # W_O, b_O
        self.dropout = nn.Dropout(dropout)
        # probs_hook(module, P [B, H, N, M]) -> P: read (with gradients) or replace the attention probabilities
        # (attention_maps.py: map capture for pipeline.generate, Attend-and-Excite, Prompt-to-Prompt)
        self.probs_hook = None

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None = None, use_hook: bool = True) -> torch.Tensor:
        """Projected q [B,N,inner], k/v [B,M,inner], mask [B,M] | None -> [B, N, inner] (heads merged).
        use_hook=False leaves `probs_hook` out (IP-Adapter's image streams: their keys are not prompt tokens)."""
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in (q, k, v))
        if use_hook and self.probs_hook is not None:
            probs = self.probs_hook(self, attention_probs(q, k, mask))  # P, or the hook's replacement
            out = einsum(probs.to(v.dtype), v, "b h n m, b h m d -> b h n d")  # O = P V
        elif self.kernel == "naive":
            out = attention(q, k, v, mask)
        elif self.kernel == "chunked":
            out = chunked_attention(q, k, v, mask)
        else:
            out = sdpa_attention(q, k, v, mask)
        return rearrange(out, "b h n d -> b n (h d)")

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, N, query_dim], context [B, M, context_dim] | None (self-attn), mask [B, M] -> [B, N, query_dim]."""
        context = x if context is None else context
        out = self.attend(self.to_q(x), self.to_k(context), self.to_v(context), mask)
        return self.dropout(self.to_out(out))
