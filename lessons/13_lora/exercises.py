"""Lesson 13 exercises: a LoRA layer, and folding it into the weight it adapts.

Fill in the regions between `# TODO begin` and `# TODO end`, then grade with

    python lessons/13_lora/grade.py

Once an exercise passes, `lesson.py` uses your version instead of the library's.
"""
from __future__ import annotations

import math

import torch
from torch import nn


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update (Hu et al. 2021):

        y = W x + b + (alpha / r) * strength * B A x        A: [r, d_in], B: [d_out, r]

    Input:  base  nn.Linear(d_in, d_out), the pretrained layer (must stay frozen)
            rank  r >= 1;  alpha  (None means alpha = r, so the factor alpha / r is 1)
    forward Input:  x [..., d_in]        Output: y [..., d_out]
    Attributes the grader uses: base, lora_A (nn.Linear(d_in, r), weight [r, d_in]),
    lora_B (nn.Linear(r, d_out), weight [d_out, r]), rank, alpha, strength (runtime strength, 1 = as trained),
    merged (True after `merge`: base.weight then already holds the update).
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None):
        super().__init__()
        self.base = base
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)
        self.strength = 1.0
        self.merged = False
        self.lora_A = nn.Linear(base.in_features, rank, bias=False)  # A: [r, d_in]
        self.lora_B = nn.Linear(rank, base.out_features, bias=False)  # B: [d_out, r]
        # TODO begin: freeze the pretrained layer, then initialise A and B so that a fresh adapter changes
        # nothing while gradients can still flow (hint: nn.init.kaiming_uniform_(w, a=math.sqrt(5)) is how
        # nn.Linear initialises its own weight; nn.init.zeros_ exists too).
        raise NotImplementedError
        # TODO end

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:  # merge() has already folded (alpha / r) * strength * B A into base.weight
            return self.base(x)
        # TODO begin: y = W x + b + (alpha / r) * strength * B A x
        raise NotImplementedError
        # TODO end


def merge(layer: nn.Module) -> None:
    """Fold a LoRA layer's update into its base weight, in place:  W <- W + (alpha / r) * strength * B A.

    Input:  layer with .base (nn.Linear, weight [d_out, d_in]), .lora_A.weight [r, d_in],
            .lora_B.weight [d_out, r], .alpha, .rank, .strength, .merged (False)
    Output: None. Afterwards layer.base.weight holds W + Delta W and layer.merged is True, so that
            layer(x) gives the same numbers as before at the cost of the plain Linear.
    """
    # TODO begin
    raise NotImplementedError
    # TODO end
