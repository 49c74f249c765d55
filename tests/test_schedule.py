"""NoiseSchedule: beta tables against closed forms and reference numbers, Properties 1-3, Bayes' rule."""
import math

import pytest
import torch

from minildm.diffusion.schedule import NoiseSchedule, beta_schedule, gather_at

KINDS = ["linear", "scaled_linear", "cosine"]


# ---------------------------------------------------------------- beta tables


def test_linear_betas_endpoints_and_spacing():
    betas = beta_schedule("linear", 1000)
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert betas[0].item() == pytest.approx(1e-4, rel=1e-12)
    assert betas[-1].item() == pytest.approx(0.02, rel=1e-12)
    assert torch.allclose(betas.diff(), torch.full((999,), (0.02 - 1e-4) / 999, dtype=torch.float64))
    custom = beta_schedule("linear", 10, beta_start=0.001, beta_end=0.1)
    assert custom[0].item() == pytest.approx(0.001) and custom[-1].item() == pytest.approx(0.1)


def test_scaled_linear_betas_are_linear_in_sqrt_space():
    betas = beta_schedule("scaled_linear", 1000)
    # hand-computed: (sqrt(0.00085) + t / 999 * (sqrt(0.012) - sqrt(0.00085)))^2
    assert betas[0].item() == pytest.approx(0.00085, rel=1e-12)
    assert betas[499].item() == pytest.approx(0.00480379298055072, rel=1e-10)
    assert betas[999].item() == pytest.approx(0.012, rel=1e-12)
    # linear in sqrt(beta), not in beta: the midpoint is below the arithmetic mean
    assert torch.allclose(betas.sqrt().diff(), betas.sqrt().diff()[0].expand(999))
    assert betas[499].item() < (0.00085 + 0.012) / 2 - 1e-3


def test_cosine_alphas_cumprod_follow_the_closed_form():
    schedule = NoiseSchedule(1000, "cosine")
    s, T = 0.008, 1000

    def f(u):
        return math.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2

    for t in [0, 1, 99, 499, 899, 990]:  # index t is the paper's step t + 1
        assert schedule.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-10)
    # hand-computed reference values of abar (0-indexed) and beta
    assert schedule.alphas_cumprod[0].item() == pytest.approx(0.999958715775178, rel=1e-10)
    assert schedule.alphas_cumprod[99].item() == pytest.approx(0.972092737113969, rel=1e-10)
    assert schedule.alphas_cumprod[499].item() == pytest.approx(0.49384359044063775, rel=1e-10)
    assert schedule.betas[899].item() == pytest.approx(0.019544179807182815, rel=1e-10)
    # the last beta would be 1 (abar_T = 0); it is clipped at 0.999
    assert schedule.betas[-1].item() == pytest.approx(0.999)
    assert schedule.betas.max().item() <= 0.999


def test_final_alphas_cumprod_match_published_schedules():
    # DDPM linear: abar_T ~ 4.04e-5; SD v1 scaled_linear: abar_T ~ 0.00466 (its "non-zero terminal SNR")
    assert NoiseSchedule(1000, "linear").alphas_cumprod[-1].item() == pytest.approx(4.035829765375676e-05, rel=1e-8)
    assert NoiseSchedule(1000, "scaled_linear").alphas_cumprod[-1].item() == pytest.approx(0.004660098513077238, rel=1e-8)


@pytest.mark.parametrize("kind", KINDS)
def test_tables_are_consistent_and_monotone(kind):
    sch = NoiseSchedule(1000, kind)
    for name in ["betas", "alphas", "alphas_cumprod", "alphas_cumprod_prev", "posterior_variance"]:
        assert getattr(sch, name).dtype == torch.float64
    assert torch.allclose(sch.alphas, 1 - sch.betas)
    for t in [0, 1, 17, 500, 999]:
        assert sch.alphas_cumprod[t].item() == pytest.approx(torch.prod(1 - sch.betas[: t + 1]).item(), rel=1e-12)
    assert sch.alphas_cumprod_prev[0].item() == 1.0
    assert torch.equal(sch.alphas_cumprod_prev[1:], sch.alphas_cumprod[:-1])
    assert (sch.alphas_cumprod.diff() < 0).all()  # strictly decreasing
    assert 0 < sch.alphas_cumprod[-1] < sch.alphas_cumprod[0] < 1
    assert torch.allclose(sch.sqrt_alphas_cumprod**2 + sch.sqrt_one_minus_alphas_cumprod**2, torch.ones(1000, dtype=torch.float64))
    assert sch.posterior_variance[0].item() == 0.0  # the last reverse step is deterministic
    assert sch.posterior_log_variance_clipped[0].item() == pytest.approx(math.log(sch.posterior_variance[1].item()))
    assert torch.allclose(sch.posterior_log_variance_clipped[1:], sch.posterior_variance[1:].log())


