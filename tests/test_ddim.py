"""DDIM: timestep lists, the step against DDPM, determinism, the last step, and inversion."""
import math

import pytest
import torch

from minildm.diffusion.ddim import ddim_invert, ddim_sample, ddim_sigma, ddim_step, ddim_timesteps
from minildm.diffusion.ddpm import ddpm_sample, p_sample_step
from minildm.diffusion.schedule import NoiseSchedule


def gaussian_data_eps_fn(schedule, m, s):
    """The exact eps prediction E[eps | x_t] when the data is x_0 ~ N(m, s^2) per dimension.

    x_t ~ N(sqrt(abar) m, abar s^2 + 1 - abar), so E[eps | x_t] = sqrt(1 - abar) (x_t - sqrt(abar) m) / (abar s^2 + 1 - abar).
    """

    def eps_fn(x_t, t):
        abar = schedule.alphas_cumprod[t].to(x_t.dtype).view(-1, *([1] * (x_t.ndim - 1)))
        return (1 - abar).sqrt() * (x_t - abar.sqrt() * m) / (abar * s**2 + 1 - abar)

    return eps_fn


# ---------------------------------------------------------------- timesteps


CASES = [
    (1000, 50, "leading", 1),
    (1000, 50, "trailing", 1),
    (1000, 3, "leading", 1),
    (1000, 3, "trailing", 1),
    (1000, 7, "trailing", 1),
    (1000, 1, "leading", 1),
    (1000, 1, "trailing", 1),
    (1000, 1000, "leading", 0),
    (1000, 1000, "trailing", 1),
    (10, 10, "trailing", 1),
    (7, 3, "leading", 0),
    (7, 3, "trailing", 1),
    (999, 998, "trailing", 1),
]


@pytest.mark.parametrize("T, steps, spacing, offset", CASES)
def test_timesteps_are_strictly_decreasing_inside_range(T, steps, spacing, offset):
    ts = ddim_timesteps(T, steps, spacing, offset)
    assert ts.dtype == torch.long and ts.shape == (steps,)
    assert (ts.diff() < 0).all()  # strictly decreasing, so no repeats
    assert 0 <= ts.min() and ts.max() <= T - 1
    assert ts[-1] == ts.min()  # ends at the small end
    if steps == T:
        assert ts.tolist() == list(range(T - 1, -1, -1))  # every timestep once


def test_timesteps_reference_values():
    assert ddim_timesteps(1000, 50, "leading", 1)[:3].tolist() == [981, 961, 941]  # SD v1
    assert ddim_timesteps(1000, 50, "leading", 1)[-1].item() == 1
    assert ddim_timesteps(1000, 50, "trailing").tolist()[:2] == [999, 979]
    assert ddim_timesteps(1000, 50, "trailing").tolist()[-1] == 19
    assert ddim_timesteps(1000, 3, "trailing").tolist() == [999, 666, 332]
    assert ddim_timesteps(1000, 3, "leading", 0).tolist() == [666, 333, 0]
    assert ddim_timesteps(1000, 1, "leading", 1).tolist() == [1]
    assert ddim_timesteps(1000, 1, "trailing").tolist() == [999]


@pytest.mark.parametrize(
    "T, steps, spacing, offset",
    [(1000, 0, "leading", 1), (1000, 1001, "trailing", 1), (1000, 10, "linspace", 1), (1000, 1000, "leading", 1), (10, 5, "leading", -1), (10, 2.0, "leading", 1)],
)
def test_bad_timestep_arguments_raise(T, steps, spacing, offset):
    with pytest.raises(ValueError):
        ddim_timesteps(T, steps, spacing, offset)


# ---------------------------------------------------------------- the step


