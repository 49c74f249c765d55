"""Lesson 18 exercises: name the binding errors, the Attend-and-Excite loss, and the Prompt-to-Prompt word swap.

Fill in the code between `# TODO begin` and `# TODO end`, then grade with

    python lessons/18_binding/grade.py
"""
from __future__ import annotations

import torch

from minildm.diffusion.attend_excite import gaussian_smooth  # noqa: F401  (use it in excite_loss)


def score_scene(wanted: dict, seen: dict) -> str:
    """Name the outcome of one two-object sample.

    Input:
        wanted: {position: (colour, shape)}, the prompt's two objects, e.g.
                {"left": ("red", "circle"), "right": ("blue", "square")}  (the two colours differ, so do the shapes)
        seen:   {position: (colour, shape)}, what the judge read in the image (0, 1 or 2 entries; positions
                may be any of left, right, top, bottom, center)
    Output, checked in this order:
        "object missing"      a position of the prompt has no object in `seen`
        "right"               both objects exactly as asked
        "colours swapped"     both shapes right, each object wears the OTHER object's colour
        "one colour on both"  both objects have the same colour, and it is one of the prompt's two colours
        "shapes swapped"      both colours right, each object has the OTHER object's shape
        "other"               anything else
    """
    # TODO begin ------------------------------------------------------
    raise NotImplementedError("exercise: score_scene")
    # TODO end --------------------------------------------------------


def excite_loss(maps: torch.Tensor, sigma: float = 0.5) -> torch.Tensor:
    """Attend-and-Excite's loss: how far the most neglected object token is from being attended somewhere.

    Input:
        maps:  float tensor [B, S, h, w], the cross-attention map of each of the S object tokens of each sample
        sigma: Gaussian smoothing of each map before its peak is read (gaussian_smooth(maps, sigma); 0 = none)
    Output:
        float tensor [B]: L = max over tokens s of (1 - max over pixels of smooth(maps)[b, s])
    """
    # TODO begin ------------------------------------------------------
    raise NotImplementedError("exercise: excite_loss")
    # TODO end --------------------------------------------------------


def swap_maps(probs: torch.Tensor, n: int) -> torch.Tensor:
    """Prompt-to-Prompt word swap in one cross-attention layer: the edited prompts use the sources' maps.

    Input:
        probs: float tensor [R, H, N, L], attention probabilities of one layer. The sampler's batch is
               [n source prompts; n edited prompts]; under classifier-free guidance the UNet sees it twice,
               R = 4n rows = [uncond sources, uncond edits, cond sources, cond edits]; without guidance R = 2n
               = [sources, edits].
        n:     the number of prompt pairs
    Output:
        a NEW tensor like probs (leave probs unchanged) where the conditional rows of the edited prompts hold
        the conditional maps of their sources; every other row is unchanged
    """
    # TODO begin ------------------------------------------------------
    raise NotImplementedError("exercise: swap_maps")
    # TODO end --------------------------------------------------------
