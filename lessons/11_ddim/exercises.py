"""Lesson 11 exercises: DDIM, sampling a DDPM-trained model in a few dozen steps.

Fill in the code between `# TODO begin` and `# TODO end`, then grade with

    python lessons/11_ddim/grade.py

`schedule` is a minildm NoiseSchedule (schedule.alphas_cumprod is abar, float64 [T]; schedule.num_timesteps).
Timesteps are 0-indexed, t = 0..T-1; "t_prev = -1" means "after the last step": clean data, abar = 1.
"""
from __future__ import annotations

import math  # noqa: F401  (for you to use)

import torch


def ddim_timesteps(num_timesteps: int, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The timesteps a DDIM sampler visits ("trailing" spacing), and the one each step jumps to.

    Input:
        num_timesteps: T of the trained model
        steps:         n, the number of model calls (1 <= n <= T)
    Output:
        timesteps:      LongTensor [n], strictly decreasing: t_k = round(k T / n) - 1 for k = n, n-1, ..., 1,
                        so the first is always T - 1 (the tests avoid exact halves, round either way)
        prev_timesteps: LongTensor [n], where each step lands: the next entry of `timesteps`, and -1 (clean
                        data) after the last one
    """
    # TODO begin ------------------------------------------------------
    raise NotImplementedError("exercise: ddim_timesteps")
    # TODO end --------------------------------------------------------


def ddim_step(schedule, x_t: torch.Tensor, eps: torch.Tensor, t: int, t_prev: int, eta: float = 0.0,
              noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step x_t -> x_{t_prev}.

    Input:
        schedule: NoiseSchedule
        x_t, eps: float tensors [B, ...]; eps = eps_theta(x_t, t)
        t:        int, the current timestep (0..T-1)
        t_prev:   int, the timestep to jump to (-1 <= t_prev < t); abar at -1 is 1
        eta:      0 = deterministic DDIM, 1 = as much noise as the DDPM posterior
        noise:    float tensor like x_t, z ~ N(0, I); used only when sigma > 0
    Output:
        (x_prev, x0): both like x_t (x_t's dtype):
            x0     = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)                             (Property 3)
            sigma  = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev)
            x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z
    """
    # TODO begin ------------------------------------------------------
    raise NotImplementedError("exercise: ddim_step")
    # TODO end --------------------------------------------------------