def test_schedule_is_not_stored_in_state_dict():
    # the tables are derived from (num_timesteps, kind, beta_start, beta_end): checkpoints store those
    assert NoiseSchedule(10).state_dict() == {}


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kind="quadratic"),
        dict(num_timesteps=1),
        dict(num_timesteps=10.0),
        dict(kind="cosine", beta_start=1e-4),
        dict(kind="linear", beta_start=0.02, beta_end=1e-4),
        dict(kind="linear", beta_end=1.0),
        dict(kind="scaled_linear", beta_start=0.0),
    ],
)
def test_bad_schedule_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        NoiseSchedule(**kwargs)


def test_bad_timesteps_raise():
    sch = NoiseSchedule(100)
    x = torch.zeros(2, 3)
    for t in [torch.tensor([0, 100]), torch.tensor([-1, 5]), torch.tensor([0.5, 1.0]), torch.tensor([1, 2, 3]), 100]:
        with pytest.raises(ValueError):
            sch.q_sample(x, t, x)


# ---------------------------------------------------------------- gathering


def test_gather_at_broadcasts_per_sample():
    values = torch.arange(10, dtype=torch.float64) * 0.5
    x = torch.zeros(3, 2, 4, 4, dtype=torch.float32)
    out = gather_at(values, torch.tensor([0, 3, 9]), x)
    assert out.shape == (3, 1, 1, 1) and out.dtype == torch.float32
    assert out.flatten().tolist() == [0.0, 1.5, 4.5]
    assert torch.equal(gather_at(values, 4, x), gather_at(values, torch.tensor([4, 4, 4]), x))


# ---------------------------------------------------------------- Property 1


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_q_sample_moments_monte_carlo(kind):
    sch = NoiseSchedule(1000, kind)
    gen = torch.Generator().manual_seed(0)
    n, x0_value = 200_000, 1.5
    x0 = torch.full((n, 1), x0_value, dtype=torch.float64)
    for t in [0, 50, 300, 700, 999]:
        eps = torch.randn(n, 1, generator=gen, dtype=torch.float64)
        x_t = sch.q_sample(x0, torch.full((n,), t), eps)
        abar = sch.alphas_cumprod[t].item()
        mean, var = math.sqrt(abar) * x0_value, 1 - abar  # q(x_t | x_0) = N(sqrt(abar) x_0, (1 - abar))
        assert x_t.mean().item() == pytest.approx(mean, abs=5 * math.sqrt(var / n) + 1e-12)
        assert x_t.var().item() == pytest.approx(var, rel=0.02)


def test_q_sample_keeps_the_input_dtype():
    sch = NoiseSchedule(100)
    x = torch.randn(2, 3, 4, 4)
    assert sch.q_sample(x, torch.tensor([0, 99]), torch.randn_like(x)).dtype == torch.float32
    assert sch.q_sample(x.double(), torch.tensor([0, 99]), torch.randn_like(x).double()).dtype == torch.float64


# ---------------------------------------------------------------- Property 2 against Bayes' rule


def _bayes_posterior(beta_t, abar_prev, x0, x_t):
    """q(x_{t-1} | x_t, x_0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x_0) for scalars, as a product of two Gaussians in x_{t-1}.

    q(x_t | x_{t-1}) = N(x_t; sqrt(alpha) x_{t-1}, beta) = N(x_{t-1}; x_t / sqrt(alpha), beta / alpha) up to a constant;
    q(x_{t-1} | x_0) = N(x_{t-1}; sqrt(abar_prev) x_0, 1 - abar_prev).
    """
    alpha = 1 - beta_t
    m1, v1 = x_t / math.sqrt(alpha), beta_t / alpha
    m2, v2 = math.sqrt(abar_prev) * x0, 1 - abar_prev
    var = 1 / (1 / v1 + 1 / v2)
    return var * (m1 / v1 + m2 / v2), var


@pytest.mark.parametrize("kind", KINDS)
def test_posterior_matches_product_of_gaussians(kind):
    sch = NoiseSchedule(1000, kind)
    ts = [1, 2, 10, 250, 600, 998]
    x0 = torch.tensor([[0.7], [-1.2], [2.0], [0.3], [-0.4], [1.1]], dtype=torch.float64)
    x_t = torch.tensor([[0.1], [0.9], [-1.5], [0.8], [2.2], [-0.6]], dtype=torch.float64)
    mean, var, log_var = sch.q_posterior(x0, x_t, torch.tensor(ts))
    for i, t in enumerate(ts):
        ref_mean, ref_var = _bayes_posterior(sch.betas[t].item(), sch.alphas_cumprod[t - 1].item(), x0[i, 0].item(), x_t[i, 0].item())
        assert mean[i, 0].item() == pytest.approx(ref_mean, rel=1e-9, abs=1e-12)
        assert var[i, 0].item() == pytest.approx(ref_var, rel=1e-9)
        assert log_var[i, 0].item() == pytest.approx(math.log(ref_var), rel=1e-9)


