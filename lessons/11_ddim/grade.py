"""Grade lesson 11: python lessons/11_ddim/grade.py  (add -v to see what differed).

Compared with minildm/diffusion/ddim.py: ddim_timesteps against the library's "trailing" list (and its
previous timesteps taken from the list, as ddim_sample does), ddim_step against the library's step.
The timestep cases avoid exact halves in k T / n, so any rounding of them passes.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from lessons.grading import Check, main  # noqa: E402
from minildm.diffusion import ddim  # noqa: E402
from minildm.diffusion.ddpm import p_sample_step  # noqa: E402
from minildm.diffusion.schedule import NoiseSchedule  # noqa: E402


def reference_ddim_timesteps(num_timesteps, steps):
    timesteps = ddim.ddim_timesteps(num_timesteps, steps, spacing="trailing")
    return timesteps, torch.cat([timesteps[1:], torch.tensor([-1])])  # as in ddim_sample: the next entry, then -1


REFERENCE = {"ddim_timesteps": reference_ddim_timesteps, "ddim_step": ddim.ddim_step}

LINEAR = NoiseSchedule(1000, "linear")


def close(mine, ref, what: str, rtol: float = 1e-4, atol: float = 1e-4) -> None:
    """Tolerances leave room for float32 arithmetic (1 - abar_t loses digits near t = 0), not for wrong formulas."""
    mine = torch.as_tensor(mine)
    assert mine.shape == ref.shape, f"{what}: shape {tuple(mine.shape)}, expected {tuple(ref.shape)}"
    err = (mine.double() - ref.double()).abs().max().item()
    assert torch.allclose(mine.double(), ref.double(), rtol=rtol, atol=atol), f"{what}: max abs error {err:.3g}"


# ---------------------------------------------------------------- ddim_timesteps
def same_list(fn, T, n):
    timesteps, prev = fn(T, n)
    ref_timesteps, ref_prev = reference_ddim_timesteps(T, n)
    timesteps, prev = torch.as_tensor(timesteps), torch.as_tensor(prev)
    assert timesteps.dtype == torch.long and prev.dtype == torch.long, "return LongTensors"
    assert timesteps.tolist() == ref_timesteps.tolist(), (
        f"T={T}, n={n}: timesteps {timesteps.tolist()[:8]}..., expected {ref_timesteps.tolist()[:8]}...")
    assert prev.tolist() == ref_prev.tolist(), f"T={T}, n={n}: prev {prev.tolist()}, expected {ref_prev.tolist()}"


def check_timesteps_even(fn):
    same_list(fn, 1000, 50)
    same_list(fn, 1000, 10)


def check_timesteps_uneven(fn):
    for n in (3, 7, 30):
        same_list(fn, 1000, n)
    same_list(fn, 10, 3)


def check_timesteps_extremes(fn):
    same_list(fn, 20, 20)  # every timestep once: 19, 18, ..., 0, then clean data
    same_list(fn, 20, 1)  # one jump from T - 1 straight to clean data


# ---------------------------------------------------------------- ddim_step
def data(seed: int, shape=(3, 2, 4, 4)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g), torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)


def compare_step(fn, t, t_prev, eta, seed, what):
    x_t, eps, noise = data(seed)
    x_prev, x0 = fn(LINEAR, x_t, eps, t, t_prev, eta, noise)
    ref_prev, ref_x0 = ddim.ddim_step(LINEAR, x_t, eps, t, t_prev, eta, noise)
    close(x0, ref_x0, f"{what}: x0")
    close(x_prev, ref_prev, f"{what}: x_prev")
    assert x_prev.dtype == x_t.dtype and x0.dtype == x_t.dtype, f"dtypes {x_prev.dtype}, {x0.dtype}; expected {x_t.dtype}"


def check_step_deterministic(fn):
    compare_step(fn, 999, 979, 0.0, seed=0, what="eta = 0, 999 -> 979")
    compare_step(fn, 500, 250, 0.0, seed=1, what="eta = 0, 500 -> 250")


def check_step_to_clean(fn):
    compare_step(fn, 19, -1, 0.0, seed=2, what="last step 19 -> -1 (abar_prev = 1)")
    compare_step(fn, 332, -1, 1.0, seed=3, what="last step 332 -> -1 with eta = 1")


def check_step_stochastic(fn):
    compare_step(fn, 600, 300, 1.0, seed=4, what="eta = 1, 600 -> 300")
    compare_step(fn, 800, 700, 0.5, seed=5, what="eta = 0.5, 800 -> 700")


def check_step_is_ddpm(fn):
    x_t, eps, noise = data(6)
    for t in (1, 10, 700):
        x_prev, _ = fn(LINEAR, x_t, eps, t, t - 1, 1.0, noise)
        close(x_prev, p_sample_step(LINEAR, x_t, t, eps, noise), f"eta = 1, {t} -> {t - 1} against the DDPM step")


CHECKS = [
    Check("ddim_timesteps", check_timesteps_even,
          "n timesteps, strictly decreasing, the first at T - 1 and evenly spread (round(k T / n) - 1); each "
          "step lands on the next entry."),
    Check("ddim_timesteps", check_timesteps_uneven,
          "when n does not divide T the gaps differ: take where a step lands from the list itself, never "
          "t - T // n."),
    Check("ddim_timesteps", check_timesteps_extremes,
          "n = T visits every timestep once and n = 1 jumps straight to clean data: the last step always "
          "lands on -1."),
    Check("ddim_step", check_step_deterministic,
          "eta = 0: predict x0 (Property 3), then re-noise it to t_prev with the same eps: "
          "sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps."),
    Check("ddim_step", check_step_to_clean,
          "t_prev = -1 means abar_prev = 1 (clean data), not the last entry of the table."),
    Check("ddim_step", check_step_stochastic,
          "with eta > 0 the fresh noise sigma z takes its variance out of the eps term: sqrt(1 - abar_prev - sigma^2)."),
    Check("ddim_step", check_step_is_ddpm,
          "eta = 1 between neighbouring timesteps must be exactly the DDPM ancestral step: check sigma's formula."),
]

if __name__ == "__main__":
    sys.exit(main(CHECKS, __file__))
