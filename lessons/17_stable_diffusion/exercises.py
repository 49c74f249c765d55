"""Lesson 17 exercises: Stable Diffusion v1's sampling conventions.

Fill in the code between `# TODO begin` and `# TODO end`, then grade with

    python lessons/17_stable_diffusion/grade.py

Timesteps are 0-indexed, t = 0..T-1. A step "lands on" t_prev: abar at t_prev = 0 is alphas_cumprod[0]
(SD v1 stops there), and t_prev = -1 would mean clean data, abar = 1 (lesson 11's sampler).
"""
from __future__ import annotations

import torch


def sd_timesteps(num_timesteps: int, steps: int, offset: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The DDIM timesteps of SD v1 ("leading" spacing plus an offset) and where each step lands.

    Input:
        num_timesteps: T (1000 for SD)
        steps:         n, the number of model calls
        offset:        SD v1's steps_offset (1)
    Output:
        timesteps:      LongTensor [n], strictly decreasing: k (T // n) + offset for k = n-1, ..., 1, 0
                        (T = 1000, n = 50: 981, 961, ..., 21, 1)
        prev_timesteps: LongTensor [n]: the next entry of `timesteps`, and 0 after the last one (SD v1 lands
                        on abar_0, not on abar = 1)
    """
    # TODO begin ------------------------------------------------------
    raise NotImplementedError("exercise: sd_timesteps")
    # TODO end --------------------------------------------------------


def img2img_timesteps(timesteps: torch.Tensor, strength: float) -> torch.Tensor:
    """The timesteps image-to-image (SDEdit) runs, out of a sampler's full list.

    Input:
        timesteps: LongTensor [n], the full strictly decreasing list of the sampler
        strength:  in (0, 1]: the fraction of the n steps to run; 1 starts from pure noise
    Output:
        LongTensor [m], m = int(n * strength) (rounded down, at least 1 for the inputs graded): the LAST m
        entries of `timesteps`. The image's latents are noised to the first of them with q(x_t | x_0), and
        DDIM runs from there; a small strength keeps the picture, a large one repaints it.
    """
    # TODO begin ------------------------------------------------------
    raise NotImplementedError("exercise: img2img_timesteps")
    # TODO end --------------------------------------------------------
