"""Grade lesson 08: python lessons/08_ddpm_training/grade.py  (add -v to see what differed).

predict_x0 and p_sample_step are compared with the library (minildm/diffusion/schedule.py, ddpm.py).
ddpm_loss draws random numbers, so it is checked by what it does rather than by its exact draws: a spy
network records every (x_t, t) it is shown, and the grader checks that t is uniform over 0..T-1, that the
noise hidden in x_t is standard normal, and that the loss is the mean squared error against that noise.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from lessons.grading import Check, main  # noqa: E402
from minildm.diffusion import ddpm  # noqa: E402
from minildm.diffusion.schedule import NoiseSchedule, gather_at  # noqa: E402

REFERENCE = {
    "predict_x0": lambda schedule, x_t, t, eps: schedule.predict_x0(x_t, t, eps),
    "ddpm_loss": lambda model_fn, schedule, x0, generator=None: ddpm.diffusion_loss(model_fn, schedule, x0,
                                                                                     generator=generator),
    "p_sample_step": lambda schedule, x_t, t, eps, noise: ddpm.p_sample_step(schedule, x_t, t, eps, noise),
}

LINEAR = NoiseSchedule(1000, "linear")
COSINE = NoiseSchedule(20, "cosine")  # few steps: every timestep is drawn often in one batch


def close(mine, ref, what: str, rtol: float = 1e-4, atol: float = 1e-4) -> None:
    """Tolerances leave room for float32 arithmetic (1 - abar_t loses digits near t = 0), not for wrong formulas."""
    mine = torch.as_tensor(mine)
    assert mine.shape == ref.shape, f"{what}: shape {tuple(mine.shape)}, expected {tuple(ref.shape)}"
    err = (mine.double() - ref.double()).abs().max().item()
    assert torch.allclose(mine.double(), ref.double(), rtol=rtol, atol=atol), f"{what}: max abs error {err:.3g}"


def randn(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- predict_x0
def check_x0_inverts_q_sample(fn):
    x0, eps = randn(4, 3, 4, 4, seed=0), randn(4, 3, 4, 4, seed=1)
    t = torch.tensor([0, 10, 400, 999])
    x_t = LINEAR.q_sample(x0, t, eps)
    close(fn(LINEAR, x_t, t, eps), LINEAR.predict_x0(x_t, t, eps), "x0 from q_sample's x_t", atol=1e-3)


def check_x0_any_input(fn):
    x_t, eps = randn(3, 5, seed=2), randn(3, 5, seed=3)
    t = torch.tensor([19, 0, 7])
    out = fn(COSINE, x_t, t, eps)
    close(out, COSINE.predict_x0(x_t, t, eps), "x0 for random x_t, eps (cosine, T=20)", atol=1e-3)
    assert out.dtype == x_t.dtype, f"dtype {out.dtype}, expected {x_t.dtype}"


# ---------------------------------------------------------------- ddpm_loss
class Spy:
    """A stand-in for eps_theta: predicts w * x_t (w requires grad) and remembers what it was shown."""

    def __init__(self):
        self.w = torch.tensor(0.5, requires_grad=True)
        self.calls = []

    def __call__(self, x_t, t):
        self.calls.append((x_t.detach().clone(), t.detach().clone()))
        return self.w * x_t


def run_spy(fn, schedule, x0, seed):
    spy = Spy()
    loss = fn(spy, schedule, x0, torch.Generator().manual_seed(seed))
    assert len(spy.calls) == 1, f"model_fn was called {len(spy.calls)} times, expected once"
    x_t, t = spy.calls[0]
    return spy, loss, x_t, t


def implied_eps(schedule, x0, x_t, t):
    """The noise that turns x0 into x_t at the recorded t (Property 1 solved for eps)."""
    signal = gather_at(schedule.sqrt_alphas_cumprod, t, x_t) * x0
    return (x_t - signal) / gather_at(schedule.sqrt_one_minus_alphas_cumprod, t, x_t)


def check_loss_timesteps(fn):
    x0 = randn(2000, 3, 2, 2, seed=4)
    _, _, _, t = run_spy(fn, COSINE, x0, seed=5)
    T = COSINE.num_timesteps
    assert t.dtype == torch.long and t.shape == (2000,), f"t: dtype {t.dtype}, shape {tuple(t.shape)}; expected long [B]"
    assert int(t.min()) == 0 and int(t.max()) == T - 1, f"t ranged {int(t.min())}..{int(t.max())}, expected 0..{T - 1}"
    counts = torch.bincount(t, minlength=T)
    assert counts.min() > 0.6 * 2000 / T and counts.max() < 1.4 * 2000 / T, f"counts per t: {counts.tolist()}"


def check_loss_noise(fn):
    x0 = randn(2000, 3, 2, 2, seed=6)
    _, _, x_t, t = run_spy(fn, COSINE, x0, seed=7)
    assert x_t.shape == x0.shape, f"x_t shape {tuple(x_t.shape)}, expected {tuple(x0.shape)}"
    eps = implied_eps(COSINE, x0, x_t, t.clamp(0, COSINE.num_timesteps - 1))
    assert abs(eps.mean().item()) < 0.05 and abs(eps.std().item() - 1) < 0.05, (
        f"the noise inside x_t has mean {eps.mean():.3f} and std {eps.std():.3f}; expected 0 and 1")


def check_loss_value(fn):
    x0 = randn(512, 3, 4, 4, seed=8)
    spy, loss, x_t, t = run_spy(fn, LINEAR, x0, seed=9)
    assert torch.is_tensor(loss) and loss.ndim == 0, "return the loss as a scalar tensor"
    assert loss.requires_grad, "the loss must stay differentiable (no .item(), no torch.no_grad())"
    expected = (implied_eps(LINEAR, x0, x_t, t) - spy.w.detach() * x_t).pow(2).mean()
    close(loss.detach(), expected, "loss against the noise hidden in x_t", rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------- p_sample_step
def check_step_mean(fn):
    x_t, eps = randn(4, 3, 4, 4, seed=10), randn(4, 3, 4, 4, seed=11)
    t, noise = torch.tensor([1, 30, 500, 999]), torch.zeros(4, 3, 4, 4)
    close(fn(LINEAR, x_t, t, eps, noise), ddpm.p_sample_step(LINEAR, x_t, t, eps, noise), "mu_theta (noise = 0)")


def check_step_noise_scale(fn):
    noise = randn(4, 6, seed=12)
    zeros, t = torch.zeros(4, 6), torch.tensor([1, 2, 300, 999])
    out = fn(LINEAR, zeros, t, zeros, noise)  # x_t = eps = 0: the output is sigma_t z
    close(out, ddpm.p_sample_step(LINEAR, zeros, t, zeros, noise), "sigma_t z (x_t = eps = 0)", rtol=1e-3, atol=1e-5)
    assert out.dtype == noise.dtype, f"dtype {out.dtype}, expected {noise.dtype}"


def check_step_last(fn):
    x_t, eps, noise = randn(3, 2, 4, 4, seed=13), randn(3, 2, 4, 4, seed=14), randn(3, 2, 4, 4, seed=15)
    t = torch.tensor([0, 0, 5])
    close(fn(LINEAR, x_t, t, eps, noise), ddpm.p_sample_step(LINEAR, x_t, t, eps, noise), "steps at t = 0 and 5")


CHECKS = [
    Check("predict_x0", check_x0_inverts_q_sample,
          "Property 3 undoes Property 1: subtract the scaled noise from x_t, then divide by the signal's scale "
          "(the slide's version has a sign, a variable and a sqrt wrong)."),
    Check("predict_x0", check_x0_any_input, "per-sample coefficients from abar_t, cast to x_t's dtype."),
    Check("ddpm_loss", check_loss_timesteps,
          "t: one uniform draw per sample over all T timesteps, 0-indexed (the slide's 1..T is our 0..T-1)."),
    Check("ddpm_loss", check_loss_noise,
          "x_t must be q(x_t | x_0) with standard normal noise: Property 1, eps drawn with randn."),
    Check("ddpm_loss", check_loss_value,
          "the regression target is the noise eps (not x_0), the error is averaged over every element, and the "
          "loss stays a differentiable tensor."),
    Check("p_sample_step", check_step_mean,
          "mu_theta = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t): Property 3 put into Property 2."),
    Check("p_sample_step", check_step_noise_scale,
          "the noise is multiplied by a standard deviation: the square root of the posterior variance "
          "(1 - abar_{t-1}) beta_t / (1 - abar_t), not beta_t."),
    Check("p_sample_step", check_step_last,
          "the step out of t = 0 returns the mean: no noise there (and abar before the first step is 1)."),
]

if __name__ == "__main__":
    sys.exit(main(CHECKS, __file__))
