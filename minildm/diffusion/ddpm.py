"""DDPM: the training loss (Algorithm 1) and the ancestral sampler.

Training (lecture 13, Algorithm 1): pick t uniformly, noise x_0 to x_t in one shot (Property 1), and regress
the network's output on the noise,

    L = E_{x_0, t, eps} || eps - eps_theta(x_t, t, tau(y)) ||^2.

The slide draws t from 1..T; our timesteps are 0-indexed, so t ~ Uniform{0, ..., T-1} (same steps).
The network can also predict x_0 or v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 instead of eps; only the
regression target changes. Conditioning (the prompt tau(y), guidance) is the caller's business: every
function here takes a `model_fn(x_t, t)` closure.

Sampling walks the learned reverse chain from x_T ~ N(0, I) down to x_0, one step per timestep:

    x_{t-1} = mu_theta(x_t, t) + sigma_t z,   mu_theta = (x_t - beta_t / sqrt(1 - abar_t) eps_theta) / sqrt(alpha_t)

with sigma_t^2 the posterior variance (or beta_t) and no noise on the last step.
"""
from __future__ import annotations

import numbers
from typing import Callable

import torch
from tqdm.auto import tqdm

from minildm.diffusion.schedule import NoiseSchedule, gather_at

PREDICTIONS = ("eps", "x0", "v")
VARIANCES = ("posterior", "beta")

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t [B, ...], t [B]) -> [B, ...]


def _check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"Unknown prediction {prediction!r}; use one of {', '.join(PREDICTIONS)}.")


def diffusion_loss(
    model_fn: ModelFn,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    prediction: str = "eps",
    t: torch.Tensor | None = None,
    eps: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    per_sample: bool = False,
    snr_gamma: float | None = None,
) -> torch.Tensor:
    """Algorithm 1: the denoising regression loss on a batch of clean latents.

    model_fn:   (x_t [B, ...], t [B]) -> prediction [B, ...] of eps, x0 or v (see `prediction`).
    x0:         [B, ...] clean samples (latents already multiplied by the autoencoder's scale factor).
    t, eps:     drawn here when None (t ~ Uniform{0..T-1}, eps ~ N(0, I)); pass them to control the draw,
                e.g. to know which timestep each per-sample loss belongs to.
    per_sample: return the mean squared error of each sample, [B], instead of the batch mean (a scalar).
    snr_gamma:  None weights every t alike (Algorithm 1). gamma > 0: Min-SNR-gamma weighting (Hang et al. 2023,
                "Efficient Diffusion Training via Min-SNR Weighting Strategy", arXiv:2303.09556). Measured as
                an error on x_0, every target is ||x_0 - x0_theta||^2 times a weight that grows with
                SNR(t) = abar_t / (1 - abar_t): SNR for eps, SNR + 1 for v, 1 for x_0, so the nearly clean
                timesteps dominate the gradient while the noisy ones, where the prompt decides the layout,
                get little. Min-SNR caps the x_0 weight at gamma:
                    w_t = min(SNR, gamma) / SNR (eps),  min(SNR, gamma) / (SNR + 1) (v),  min(SNR, gamma) (x0).
    """
    _check_prediction(prediction)
    B = x0.shape[0]
    if t is None:
        t = torch.randint(0, schedule.num_timesteps, (B,), device=x0.device, generator=generator)  # t ~ Uniform
    if eps is None:
        eps = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)  # eps ~ N(0, I)
    x_t = schedule.q_sample(x0, t, eps)  # x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps

    if prediction == "eps":
        target = eps
    elif prediction == "x0":
        target = x0
    else:
        target = schedule.predict_v(x0, t, eps)  # v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0
    output = model_fn(x_t, t)
    if output.shape != target.shape:
        raise ValueError(f"model_fn returned shape {list(output.shape)} but the target has shape {list(target.shape)}.")

    per_sample_loss = (output - target).pow(2).flatten(1).mean(dim=1)  # ||target - output||^2 / dim, [B]
    if snr_gamma is not None:
        per_sample_loss = per_sample_loss * min_snr_weight(schedule.snr(t), snr_gamma, prediction)
    return per_sample_loss if per_sample else per_sample_loss.mean()


