"""Classifier-free guidance (Ho & Salimans 2022): one network, conditional and unconditional.

Training: with probability p (0.1) a caption is replaced by the empty prompt, so the same UNet learns
eps(x_t, t, y) and eps(x_t, t, "") ("unconditional"). Sampling: push the prediction away from the
unconditional one, towards the prompt,

    eps~ = eps_u + s (eps_c - eps_u),     s = guidance scale; s = 1 is the plain conditional model.

The same family appears under other names: the seed paper's eq. 6, (w + 1) eps_c - w eps_u, is s = w + 1,
and IP-Adapter's w eps_c + (1 - w) eps_u is s = w. Both halves come from one forward pass on the batch
[uncond, cond].
"""
from __future__ import annotations

from typing import Callable

import torch
from einops import repeat
from torch import nn

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t [B, ...], t [B]) -> eps [B, ...]


def drop_tokens(
    tokens: torch.Tensor, empty_tokens: torch.Tensor, p: float = 0.1, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Replace each caption by the empty prompt with probability p (CFG training).

    tokens:       LongTensor [B, L] (pad id 0 on the right).
    empty_tokens: the empty prompt, `tokenizer.encode([""])`, LongTensor [1, L_e] or [L_e]; it is padded
                  with 0 (or its trailing padding trimmed) to length L.
    returns       LongTensor [B, L], a new tensor; the input is not modified.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"The drop probability p must lie in [0, 1], got {p}.")
    empty = empty_tokens.reshape(-1).to(tokens.device)
    L = tokens.shape[1]
    if (empty[L:] != 0).any():
        raise ValueError(f"The empty prompt has more real tokens than the caption length L = {L}; encode it with the same tokenizer.")
    empty_row = torch.zeros(L, dtype=tokens.dtype, device=tokens.device)
    empty_row[: min(L, empty.shape[0])] = empty[:L]
    drop = torch.rand(tokens.shape[0], device=tokens.device, generator=generator) < p  # [B] bool
    return torch.where(drop[:, None], empty_row[None, :], tokens)


def _check_scale(guidance_scale: float) -> None:
    if guidance_scale < 0:
        raise ValueError(f"The guidance scale must be >= 0 (0 = unconditional, 1 = conditional), got {guidance_scale}.")


def guided_eps(eps_u: torch.Tensor, eps_c: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """eps~ = eps_u + s (eps_c - eps_u), [B, ...].

    Same as the seed's eq. 6 (w + 1) eps_c - w eps_u with s = w + 1, and IP-Adapter's
    w eps_c + (1 - w) eps_u with s = w.
    """
    _check_scale(guidance_scale)
    return eps_u + guidance_scale * (eps_c - eps_u)


def _batch_context(
    context: torch.Tensor, mask: torch.Tensor | None, batch_size: int, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Broadcast a prompt encoding to the batch and right-pad it to `length` tokens (padding masked out).

    context [1 or B, L, d], mask [1 or B, L] bool or None (= all real) -> ([B, length, d], [B, length] bool).
    """
    if mask is None:
        mask = torch.ones(context.shape[:2], dtype=torch.bool, device=context.device)
    if context.shape[0] == 1:
        context = repeat(context, "1 l d -> b l d", b=batch_size)
        mask = repeat(mask, "1 l -> b l", b=batch_size)
    if context.shape[0] != batch_size:
        raise ValueError(f"The prompt encoding has batch size {context.shape[0]}; use 1 or the batch size {batch_size}.")
    pad = length - context.shape[1]
    context = torch.cat([context, context.new_zeros(batch_size, pad, context.shape[2])], dim=1)
    mask = torch.cat([mask, mask.new_zeros(batch_size, pad)], dim=1)
    return context, mask


def cfg_model_fn(
    unet: nn.Module,
    context_c: torch.Tensor,
    mask_c: torch.Tensor | None,
    context_u: torch.Tensor,
    mask_u: torch.Tensor | None,
    guidance_scale: float,
) -> EpsFn:
    """A guided eps_fn(x_t [B, ...], t [B]) -> eps~ [B, ...] for the samplers.

    unet(x, t, context, context_mask) predicts eps. context_c/mask_c encode the prompts and
    context_u/mask_u the empty prompt, each with batch size 1 (shared) or B; shapes [., L, d] and
    [., L] bool (None = no padding). Lengths may differ: the shorter one is padded and masked.
    Each call runs the UNet once on the batch [uncond, cond] of size 2B; at s = 1 only the conditional
    half is run, at s = 0 only the unconditional half.
    """
    _check_scale(guidance_scale)

    def eps_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        B = x_t.shape[0]
        length = max(context_c.shape[1], context_u.shape[1])
        ctx_c, m_c = _batch_context(context_c, mask_c, B, length)
        ctx_u, m_u = _batch_context(context_u, mask_u, B, length)
        if guidance_scale == 1:
            return unet(x_t, t, ctx_c, m_c)  # eps~ = eps_c
        if guidance_scale == 0:
            return unet(x_t, t, ctx_u, m_u)  # eps~ = eps_u
        # one forward pass on [uncond, cond]: 2B samples
        eps = unet(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([ctx_u, ctx_c]), torch.cat([m_u, m_c]))
        eps_u, eps_c = eps.chunk(2)  # [2B, ...] -> 2 x [B, ...]
        return guided_eps(eps_u, eps_c, guidance_scale)

    return eps_fn
