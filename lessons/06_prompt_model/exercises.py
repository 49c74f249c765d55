"""Lesson 06 exercises: the two pieces of the prompt model's attention you write yourself.

The prompt encoder tau_theta(y) is a small Transformer over the caption's tokens. Inside every block, each
token (a query) looks at all tokens (the keys) and takes a weighted average of their values:

    Attention(Q, K, V) = softmax( Q K^T / sqrt(d) ) V

with d the size of one head's query/key vectors. The softmax runs over the KEYS: for each query, the
weights over the M keys are positive and sum to 1.

Captions have different lengths, so a batch is padded with <pad> tokens (id 0) to one length L. Padding
must not change the result, so pads are never attended to: a boolean mask says which keys are real
(True = a real token that may be attended to, the convention of the whole library). Masked keys get
weight exactly 0 (set their score to -inf before the softmax). The start token <s> is a real token, so a
row always has at least one key; if a row had none, its output should be zeros (not NaN).

The reference is minildm/modules/attention.py (attention) and PromptEncoder.forward in
minildm/text/encoder.py (the mask).

Grade with:  python lessons/06_prompt_model/grade.py
"""
from __future__ import annotations

import torch
from einops import einsum, rearrange  # noqa: F401  (einsum(q, k, "b h n d, b h m d -> b h n m") = Q K^T)

PAD_ID = 0  # the id of <pad> (minildm.text.tokenizer.PAD_ID)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head scaled dot-product attention, written out.

    Input:  q     [B, H, N, d]  queries (H heads, N query positions, d = per-head size)
            k     [B, H, M, d]  keys (M key positions)
            v     [B, H, M, e]  values (e may differ from d)
            mask  None, or bool [B, M]: True = key m of batch element b may be attended to (same for
                  every head and query)
    Output: [B, H, N, e]  out[b, h, n] = sum_m P[b, h, n, m] v[b, h, m],
            P = softmax over m of (q . k / sqrt(d)), with P = 0 at masked keys;
            a query whose keys are all masked gets the zero vector
    """
    # TODO begin ------------------------------------------------------
    raise NotImplementedError("exercise: attention")
    # TODO end --------------------------------------------------------


def padding_mask(tokens: torch.Tensor) -> torch.Tensor:
    """Which tokens are real (not padding), in the library's mask convention.

    Input:  tokens  LongTensor [B, L] from Tokenizer.encode: <s> (id 2), word ids, then <pad> (id 0)
    Output: bool [B, L], True where the token is real (the start token and every word, known or <unk>),
            False where it is <pad>

    Example: padding_mask(torch.tensor([[2, 5, 9, 0, 0], [2, 0, 0, 0, 0]]))
             -> tensor([[True, True, True, False, False], [True, False, False, False, False]])
    """
    # TODO begin ------------------------------------------------------
    raise NotImplementedError("exercise: padding_mask")
    # TODO end --------------------------------------------------------
