"""DDIM (Song, Meng & Ermon 2021): sample a DDPM-trained model in a few dozen steps, and invert it.

DDIM keeps the DDPM marginals q(x_t | x_0) but walks a short, strictly decreasing list of timesteps
t_1 > t_2 > ... > t_n. Each step predicts x_0 (Property 3) and re-noises it to the previous timestep:

    x_0    = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)
    sigma  = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev)
    x_prev = sqrt(abar_prev) x_0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z

eta = 0 is deterministic (an ODE solver, so it can be run backwards: inversion); eta = 1 with consecutive
timesteps is exactly the DDPM ancestral step with the posterior variance. After the last listed timestep
the chain lands on clean data, abar_prev = 1 (written t_prev = -1).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from tqdm.auto import tqdm

from minildm.diffusion.ddpm import gaussian_noise
from minildm.diffusion.schedule import NoiseSchedule

SPACINGS = ("leading", "trailing")

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t [B, ...], t [B]) -> eps [B, ...]


def ddim_timesteps(num_timesteps: int, steps: int, spacing: str = "trailing", offset: int = 1) -> torch.Tensor:
    """The DDIM timesteps, a strictly decreasing LongTensor [steps] inside 0..T-1.

    "trailing" is the default: minildm's own models sample with it (the first step starts from pure noise at
    t = T - 1); Stable Diffusion v1 uses "leading" with offset 1.
    "leading" (Stable Diffusion v1): k * (T // steps) + offset for k = 0..steps-1; SD v1 uses offset = 1,
        e.g. T = 1000, steps = 50 -> 981, 961, ..., 21, 1.
    "trailing": round(k * T / steps) - 1 for k = steps..1, so the first step is always T - 1,
        e.g. T = 1000, steps = 3 -> 999, 666, 332. `offset` is not used.
    """
    if spacing not in SPACINGS:
        raise ValueError(f"Unknown spacing {spacing!r}; use one of {', '.join(SPACINGS)}.")
    if not isinstance(steps, int) or not 1 <= steps <= num_timesteps:
        raise ValueError(f"The number of DDIM steps must be an integer from 1 to num_timesteps = {num_timesteps}, got {steps!r}.")
    k = torch.arange(steps, dtype=torch.long)
    if spacing == "leading":
        if offset < 0 or (steps - 1) * (num_timesteps // steps) + offset > num_timesteps - 1:
            raise ValueError(
                f"offset={offset} pushes the leading timesteps outside 0..{num_timesteps - 1} for steps={steps}; "
                "use offset=0 or spacing='trailing'."
            )
        timesteps = k * (num_timesteps // steps) + offset
    else:
        # round(k T / steps) - 1 for k = 1..steps, in exact integer arithmetic (round half up)
        timesteps = ((k + 1) * num_timesteps * 2 + steps) // (2 * steps) - 1
    return timesteps.flip(0)


def _abar(schedule: NoiseSchedule, t: int) -> float:
    """abar_t as a python float (float64), with abar_{-1} = 1 (clean data)."""
    return 1.0 if t == -1 else float(schedule.alphas_cumprod[t])


def _check_step(schedule: NoiseSchedule, t: int, t_prev: int) -> None:
    if not 0 <= t < schedule.num_timesteps or not -1 <= t_prev < t:
        raise ValueError(
            f"A DDIM step needs 0 <= t < {schedule.num_timesteps} and -1 <= t_prev < t, got t={t} and t_prev={t_prev}."
        )


def ddim_sigma(schedule: NoiseSchedule, t: int, t_prev: int, eta: float) -> float:
    """The noise level of the DDIM step t -> t_prev (t_prev = -1: to clean data, abar_prev = 1)."""
    t, t_prev = int(t), int(t_prev)
    _check_step(schedule, t, t_prev)
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must lie in [0, 1] (0 = deterministic DDIM, 1 = DDPM-like), got {eta}.")
    abar_t, abar_prev = _abar(schedule, t), _abar(schedule, t_prev)
    # sigma = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev)
    return eta * math.sqrt((1 - abar_prev) / (1 - abar_t)) * math.sqrt(1 - abar_t / abar_prev)


def ddim_step(
    schedule: NoiseSchedule,
    x_t: torch.Tensor,
    eps: torch.Tensor,
    t: int,
    t_prev: int,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step x_t -> x_{t_prev}; returns (x_prev, x0), both [B, ...].

    x_t, eps: [B, ...]; t, t_prev: python ints or 0-d tensors, t_prev = -1 after the last step (abar = 1).
    noise: z ~ N(0, I) [B, ...], required when sigma > 0, i.e. eta > 0 and t_prev >= 0 (else unused, may be None).
    """
    t, t_prev = int(t), int(t_prev)
    sigma = ddim_sigma(schedule, t, t_prev, eta)
    abar_prev = _abar(schedule, t_prev)
    x0 = schedule.predict_x0(x_t, t, eps)  # x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)
    # x_prev = sqrt(abar_prev) x_0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z
    # (max(0, .) only guards float rounding: for eta <= 1, sigma^2 <= 1 - abar_prev)
    x_prev = math.sqrt(abar_prev) * x0 + math.sqrt(max(0.0, 1 - abar_prev - sigma**2)) * eps
    if sigma > 0:
        if noise is None:
            raise ValueError("ddim_step needs noise (z ~ N(0, I) shaped like x_t) when eta > 0.")
        x_prev = x_prev + sigma * noise
    return x_prev, x0


@torch.no_grad()
def ddim_sample(
    eps_fn: EpsFn,
    schedule: NoiseSchedule,
    x_T: torch.Tensor,
    steps: int = 50,
    eta: float = 0.0,
    spacing: str = "trailing",
    offset: int = 1,
    generator: torch.Generator | list[torch.Generator] | None = None,
    progress: bool = True,
    return_trajectory: bool = False,
    final_timestep: int = -1,
    skip_steps: int = 0,
) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
    """DDIM sampling from x_T ~ N(0, I) [B, ...] to x_0 [B, ...] in `steps` model calls.

    eps_fn(x_t [B, ...], t [B]) -> eps [B, ...]. Noise is drawn from `generator` (or one generator per image,
    see ddpm.gaussian_noise) only for steps with sigma > 0.
    final_timestep: where the last step lands: -1 = clean data (abar = 1), 0 = abar_0 (SD v1).
    skip_steps: start k entries into the timestep list, x_T being x_t at that entry (SDEdit's image-to-image:
    the chain runs steps - k model calls).
    With return_trajectory, also returns [x_T, ..., x_0] (steps - skip_steps + 1 tensors).
    """
    timesteps = ddim_timesteps(schedule.num_timesteps, steps, spacing, offset).tolist()
    if final_timestep not in (-1, 0) or not 0 <= skip_steps < steps:
        raise ValueError(f"final_timestep must be -1 or 0 and skip_steps in 0..{steps - 1}, "
                         f"got {final_timestep} and {skip_steps}.")
    timesteps = timesteps[skip_steps:]
    # The previous timestep is the next entry of the list (and -1 after the last one), never t - T // steps:
    # diffusers' DDIMScheduler computes prev = t - T // steps, which disagrees with the list whenever the
    # spacing is not an exact multiple (e.g. trailing, T = 1000, steps = 3: list 999, 666, 332, but 666 - 333 = 333).
    timesteps_prev = timesteps[1:] + [final_timestep]
    x = x_T
    trajectory = [x]
    for t, t_prev in tqdm(list(zip(timesteps, timesteps_prev)), desc="DDIM", disable=not progress):
        noise = None
        if ddim_sigma(schedule, t, t_prev, eta) > 0:
            noise = gaussian_noise(x, generator)
        eps = eps_fn(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long))
        x, _ = ddim_step(schedule, x, eps, t, t_prev, eta, noise)
        if return_trajectory:
            trajectory.append(x)
    return (x, trajectory) if return_trajectory else x


