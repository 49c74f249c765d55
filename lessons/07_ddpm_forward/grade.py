"""Grade lesson 07: python lessons/07_ddpm_forward/grade.py  (add -v to see what differed).

Every check compares your function with the library (minildm/diffusion/schedule.py) on inputs where the
usual mistakes show: the default betas, both ends of the schedule, t = 0, per-sample timesteps.
REFERENCE holds the library's solutions in the exercises' signatures (tests/test_lessons_graders.py checks
that they pass, tests/test_lessons_b.py that typical wrong versions fail).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from lessons.grading import Check, main  # noqa: E402
from minildm.diffusion import schedule as lib  # noqa: E402


def library_schedule(alphas_cumprod: torch.Tensor) -> lib.NoiseSchedule:
    """The library NoiseSchedule with these alphas_cumprod (the checks only use the three default schedules)."""
    for kind in lib.SCHEDULE_KINDS:
        schedule = lib.NoiseSchedule(alphas_cumprod.shape[0], kind)
        if torch.allclose(schedule.alphas_cumprod, alphas_cumprod.double(), rtol=1e-12, atol=0):
            return schedule
    raise ValueError("library_schedule only knows the default linear, scaled_linear and cosine schedules.")


def _q_sample(alphas_cumprod, x0, t, eps):
    return library_schedule(alphas_cumprod).q_sample(x0, t, eps)


def _q_posterior(betas, alphas_cumprod, x0, x_t, t):
    mean, variance, _ = library_schedule(alphas_cumprod).q_posterior(x0, x_t, t)
    return mean, variance


REFERENCE = {
    "beta_schedule": lib.beta_schedule,
    "alphas_cumprod": lambda betas: torch.cumprod(1 - betas, dim=0),  # as NoiseSchedule.__init__ computes it
    "q_sample": _q_sample,
    "q_posterior": _q_posterior,
}

LINEAR = lib.NoiseSchedule(1000, "linear")
COSINE = lib.NoiseSchedule(1000, "cosine")


def close(mine, ref, what: str, rtol: float = 1e-4, atol: float = 1e-4) -> None:
    """Tolerances leave room for float32 arithmetic (1 - abar_t loses digits near t = 0), not for wrong formulas."""
    mine = torch.as_tensor(mine)
    assert mine.shape == ref.shape, f"{what}: shape {tuple(mine.shape)}, expected {tuple(ref.shape)}"
    err = (mine.double() - ref.double()).abs().max().item()
    assert torch.allclose(mine.double(), ref.double(), rtol=rtol, atol=atol), f"{what}: max abs error {err:.3g}"


# ---------------------------------------------------------------- beta_schedule
def check_linear_default(fn):
    betas = fn("linear", 1000)
    assert betas.dtype == torch.float64, f"dtype {betas.dtype}, expected float64"
    close(betas, lib.beta_schedule("linear", 1000), "linear betas", rtol=1e-9, atol=1e-12)


def check_linear_custom(fn):
    close(fn("linear", 10, 0.001, 0.2), lib.beta_schedule("linear", 10, 0.001, 0.2), "linear, T=10, 0.001..0.2",
          rtol=1e-9, atol=1e-12)


def check_scaled_linear(fn):
    close(fn("scaled_linear", 1000), lib.beta_schedule("scaled_linear", 1000), "scaled_linear betas",
          rtol=1e-9, atol=1e-12)
    close(fn("scaled_linear", 12, 0.001, 0.3), lib.beta_schedule("scaled_linear", 12, 0.001, 0.3),
          "scaled_linear, T=12, 0.001..0.3", rtol=1e-9, atol=1e-12)


def check_cosine(fn):
    for T in (1000, 50):
        close(fn("cosine", T), lib.beta_schedule("cosine", T), f"cosine betas, T={T}", rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------- alphas_cumprod
def check_abar_by_hand(fn):
    close(fn(torch.tensor([0.1, 0.2, 0.5], dtype=torch.float64)), torch.tensor([0.9, 0.72, 0.36], dtype=torch.float64),
          "betas (0.1, 0.2, 0.5)", rtol=1e-12, atol=1e-12)


def check_abar_schedules(fn):
    for schedule in (LINEAR, COSINE):
        close(fn(schedule.betas), schedule.alphas_cumprod, f"{schedule.kind} abar", rtol=1e-9, atol=1e-15)


# ---------------------------------------------------------------- q_sample
def check_q_sample_images(fn):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])  # one timestep per sample, both ends included
    for schedule in (LINEAR, COSINE):
        close(fn(schedule.alphas_cumprod, x0, t, eps), schedule.q_sample(x0, t, eps), f"{schedule.kind} x_t")


def check_q_sample_any_shape(fn):
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    t = torch.tensor([999, 3, 250, 0, 700])
    close(fn(LINEAR.alphas_cumprod, x0, t, eps), LINEAR.q_sample(x0, t, eps), "x_t for x0 of shape [5, 7]")


def check_q_sample_dtype(fn):
    x0 = torch.ones(2, 3, 4, 4)
    out = fn(LINEAR.alphas_cumprod, x0, torch.tensor([5, 900]), torch.zeros_like(x0))
    assert out.dtype == torch.float32, f"float32 input gave {out.dtype}"


# ---------------------------------------------------------------- q_posterior
def _posterior_case(fn, schedule, t, shape, seed):
    g = torch.Generator().manual_seed(seed)
    x0, x_t = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
    mean, variance = fn(schedule.betas, schedule.alphas_cumprod, x0, x_t, t)
    ref_mean, ref_variance, _ = schedule.q_posterior(x0, x_t, t)
    close(mean, ref_mean, f"{schedule.kind} mean at t={t.tolist()}", rtol=1e-3, atol=1e-3)
    close(torch.broadcast_to(torch.as_tensor(variance), x_t.shape), ref_variance.expand(x_t.shape),
          f"{schedule.kind} variance at t={t.tolist()}", rtol=1e-3, atol=1e-7)


def check_posterior_middle(fn):
    _posterior_case(fn, LINEAR, torch.tensor([1, 5, 500, 999]), (4, 3, 4, 4), seed=2)
    _posterior_case(fn, COSINE, torch.tensor([2, 998, 40]), (3, 6), seed=3)


def check_posterior_first_step(fn):
    _posterior_case(fn, LINEAR, torch.tensor([0, 0, 1]), (3, 2, 4, 4), seed=4)


CHECKS = [
    Check("beta_schedule", check_linear_default,
          "linear: T evenly spaced betas from beta_start to beta_end, both ends included, computed in float64."),
    Check("beta_schedule", check_linear_custom, "use the beta_start and beta_end you are given, not the defaults."),
    Check("beta_schedule", check_scaled_linear,
          "scaled_linear spaces sqrt(beta) evenly, then squares; it is not the plain linear schedule."),
    Check("beta_schedule", check_cosine,
          "cosine: abar on the T + 1 points u = 0..T, normalised by f(0); each beta is one minus a ratio of "
          "neighbours; clip at COSINE_MAX_BETA."),
    Check("alphas_cumprod", check_abar_by_hand,
          "abar_t is a running product of alpha_s = 1 - beta_s, and abar[0] already includes the first step."),
    Check("alphas_cumprod", check_abar_schedules, "abar_t = prod_{s<=t} (1 - beta_s), in float64."),
    Check("q_sample", check_q_sample_images,
          "Property 1 (mind the slide's erratum): the noise is scaled by a standard deviation, the signal by "
          "sqrt(abar_t); each sample uses its own t."),
    Check("q_sample", check_q_sample_any_shape,
          "the per-sample coefficients must broadcast against x0 of any number of dims ([B] -> [B, 1, ..., 1])."),
    Check("q_sample", check_q_sample_dtype, "the tables are float64; return x_t in x0's dtype."),
    Check("q_posterior", check_posterior_middle,
          "Property 2 with the right subscripts: which coefficients use abar_{t-1} and which abar_t? "
          "The variance is (1 - abar_{t-1}) beta_t / (1 - abar_t)."),
    Check("q_posterior", check_posterior_first_step,
          "at t = 0 there is no earlier noisy step: abar_{t-1} is 1 (the clean data), so the mean is x_0 and "
          "the variance 0."),
]

if __name__ == "__main__":
    sys.exit(main(CHECKS, __file__))
