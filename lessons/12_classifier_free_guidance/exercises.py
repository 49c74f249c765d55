"""Lesson 12 exercises: classifier-free guidance, in training (drop the prompt) and in sampling (extrapolate).

Fill in the code between `# TODO begin` and `# TODO end`, then grade with

    python lessons/12_classifier_free_guidance/grade.py
"""
from __future__ import annotations

import torch


def drop_prompt(tokens: torch.Tensor, empty_tokens: torch.Tensor, p: float = 0.1,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace each whole caption by the empty prompt with probability p (the unconditional training examples).

    Input:
        tokens:       LongTensor [B, L], one encoded caption per row (<s> first, <pad> = 0 at the end)
        empty_tokens: LongTensor [1, L], the empty prompt tokenizer.encode([""]): <s> then padding
        p:            drop probability in [0, 1]
        generator:    torch.Generator (None = torch's global one). Draw exactly one
                      torch.rand(B, generator=generator); caption i is dropped where that draw is below p.
    Output:
        LongTensor [B, L], a new tensor (leave `tokens` unchanged): row i is the empty prompt if dropped,
        else tokens[i]
    """
    # TODO begin ------------------------------------------------------
    raise NotImplementedError("exercise: drop_prompt")
    # TODO end --------------------------------------------------------


def guided_eps(eps_u: torch.Tensor, eps_c: torch.Tensor, scale: float) -> torch.Tensor:
    """The classifier-free guided noise estimate with guidance scale s.

    Input:
        eps_u: float tensor [B, ...], eps_theta(x_t, t, empty prompt)  (unconditional)
        eps_c: float tensor [B, ...], eps_theta(x_t, t, prompt)        (conditional)
        scale: s >= 0; s = 0 gives eps_u, s = 1 gives eps_c, s > 1 pushes past eps_c, away from eps_u
    Output:
        float tensor [B, ...]
    """
    # TODO begin ------------------------------------------------------
    raise NotImplementedError("exercise: guided_eps")
    # TODO end --------------------------------------------------------