def test_eta_zero_is_deterministic():
    sch = NoiseSchedule(1000, "scaled_linear")
    gen = torch.Generator().manual_seed(0)
    x_t, eps, z1, z2 = (torch.randn(2, 3, 4, 4, generator=gen) for _ in range(4))
    a, _ = ddim_step(sch, x_t, eps, 500, 480, eta=0.0, noise=z1)
    b, _ = ddim_step(sch, x_t, eps, 500, 480, eta=0.0, noise=z2)
    c, _ = ddim_step(sch, x_t, eps, 500, 480, eta=0.0)
    assert torch.equal(a, b) and torch.equal(a, c)
    eps_fn = gaussian_data_eps_fn(sch, 0.5, 0.3)
    s1 = ddim_sample(eps_fn, sch, x_t, steps=10, generator=torch.Generator().manual_seed(1), progress=False)
    s2 = ddim_sample(eps_fn, sch, x_t, steps=10, generator=torch.Generator().manual_seed(2), progress=False)
    assert torch.equal(s1, s2)


def test_eta_one_sigma_is_the_ddpm_posterior_variance():
    sch = NoiseSchedule(1000, "linear")
    for t in [1, 2, 50, 500, 999]:
        assert ddim_sigma(sch, t, t - 1, eta=1.0) ** 2 == pytest.approx(sch.posterior_variance[t].item(), rel=1e-10)
    # non-consecutive steps: sigma^2 = (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)
    abar_t, abar_prev = sch.alphas_cumprod[700].item(), sch.alphas_cumprod[300].item()
    ref = (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)
    assert ddim_sigma(sch, 700, 300, eta=0.5) ** 2 == pytest.approx(0.25 * ref, rel=1e-10)
    assert ddim_sigma(sch, 700, 300, eta=0.0) == 0.0


@pytest.mark.parametrize("t", [1, 2, 100, 999])
def test_eta_one_consecutive_step_equals_ddpm_posterior_step(t):
    sch = NoiseSchedule(1000, "cosine")
    gen = torch.Generator().manual_seed(3)
    x_t, eps, z = (torch.randn(3, 5, generator=gen, dtype=torch.float64) for _ in range(3))
    x_ddim, _ = ddim_step(sch, x_t, eps, t, t - 1, eta=1.0, noise=z)
    x_ddpm = p_sample_step(sch, x_t, t, eps, z, variance="posterior")
    assert torch.allclose(x_ddim, x_ddpm, atol=1e-10)


