"""DDPM training loss (Algorithm 1) and ancestral sampler, checked with oracle models."""
import math

import pytest
import torch

from minildm.diffusion.ddpm import as_eps_fn, ddpm_sample, diffusion_loss, p_sample_step
from minildm.diffusion.schedule import NoiseSchedule

C = 1.7  # a point-mass data distribution: x_0 = C always


def point_mass_oracles(schedule, c=C):
    """The exact eps, x0 and v predictions when the data is the point mass x_0 = c."""

    def eps_fn(x_t, t):
        return schedule.predict_eps(x_t, t, torch.full_like(x_t, c))  # (x_t - sqrt(abar) c) / sqrt(1 - abar)

    def x0_fn(x_t, t):
        return torch.full_like(x_t, c)

    def v_fn(x_t, t):
        return schedule.predict_v(torch.full_like(x_t, c), t, eps_fn(x_t, t))

    return {"eps": eps_fn, "x0": x0_fn, "v": v_fn}


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_loss_is_zero_for_the_oracle(prediction):
    sch = NoiseSchedule(1000, "linear")
    x0 = torch.full((64, 2, 4, 4), C)
    gen = torch.Generator().manual_seed(0)
    loss = diffusion_loss(point_mass_oracles(sch)[prediction], sch, x0, prediction=prediction, generator=gen)
    assert loss.ndim == 0 and loss.item() < 1e-8


@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_x0_and_v_oracles_agree_with_eps_oracle(prediction):
    sch = NoiseSchedule(1000, "scaled_linear")
    oracles = point_mass_oracles(sch)
    gen = torch.Generator().manual_seed(1)
    t = torch.tensor([0, 5, 400, 999])
    x_t = sch.q_sample(torch.full((4, 3), C, dtype=torch.float64), t, torch.randn(4, 3, generator=gen, dtype=torch.float64))
    eps_from_other = as_eps_fn(oracles[prediction], sch, prediction)(x_t, t)
    assert torch.allclose(eps_from_other, oracles["eps"](x_t, t), atol=1e-8)


def test_loss_of_a_zero_model_is_the_target_power():
    sch = NoiseSchedule(1000, "linear")
    gen = torch.Generator().manual_seed(2)
    x0 = torch.full((4096, 8), C)

    def zero_model(x_t, t):
        return torch.zeros_like(x_t)

    # E ||eps||^2 / dim = 1 and ||x0||^2 / dim = C^2
    assert diffusion_loss(zero_model, sch, x0, generator=gen).item() == pytest.approx(1.0, abs=0.02)
    assert diffusion_loss(zero_model, sch, x0, prediction="x0", generator=gen).item() == pytest.approx(C**2, rel=1e-6)


def test_explicit_t_and_eps_and_per_sample_losses():
    sch = NoiseSchedule(100, "cosine")
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(3, 2, 2, generator=gen)
    eps = torch.randn(3, 2, 2, generator=gen)
    t = torch.tensor([0, 50, 99])

    def model(x_t, t):
        return 0.5 * x_t

    per_sample = diffusion_loss(model, sch, x0, t=t, eps=eps, per_sample=True)
    abar = sch.alphas_cumprod[t].float().view(-1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    expected = ((0.5 * x_t - eps) ** 2).mean(dim=(1, 2))
    assert per_sample.shape == (3,)
    assert torch.allclose(per_sample, expected, atol=1e-6)
    assert diffusion_loss(model, sch, x0, t=t, eps=eps).item() == pytest.approx(expected.mean().item(), rel=1e-6)


def test_training_timesteps_are_uniform_over_0_to_T_minus_1():
    sch = NoiseSchedule(10, "linear")
    seen = []

    def recorder(x_t, t):
        seen.append(t)
        return torch.zeros_like(x_t)

    diffusion_loss(recorder, sch, torch.zeros(20_000, 1), generator=torch.Generator().manual_seed(4))
    t = seen[0]
    assert t.dtype == torch.long and set(t.tolist()) == set(range(10))  # 0-indexed: 0..9, never 10
    counts = torch.bincount(t, minlength=10).double() / t.numel()
    assert torch.allclose(counts, torch.full((10,), 0.1, dtype=torch.float64), atol=0.01)


def test_loss_is_reproducible_with_a_generator():
    sch = NoiseSchedule(1000)
    x0 = torch.randn(8, 4)

    def model(x_t, t):
        return x_t * 0.3

    a = diffusion_loss(model, sch, x0, generator=torch.Generator().manual_seed(5))
    b = diffusion_loss(model, sch, x0, generator=torch.Generator().manual_seed(5))
    assert a.item() == b.item()


def test_bad_prediction_or_variance_raise():
    sch = NoiseSchedule(10)
    with pytest.raises(ValueError):
        diffusion_loss(lambda x, t: x, sch, torch.zeros(2, 3), prediction="score")
    with pytest.raises(ValueError):
        p_sample_step(sch, torch.zeros(2, 3), 5, torch.zeros(2, 3), torch.zeros(2, 3), variance="learned")


@pytest.mark.parametrize("variance", ["posterior", "beta"])
def test_p_sample_step_mean_and_noise_scale(variance):
    sch = NoiseSchedule(1000, "linear")
    gen = torch.Generator().manual_seed(6)
    x_t = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    eps = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    z = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 1, 500, 999])
    mean = p_sample_step(sch, x_t, t, eps, torch.zeros_like(z), variance)
    # the mean is the posterior mean at the predicted x0 (Properties 2 + 3)
    post_mean, _, _ = sch.q_posterior(sch.predict_x0(x_t, t, eps), x_t, t)
    assert torch.allclose(mean, post_mean, atol=1e-10)
    sigma = (p_sample_step(sch, x_t, t, eps, z, variance) - mean) / z
    table = sch.posterior_variance if variance == "posterior" else sch.betas
    expected = table[t].sqrt().clone()
    expected[0] = 0.0  # no noise on the last step
    assert torch.allclose(sigma, expected.view(-1, 1).expand(4, 3), atol=1e-10)