def min_snr_weight(snr: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights w_t [B] for SNR(t) [B] (see diffusion_loss): the x_0 weight min(SNR, gamma)
    divided by what the prediction's own MSE already weighs x_0 by (SNR for eps, SNR + 1 for v, 1 for x0)."""
    _check_prediction(prediction)
    if not gamma > 0:
        raise ValueError(f"snr_gamma must be a positive number (Hang et al. use 5), got {gamma}.")
    capped = snr.clamp(max=gamma)  # min(SNR, gamma)
    return {"eps": capped / snr, "v": capped / (snr + 1), "x0": capped}[prediction]


def as_eps_fn(model_fn: ModelFn, schedule: NoiseSchedule, prediction: str) -> ModelFn:
    """Wrap an x0- or v-predicting model so that it returns eps, as the samplers expect.

    "eps" returns model_fn unchanged; "x0" uses eps = (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t);
    "v" uses eps = sqrt(1 - abar_t) x_t + sqrt(abar_t) v.
    """
    _check_prediction(prediction)
    if prediction == "eps":
        return model_fn

    def eps_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        output = model_fn(x_t, t)
        if prediction == "x0":
            return schedule.predict_eps(x_t, t, output)
        return schedule.v_to_eps(x_t, t, output)

    return eps_fn


def p_sample_step(
    schedule: NoiseSchedule,
    x_t: torch.Tensor,
    t: torch.Tensor | int,
    eps: torch.Tensor,
    noise: torch.Tensor,
    variance: str = "posterior",
) -> torch.Tensor:
    """One ancestral step x_t -> x_{t-1} of the learned reverse process p_theta(x_{t-1} | x_t).

    x_t, eps, noise: [B, ...] (eps = eps_theta(x_t, t), noise ~ N(0, I)); t: LongTensor [B] or an int.
    variance: "posterior" uses sigma_t^2 = (1 - abar_{t-1}) beta_t / (1 - abar_t) (Idea #1 on the slides),
              "beta" uses sigma_t^2 = beta_t (DDPM's other choice). Where t = 0 no noise is added.
    """
    if variance not in VARIANCES:
        raise ValueError(f"Unknown variance {variance!r}; use one of {', '.join(VARIANCES)}.")
    beta_t = gather_at(schedule.betas, t, x_t)
    sqrt_one_minus_abar_t = gather_at(schedule.sqrt_one_minus_alphas_cumprod, t, x_t)
    sqrt_alpha_t = gather_at(schedule.alphas, t, x_t).sqrt()
    # Property 3: mu_theta(x_t, t) = (x_t - beta_t / sqrt(1 - abar_t) eps_theta) / sqrt(alpha_t)
    mean = (x_t - beta_t / sqrt_one_minus_abar_t * eps) / sqrt_alpha_t
    sigma2_table = schedule.posterior_variance if variance == "posterior" else schedule.betas
    sigma2_table = torch.cat([sigma2_table.new_zeros(1), sigma2_table[1:]])  # sigma_0 = 0: no noise on the last step
    sigma_t = gather_at(sigma2_table, t, x_t).sqrt()
    return mean + sigma_t * noise  # x_{t-1} = mu_theta + sigma_t z


# torch's CPU generator (mt19937) keeps only the low 32 bits of a seed: 2**32 would draw what 0 draws
MAX_SEED = 2**32 - 1


def seeded_generators(seed: int | list[int], n: int) -> list[torch.Generator]:
    """One CPU generator per image: image i's seeded seed + i (or seed[i] for a list of n seeds); ValueError
    for seeds outside [0, MAX_SEED]. Every sampler of minildm draws image i's noise from generator i only."""
    seeds = [seed + i for i in range(n)] if isinstance(seed, numbers.Integral) else list(seed)
    if len(seeds) != n or not all(isinstance(s, numbers.Integral) and 0 <= s <= MAX_SEED for s in seeds):
        raise ValueError(f"seed must be an integer with seed + {n - 1} <= {MAX_SEED} (torch's generator keeps 32 "
                         f"bits, larger seeds repeat smaller ones), or a list of {n} such seeds; got {seed}.")
    return [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]


def gaussian_noise(like: torch.Tensor,
                   generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
    """z ~ N(0, I) shaped like `like` [B, ...], on its device.

    generator: None (torch's global stream), one generator for the whole batch, or a list of B generators,
    one per image: image b's noise then comes from its own stream only, so an image does not depend on its
    neighbours in the batch (or on the batch size), and one image of a grid can be drawn again alone. Noise
    is drawn on the generator's device and moved (a CPU generator serves a GPU batch, same numbers)."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != like.shape[0]:
            raise ValueError(f"one generator per image: got {len(generator)} for a batch of {like.shape[0]}.")
        return torch.stack([torch.randn(like.shape[1:], dtype=like.dtype, generator=g, device=g.device)
                            for g in generator]).to(like.device)
    device = generator.device if generator is not None else like.device
    return torch.randn(like.shape, dtype=like.dtype, generator=generator, device=device).to(like.device)


@torch.no_grad()
def ddpm_sample(
    eps_fn: ModelFn,
    schedule: NoiseSchedule,
    x_T: torch.Tensor,
    variance: str = "posterior",
    generator: torch.Generator | list[torch.Generator] | None = None,
    progress: bool = True,
    return_trajectory: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
    """Ancestral sampling through all T steps, from x_T ~ N(0, I) [B, ...] to x_0 [B, ...].

    eps_fn(x_t [B, ...], t [B]) -> eps [B, ...]. Fresh noise z ~ N(0, I) is drawn (from `generator`, or one
    generator per image, see gaussian_noise) for every step except the last. With return_trajectory, also returns
    [x_T, x_{T-1}, ..., x_0] (T + 1 tensors).
    """
    x = x_T
    trajectory = [x]
    for t in tqdm(range(schedule.num_timesteps - 1, -1, -1), desc="DDPM", disable=not progress):
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        eps = eps_fn(x, t_batch)
        if t > 0:
            noise = gaussian_noise(x, generator)
        else:
            noise = torch.zeros_like(x)  # the last step returns the mean
        x = p_sample_step(schedule, x, t_batch, eps, noise, variance)
        if return_trajectory:
            trajectory.append(x)
    return (x, trajectory) if return_trajectory else x