@pytest.mark.parametrize("t", [1, 40, 700])
def test_posterior_matches_numerical_bayes_on_a_grid(t):
    sch = NoiseSchedule(1000, "linear")
    beta, abar_prev = sch.betas[t].item(), sch.alphas_cumprod[t - 1].item()
    x0, x_t = 0.8, -0.3
    # unnormalised log density of x_{t-1}: log q(x_t | x_{t-1}) + log q(x_{t-1} | x_0)
    ref_mean, ref_var = _bayes_posterior(beta, abar_prev, x0, x_t)
    grid = torch.linspace(ref_mean - 12 * ref_var**0.5, ref_mean + 12 * ref_var**0.5, 200_001, dtype=torch.float64)
    log_p = -((x_t - math.sqrt(1 - beta) * grid) ** 2) / (2 * beta) - (grid - math.sqrt(abar_prev) * x0) ** 2 / (2 * (1 - abar_prev))
    w = torch.softmax(log_p, dim=0)
    grid_mean = (w * grid).sum().item()
    grid_var = (w * (grid - grid_mean) ** 2).sum().item()
    mean, var, _ = sch.q_posterior(torch.tensor([[x0]], dtype=torch.float64), torch.tensor([[x_t]], dtype=torch.float64), t)
    assert mean.item() == pytest.approx(grid_mean, abs=1e-6 * ref_var**0.5 + 1e-12)
    assert var.item() == pytest.approx(grid_var, rel=1e-5)


def test_posterior_at_t0_returns_x0():
    sch = NoiseSchedule(1000, "scaled_linear")
    x0, x_t = torch.randn(4, 3), torch.randn(4, 3)
    mean, var, _ = sch.q_posterior(x0, x_t, torch.zeros(4, dtype=torch.long))
    assert torch.allclose(mean, x0, atol=1e-6) and (var == 0).all()


# ---------------------------------------------------------------- Property 3, eps and v


@pytest.mark.parametrize("kind", KINDS)
def test_predict_x0_and_predict_eps_invert_q_sample(kind):
    sch = NoiseSchedule(1000, kind)
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(5, 2, 4, 4, generator=gen, dtype=torch.float64)
    eps = torch.randn(5, 2, 4, 4, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 1, 333, 800, 998])  # per-sample timesteps catch broadcasting mistakes
    x_t = sch.q_sample(x0, t, eps)
    assert torch.allclose(sch.predict_x0(x_t, t, eps), x0, atol=1e-8)
    assert torch.allclose(sch.predict_eps(x_t, t, x0), eps, atol=1e-8)


def test_v_prediction_round_trip():
    sch = NoiseSchedule(1000, "scaled_linear")
    gen = torch.Generator().manual_seed(2)
    x0 = torch.randn(4, 3, 2, 2, generator=gen, dtype=torch.float64)
    eps = torch.randn(4, 3, 2, 2, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 10, 500, 999])
    x_t = sch.q_sample(x0, t, eps)
    v = sch.predict_v(x0, t, eps)
    abar = sch.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(v, abar.sqrt() * eps - (1 - abar).sqrt() * x0)  # v = sqrt(abar) eps - sqrt(1 - abar) x0
    assert torch.allclose(sch.v_to_eps(x_t, t, v), eps, atol=1e-10)


def test_posterior_mean_in_eps_form():
    # Property 3: mu~(x_t, x_0(x_t, eps)) = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t)
    sch = NoiseSchedule(1000, "linear")
    gen = torch.Generator().manual_seed(3)
    x_t = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    eps = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    t = torch.tensor([1, 200, 999])
    mean, _, _ = sch.q_posterior(sch.predict_x0(x_t, t, eps), x_t, t)
    beta, abar, alpha = (v[t].view(-1, 1) for v in (sch.betas, sch.alphas_cumprod, sch.alphas))
    assert torch.allclose(mean, (x_t - beta / (1 - abar).sqrt() * eps) / alpha.sqrt(), atol=1e-10)


def test_snr():
    sch = NoiseSchedule(1000, "linear")
    snr = sch.snr(torch.tensor([0, 500, 999]))
    assert snr.shape == (3,) and snr.dtype == torch.float32
    assert snr[0].item() == pytest.approx(0.9999 / 0.0001, rel=1e-6)
    abar = sch.alphas_cumprod[500].item()
    assert snr[1].item() == pytest.approx(abar / (1 - abar), rel=1e-6)
    assert (sch.snr(torch.arange(1000)).diff() < 0).all()