def test_ddpm_sample_with_point_mass_oracle_follows_the_exact_marginals():
    sch = NoiseSchedule(200, "linear")
    gen = torch.Generator().manual_seed(7)
    n = 6_000
    T = sch.num_timesteps
    # start exactly from q(x_{T-1} | x_0 = C) so every later marginal is exact: q(x_s | x_0 = C)
    x_T = sch.q_sample(torch.full((n, 1), C), T - 1, torch.randn(n, 1, generator=gen))
    x0, trajectory = ddpm_sample(point_mass_oracles(sch)["eps"], sch, x_T, generator=gen, progress=False, return_trajectory=True)
    assert len(trajectory) == T + 1 and trajectory[0] is x_T
    assert torch.allclose(x0, torch.full_like(x0, C), atol=1e-4)
    for s in [150, 60, 10, 2]:
        x_s = trajectory[T - 1 - s]  # trajectory[k] is the sample after k steps, at timestep T - 1 - k
        abar = sch.alphas_cumprod[s].item()
        std = math.sqrt(1 - abar)
        assert x_s.mean().item() == pytest.approx(math.sqrt(abar) * C, abs=5 * std / math.sqrt(n))
        assert x_s.std().item() == pytest.approx(std, rel=0.03)


def test_ddpm_sample_is_reproducible_and_uses_noise():
    sch = NoiseSchedule(50, "cosine")

    def eps_fn(x_t, t):
        return 0.5 * x_t

    x_T = torch.randn(3, 2, generator=torch.Generator().manual_seed(8))
    a = ddpm_sample(eps_fn, sch, x_T, generator=torch.Generator().manual_seed(9), progress=False)
    b = ddpm_sample(eps_fn, sch, x_T, generator=torch.Generator().manual_seed(9), progress=False)
    c = ddpm_sample(eps_fn, sch, x_T, generator=torch.Generator().manual_seed(10), progress=False)
    assert torch.equal(a, b) and not torch.allclose(a, c)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_min_snr_loss_is_the_capped_snr_times_the_x0_error(prediction):
    """Min-SNR-gamma (Hang et al. 2023): whatever the target, the weighted loss is min(SNR, gamma) times the
    squared error of the x_0 the output implies. A weight divided by SNR for v (instead of SNR + 1), or by
    SNR + 1 for eps, fails here."""
    sch = NoiseSchedule(1000, "linear")
    gen = torch.Generator().manual_seed(7)
    x0 = torch.randn(6, 2, 3, 3, generator=gen, dtype=torch.float64)
    eps = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 3, 60, 250, 600, 999])  # SNR from ~1e4 down to ~4e-5: both sides of gamma
    out = torch.randn(x0.shape, generator=gen, dtype=torch.float64)

    def model(x_t, t_):
        return out

    gamma = 5.0
    weighted = diffusion_loss(model, sch, x0, prediction, t=t, eps=eps, per_sample=True, snr_gamma=gamma)
    abar = sch.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    x0_hat = {"eps": (x_t - (1 - abar).sqrt() * out) / abar.sqrt(), "x0": out,
              "v": abar.sqrt() * x_t - (1 - abar).sqrt() * out}[prediction]
    snr = abar.flatten() / (1 - abar.flatten())
    expected = snr.clamp(max=gamma) * (x0_hat - x0).pow(2).flatten(1).mean(dim=1)
    assert torch.allclose(weighted, expected, rtol=1e-5)
    # a cap no SNR reaches leaves eps-prediction's loss as it was (w = SNR / SNR = 1)
    plain = diffusion_loss(model, sch, x0, "eps", t=t, eps=eps, per_sample=True)
    huge = diffusion_loss(model, sch, x0, "eps", t=t, eps=eps, per_sample=True, snr_gamma=1e9)
    assert torch.allclose(huge, plain, rtol=1e-5)


def test_min_snr_rejects_a_cap_that_is_not_positive():
    sch = NoiseSchedule(10, "linear")
    for gamma in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="snr_gamma"):
            diffusion_loss(lambda x_t, t: x_t, sch, torch.zeros(2, 3), snr_gamma=gamma)