def test_ddim_with_all_steps_and_eta_one_equals_ddpm_sampling():
    # the off-by-one check: T steps of DDIM (eta = 1) must be the DDPM chain, step for step, same noise
    sch = NoiseSchedule(50, "linear", beta_end=0.2)
    eps_fn = gaussian_data_eps_fn(sch, 0.4, 0.6)
    x_T = torch.randn(4, 2, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ddpm = ddpm_sample(eps_fn, sch, x_T, generator=torch.Generator().manual_seed(5), progress=False)
    for spacing, offset in [("trailing", 1), ("leading", 0)]:
        ddim = ddim_sample(eps_fn, sch, x_T, steps=50, eta=1.0, spacing=spacing, offset=offset,
                           generator=torch.Generator().manual_seed(5), progress=False)
        assert torch.allclose(ddim, ddpm, atol=1e-10)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_last_step_returns_x0(eta):
    sch = NoiseSchedule(1000, "scaled_linear")
    gen = torch.Generator().manual_seed(6)
    x_t, eps = torch.randn(2, 4, generator=gen), torch.randn(2, 4, generator=gen)
    x_prev, x0 = ddim_step(sch, x_t, eps, 1, -1, eta=eta)  # sigma = 0 at the last step: no noise needed
    abar = sch.alphas_cumprod[1].item()
    assert torch.allclose(x0, (x_t - math.sqrt(1 - abar) * eps) / math.sqrt(abar), atol=1e-6)
    assert torch.allclose(x_prev, x0, atol=1e-6)


def test_step_returns_x_prev_from_the_formula():
    sch = NoiseSchedule(1000, "linear")
    gen = torch.Generator().manual_seed(7)
    x_t, eps, z = (torch.randn(2, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    t, t_prev, eta = 600, 400, 0.7
    abar_t, abar_prev = sch.alphas_cumprod[t].item(), sch.alphas_cumprod[t_prev].item()
    x0 = (x_t - math.sqrt(1 - abar_t) * eps) / math.sqrt(abar_t)
    sigma = eta * math.sqrt((1 - abar_prev) / (1 - abar_t)) * math.sqrt(1 - abar_t / abar_prev)
    expected = math.sqrt(abar_prev) * x0 + math.sqrt(1 - abar_prev - sigma**2) * eps + sigma * z
    x_prev, x0_out = ddim_step(sch, x_t, eps, torch.tensor(t), torch.tensor(t_prev), eta=eta, noise=z)
    assert torch.allclose(x_prev, expected, atol=1e-12) and torch.allclose(x0_out, x0, atol=1e-12)


def test_bad_step_arguments_raise():
    sch = NoiseSchedule(100)
    x = torch.zeros(1, 3)
    for t, t_prev, eta, noise in [(10, 10, 0.0, None), (10, 20, 0.0, None), (100, 50, 0.0, None), (10, -2, 0.0, None),
                                  (10, 5, 1.0, None), (10, 5, 1.5, x), (10, 5, -0.1, x)]:
        with pytest.raises(ValueError):
            ddim_step(sch, x, x, t, t_prev, eta=eta, noise=noise)


# ---------------------------------------------------------------- samplers


@pytest.mark.parametrize("steps, eta", [(1, 0.0), (10, 0.0), (10, 1.0)])
def test_point_mass_oracle_lands_on_the_point(steps, eta):
    sch = NoiseSchedule(1000, "scaled_linear")
    c = -0.8

    def eps_fn(x_t, t):
        return sch.predict_eps(x_t, t, torch.full_like(x_t, c))

    x_T = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(8))
    x0, trajectory = ddim_sample(eps_fn, sch, x_T, steps=steps, eta=eta, generator=torch.Generator().manual_seed(9),
                                 progress=False, return_trajectory=True)
    assert len(trajectory) == steps + 1 and torch.equal(trajectory[-1], x0)
    assert torch.allclose(x0, torch.full_like(x0, c), atol=1e-4)


@pytest.mark.parametrize("steps, spacing, offset", [(10, "leading", 1), (7, "trailing", 1), (100, "leading", 0), (100, "trailing", 1)])
def test_inversion_then_sampling_is_exact_when_eps_ignores_x(steps, spacing, offset):
    # with eps depending on t only, the inversion step t_prev -> t and the sampling step t -> t_prev use the same
    # eps and are exact inverses; any mismatch between the two timestep pairings would show up here
    sch = NoiseSchedule(100, "cosine")
    field = torch.randn(100, 2, 3, 4, 4, generator=torch.Generator().manual_seed(11), dtype=torch.float64)

    def eps_fn(x_t, t):
        return field[t]

    x0 = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    x_T = ddim_invert(eps_fn, sch, x0, steps=steps, spacing=spacing, offset=offset, progress=False)
    assert not torch.allclose(x_T, x0, atol=0.1)
    reconstructed = ddim_sample(eps_fn, sch, x_T, steps=steps, spacing=spacing, offset=offset, progress=False)
    assert torch.allclose(reconstructed, x0, atol=1e-9)


def test_inversion_follows_the_probability_flow_and_reconstructs():
    # For Gaussian data N(m, s^2), the eta = 0 ODE maps x_0 to x_t = sqrt(abar_t) m + sqrt(abar_t s^2 + 1 - abar_t) (x_0 - m) / s.
    # DDIM is a first-order solver of it: the error shrinks as the number of steps grows.
    sch = NoiseSchedule(1000, "scaled_linear")
    m, s = 0.5, 0.4
    eps_fn = gaussian_data_eps_fn(sch, m, s)
    x0 = m + s * torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    errors = {}
    for steps in [20, 500]:
        x_T = ddim_invert(eps_fn, sch, x0, steps=steps, progress=False)
        abar = sch.alphas_cumprod[ddim_timesteps(1000, steps)[0]].item()
        exact = math.sqrt(abar) * m + math.sqrt(abar * s**2 + 1 - abar) * (x0 - m) / s
        reconstructed = ddim_sample(eps_fn, sch, x_T, steps=steps, progress=False)
        errors[steps] = ((x_T - exact).abs().max().item(), (reconstructed - x0).abs().max().item())
    assert errors[500][0] < 0.03 and errors[500][1] < 0.015
    assert errors[20][0] > 5 * errors[500][0] and errors[20][1] > 5 * errors[500][1]