@torch.no_grad()
def ddim_invert(
    eps_fn: EpsFn,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    steps: int = 50,
    spacing: str = "trailing",
    offset: int = 1,
    progress: bool = True,
) -> torch.Tensor:
    """Deterministic DDIM inversion: run the eta = 0 step forwards in time, x_0 [B, ...] -> x_T [B, ...].

    Walks the same timestep list as `ddim_sample` upwards (from t = -1, clean data, to the largest listed
    timestep), so `ddim_sample(eps_fn, schedule, ddim_invert(eps_fn, schedule, x0, steps), steps)` gives
    back x0 up to the discretisation error. The step t_prev -> t needs eps at x_t, which is not known yet;
    as usual it is approximated by eps_fn(x_{t_prev}, t).
    """
    timesteps = ddim_timesteps(schedule.num_timesteps, steps, spacing, offset).flip(0).tolist()  # ascending
    x = x0
    for t_prev, t in tqdm(list(zip([-1] + timesteps[:-1], timesteps)), desc="DDIM inversion", disable=not progress):
        eps = eps_fn(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long))
        abar_prev, abar_t = _abar(schedule, t_prev), _abar(schedule, t)
        x0_pred = (x - math.sqrt(1 - abar_prev) * eps) / math.sqrt(abar_prev)  # Property 3 at t_prev
        x = math.sqrt(abar_t) * x0_pred + math.sqrt(1 - abar_t) * eps  # Property 1 with the same eps
    return x
