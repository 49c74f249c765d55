"""Lesson 08 exercises: the reverse process, the training loss (Algorithm 1) and one ancestral sampling step.

Fill in the code between `# TODO begin` and `# TODO end`, then grade with

    python lessons/08_ddpm_training/grade.py

`schedule` is a minildm NoiseSchedule: read its float64 tables [T] (schedule.betas, schedule.alphas,
schedule.alphas_cumprod, schedule.alphas_cumprod_prev, schedule.posterior_variance, ...; you built them
in lesson 07) and schedule.num_timesteps. Timesteps are 0-indexed: t = 0..T-1. The tables are float64:
return results in the dtype of x_t (1 - abar_t near t = 0 keeps more digits if you cast late).
"""
from __future__ import annotations

from typing import Callable

import torch

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # eps_theta: (x_t [B, ...], t [B]) -> [B, ...]


def predict_x0(schedule, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Property 3: the clean sample implied by a noisy sample and the noise in it.

    Input:
        schedule: NoiseSchedule
        x_t:  float tensor [B, ...]
        t:    LongTensor [B], values in 0..T-1
        eps:  float tensor like x_t (the true noise, or the network's estimate eps_theta(x_t, t))
    Output:
        x0: tensor like x_t (x_t's dtype), the x_0 with x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps
    """
    # TODO begin ------------------------------------------------------
    raise NotImplementedError("exercise: predict_x0")
    # TODO end --------------------------------------------------------


def ddpm_loss(model_fn: ModelFn, schedule, x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Algorithm 1, one step's loss: noise a batch at random timesteps and regress the noise.

    Input:
        model_fn:  eps_theta, called once as model_fn(x_t [B, ...], t [B]) -> eps prediction [B, ...]
        schedule:  NoiseSchedule (T = schedule.num_timesteps)
        x0:        float tensor [B, ...] of clean samples
        generator: torch.Generator for every random draw (None = torch's global one)
    Output:
        loss: scalar tensor (differentiable w.r.t. the model's parameters): the mean squared error over
              every element, with one timestep t ~ Uniform{0, ..., T-1} and fresh noise eps ~ N(0, I)
              per sample.
    """
    # TODO begin ------------------------------------------------------
    raise NotImplementedError("exercise: ddpm_loss")
    # TODO end --------------------------------------------------------


def p_sample_step(schedule, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """One ancestral step x_t -> x_{t-1} of the learned reverse process p_theta(x_{t-1} | x_t).

    Input:
        schedule: NoiseSchedule
        x_t:   float tensor [B, ...]
        t:     LongTensor [B], values in 0..T-1 (samples may sit at different timesteps)
        eps:   float tensor like x_t, the network's eps_theta(x_t, t)
        noise: float tensor like x_t, z ~ N(0, I)
    Output:
        x_prev: tensor like x_t (x_t's dtype): the mean mu_theta(x_t, t) of Property 3 plus sigma_t z, where
                sigma_t^2 is the posterior variance of Property 2 and no noise is added where t = 0.
    """
    # TODO begin ------------------------------------------------------
    raise NotImplementedError("exercise: p_sample_step")
    # TODO end --------------------------------------------------------
