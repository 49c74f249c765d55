"""Lesson 07 exercises: the noise schedule and the forward process q(x_t | x_0).

Fill in the code between `# TODO begin` and `# TODO end`, then grade with

    python lessons/07_ddpm_forward/grade.py

Conventions (the same as the library's): timesteps are 0-indexed, t = 0..T-1, and betas[t] is the slides'
beta_{t+1}; schedule tables are float64 tensors [T]; images and latents are float tensors [B, ...].
Use torch only (no loops over timesteps needed).
"""
from __future__ import annotations

import math

import torch

DEFAULT_BETAS = {
    "linear": (1e-4, 0.02),  # DDPM (Ho et al. 2020)
    "scaled_linear": (0.00085, 0.012),  # Stable Diffusion v1 (its configs call this "linear")
}
COSINE_S = 0.008  # the offset s of the cosine schedule (Nichol & Dhariwal 2021)
COSINE_MAX_BETA = 0.999  # cosine betas are clipped here


def beta_schedule(kind: str, num_timesteps: int, beta_start: float | None = None,
                  beta_end: float | None = None) -> torch.Tensor:
    """The betas of a named noise schedule.

    Input:
        kind:           "linear" | "scaled_linear" | "cosine"
        num_timesteps:  T (an int >= 2)
        beta_start, beta_end: the first and last beta of "linear" and "scaled_linear";
                        None means DEFAULT_BETAS[kind]. The cosine schedule ignores them.
    Output:
        betas: float64 tensor [T]
        - "linear":        beta_start, ..., beta_end evenly spaced (T values, both ends included)
        - "scaled_linear": sqrt(beta) evenly spaced from sqrt(beta_start) to sqrt(beta_end), then squared
        - "cosine":        f(u) = cos^2(((u / T) + s) / (1 + s) * pi / 2) for u = 0..T (T + 1 values),
                           abar(u) = f(u) / f(0), and beta of step u = 1 - abar(u) / abar(u - 1) for u = 1..T,
                           clipped at COSINE_MAX_BETA; s = COSINE_S.
    """
    if kind in DEFAULT_BETAS:
        beta_start = DEFAULT_BETAS[kind][0] if beta_start is None else beta_start
        beta_end = DEFAULT_BETAS[kind][1] if beta_end is None else beta_end
    # TODO begin ------------------------------------------------------
    raise NotImplementedError("exercise: beta_schedule")
    # TODO end --------------------------------------------------------


def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    """abar_t = prod_{s <= t} alpha_s with alpha_s = 1 - beta_s.

    Input:
        betas: float64 tensor [T], betas[t] = the slides' beta_{t+1}
    Output:
        abar: float64 tensor [T]; abar[0] = 1 - betas[0] (one step of noise already), abar[T-1] near 0
    """
    # TODO begin ------------------------------------------------------
    raise NotImplementedError("exercise: alphas_cumprod")
    # TODO end --------------------------------------------------------


def q_sample(alphas_cumprod: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Property 1: a sample of q(x_t | x_0) in one shot.

    Input:
        alphas_cumprod: float64 tensor [T] (abar)
        x0:   float tensor [B, ...] clean images or latents (any number of dims after B)
        t:    LongTensor [B], one timestep per sample, values in 0..T-1
        eps:  float tensor shaped like x0, eps ~ N(0, I)
    Output:
        x_t: tensor shaped like x0 and in x0's dtype (the table is float64: cast what you take from it)
    """
    # TODO begin ------------------------------------------------------
    raise NotImplementedError("exercise: q_sample")
    # TODO end --------------------------------------------------------


def q_posterior(betas: torch.Tensor, alphas_cumprod: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor,
                t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Property 2: the exact reverse step given the clean sample, q(x_{t-1} | x_t, x_0) = N(mean, variance I).

    Input:
        betas, alphas_cumprod: float64 tensors [T]
        x0, x_t: float tensors [B, ...] (same shape)
        t:       LongTensor [B], values in 0..T-1. Before the first step the data is clean: at t = 0 use
                 abar_{t-1} = 1 (mind Python's negative indexing).
    Output:
        mean:     tensor [B, ...] like x_t (x_t's dtype)
        variance: tensor [B, 1, ..., 1] (one 1 per dim of x_t after B, x_t's dtype); exactly 0 at t = 0
    """
    # TODO begin ------------------------------------------------------
    raise NotImplementedError("exercise: q_posterior")
    # TODO end --------------------------------------------------------
