"""Lessons 07-12: every grader fails realistic wrong versions (the slide typos, a missing sqrt, off-by-ones,
the t - T // n pitfall, a flipped sign...) and accepts right answers written differently.
tests/test_lessons_graders.py checks that the references pass and the stubs fail; .ci/lessons runs every
lesson.py with --quick.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from einops import einsum, rearrange

from lesson_helpers import assert_two_wrong_versions_each, failed
from minildm.diffusion import ddim
from minildm.diffusion import schedule as lib_schedule
from minildm.diffusion.guidance import drop_tokens
from minildm.diffusion.schedule import gather_at
from minildm.modules.unet import timestep_embedding

NAMES = ["07_ddpm_forward", "08_ddpm_training", "09_unet_cross_attention", "10_latent_diffusion", "11_ddim",
         "12_classifier_free_guidance"]


# ---------------------------------------------------------------------------------------------------------
# Realistic wrong versions: (lesson, exercise, label, function)
# ---------------------------------------------------------------------------------------------------------
def abar_at(abar, t, x):
    return gather_at(abar, t, x)


# lesson 07 ---------------------------------------------------------------
def betas_compvis_linear(kind, T, beta_start=None, beta_end=None):
    """Reads CompVis' "linear" literally: plain linear spacing for SD's betas."""
    if kind == "scaled_linear":
        return torch.linspace(beta_start or 0.00085, beta_end or 0.012, T, dtype=torch.float64)
    return lib_schedule.beta_schedule(kind, T, beta_start, beta_end)


def betas_float32(kind, T, beta_start=None, beta_end=None):
    return lib_schedule.beta_schedule(kind, T, beta_start, beta_end).float()


def betas_cosine_unclipped(kind, T, beta_start=None, beta_end=None):
    if kind != "cosine":
        return lib_schedule.beta_schedule(kind, T, beta_start, beta_end)
    u = torch.arange(T + 1, dtype=torch.float64)
    f = torch.cos((u / T + 0.008) / 1.008 * math.pi / 2) ** 2
    abar = f / f[0]
    return 1 - abar[1:] / abar[:-1]


def betas_ignore_arguments(kind, T, beta_start=None, beta_end=None):
    return lib_schedule.beta_schedule(kind, T)


def abar_first_order(betas):
    return 1 - torch.cumsum(betas, dim=0)


def abar_prev(betas):
    abar = torch.cumprod(1 - betas, dim=0)
    return torch.cat([torch.ones(1, dtype=abar.dtype), abar[:-1]])


def q_sample_slide(abar, x0, t, eps):
    return abar_at(abar.sqrt(), t, x0) * x0 + abar_at(1 - abar, t, x0) * eps  # the slide's (1 - abar) eps


def q_sample_no_sqrt_signal(abar, x0, t, eps):
    return abar_at(abar, t, x0) * x0 + abar_at((1 - abar).sqrt(), t, x0) * eps


def q_sample_off_by_one(abar, x0, t, eps):
    a = abar[t - 1].to(x0.dtype).view(-1, *[1] * (x0.ndim - 1))
    return a.sqrt() * x0 + (1 - a).sqrt() * eps


def q_sample_first_t(abar, x0, t, eps):
    a = abar[t[0]].to(x0.dtype)
    return a.sqrt() * x0 + (1 - a).sqrt() * eps


def q_sample_4d_only(abar, x0, t, eps):
    a = abar[t].to(x0.dtype)[:, None, None, None]
    return a.sqrt() * x0 + (1 - a).sqrt() * eps


def q_sample_float64(abar, x0, t, eps):
    a = abar[t].view(-1, *[1] * (x0.ndim - 1))
    return a.sqrt() * x0 + (1 - a).sqrt() * eps


def _posterior(betas, abar, x0, x_t, t, slide=False, wrap=False, variance_beta=False):
    shape = (-1, *[1] * (x_t.ndim - 1))
    prev_table = abar.roll(1) if wrap else torch.cat([torch.ones(1, dtype=abar.dtype), abar[:-1]])
    a, a_prev, b = abar[t].view(shape), prev_table[t].view(shape), betas[t].view(shape)
    alpha = 1 - b
    if slide:  # sqrt(abar_t) on x_0 and (1 - abar_t) on x_t
        mean = a.sqrt() * b / (1 - a) * x0 + alpha.sqrt() * (1 - a) / (1 - a) * x_t
    else:
        mean = a_prev.sqrt() * b / (1 - a) * x0 + alpha.sqrt() * (1 - a_prev) / (1 - a) * x_t
    variance = b if variance_beta else (1 - a_prev) * b / (1 - a)
    return mean.to(x_t.dtype), variance.to(x_t.dtype)


def posterior_slide(betas, abar, x0, x_t, t):
    return _posterior(betas, abar, x0, x_t, t, slide=True)


def posterior_wraparound(betas, abar, x0, x_t, t):
    return _posterior(betas, abar, x0, x_t, t, wrap=True)  # abar[t - 1] with Python's abar[-1] at t = 0


def posterior_variance_beta(betas, abar, x0, x_t, t):
    return _posterior(betas, abar, x0, x_t, t, variance_beta=True)


# lesson 08 ---------------------------------------------------------------
def x0_slide(schedule, x_t, t, eps):
    a = abar_at(schedule.alphas_cumprod, t, x_t)
    return (x_t + (1 - a) * eps) / a.sqrt()


def x0_no_sqrt(schedule, x_t, t, eps):
    a = abar_at(schedule.alphas_cumprod, t, x_t)
    return (x_t - (1 - a) * eps) / a.sqrt()


def x0_divide_by_abar(schedule, x_t, t, eps):
    a = abar_at(schedule.alphas_cumprod, t, x_t)
    return (x_t - (1 - a).sqrt() * eps) / a


def _loss(model_fn, schedule, x0, generator=None, t_low=0, t_high=None, shift=0, one_t=False, target="eps",
          noise="randn", slide=False, reduce="mean"):
    T = schedule.num_timesteps
    B = x0.shape[0]
    t_high = T if t_high is None else t_high
    t = torch.randint(t_low, t_high, (1,) if one_t else (B,), generator=generator).expand(B)
    eps = torch.randn(x0.shape, generator=generator) if noise == "randn" else torch.rand(x0.shape, generator=generator)
    a = abar_at(schedule.alphas_cumprod, t - shift, x0)
    x_t = a.sqrt() * x0 + ((1 - a) if slide else (1 - a).sqrt()) * eps
    out = model_fn(x_t, t)
    err = (out - (eps if target == "eps" else x0)).pow(2)
    return err.mean() if reduce == "mean" else err.sum()


def loss_against_x0(model_fn, schedule, x0, generator=None):
    return _loss(model_fn, schedule, x0, generator, target="x0")


def loss_t_one_to_T(model_fn, schedule, x0, generator=None):
    return _loss(model_fn, schedule, x0, generator, t_low=1, t_high=schedule.num_timesteps + 1, shift=1)


def loss_never_last_t(model_fn, schedule, x0, generator=None):
    return _loss(model_fn, schedule, x0, generator, t_high=schedule.num_timesteps - 1)


def loss_one_t_per_batch(model_fn, schedule, x0, generator=None):
    return _loss(model_fn, schedule, x0, generator, one_t=True)


def loss_uniform_noise(model_fn, schedule, x0, generator=None):
    return _loss(model_fn, schedule, x0, generator, noise="rand")


def loss_slide_q_sample(model_fn, schedule, x0, generator=None):
    return _loss(model_fn, schedule, x0, generator, slide=True)


def loss_sum(model_fn, schedule, x0, generator=None):
    return _loss(model_fn, schedule, x0, generator, reduce="sum")


def loss_item(model_fn, schedule, x0, generator=None):
    return torch.tensor(_loss(model_fn, schedule, x0, generator).item())


def _p_sample(schedule, x_t, t, eps, noise, wrap=False, no_sqrt=False, beta=False, mean_no_sqrt=False):
    b = abar_at(schedule.betas, t, x_t)
    a = abar_at(schedule.alphas_cumprod, t, x_t)
    prev_table = schedule.alphas_cumprod.roll(1) if wrap else schedule.alphas_cumprod_prev
    a_prev = abar_at(prev_table, t, x_t)
    scale = (1 - a) if mean_no_sqrt else (1 - a).sqrt()
    mean = (x_t - b / scale * eps) / (1 - b).sqrt()
    variance = b * (t > 0).view(-1, *[1] * (x_t.ndim - 1)) if beta else (1 - a_prev) * b / (1 - a)
    return mean + (variance if no_sqrt else variance.sqrt()) * noise


def p_sample_noise_at_zero(schedule, x_t, t, eps, noise):
    return _p_sample(schedule, x_t, t, eps, noise, wrap=True)


def p_sample_variance_not_sqrt(schedule, x_t, t, eps, noise):
    return _p_sample(schedule, x_t, t, eps, noise, no_sqrt=True)


def p_sample_beta_variance(schedule, x_t, t, eps, noise):
    return _p_sample(schedule, x_t, t, eps, noise, beta=True)


def p_sample_mean_missing_sqrt(schedule, x_t, t, eps, noise):
    return _p_sample(schedule, x_t, t, eps, noise, mean_no_sqrt=True)


# lesson 09 ---------------------------------------------------------------
def _embedding(t, dim, max_period=10000.0, freqs=None, sin_first=False, interleave=False):
    half = dim // 2
    i = torch.arange(half, dtype=torch.float32)
    freqs = torch.exp(-math.log(max_period) * i / half) if freqs is None else freqs(i, half, max_period)
    args = t.float()[:, None] * freqs[None]
    parts = [torch.sin(args), torch.cos(args)] if sin_first else [torch.cos(args), torch.sin(args)]
    if interleave:
        return rearrange(torch.stack(parts, dim=-1), "b h two -> b (h two)")
    return torch.cat(parts, dim=-1)


def embedding_linear_freqs(t, dim, max_period=10000.0):
    return _embedding(t, dim, max_period, freqs=lambda i, half, p: i / half)  # no exponent: frequencies 0..1


def embedding_half_minus_one(t, dim, max_period=10000.0):
    return _embedding(t, dim, max_period, freqs=lambda i, half, p: torch.exp(-math.log(p) * i / (half - 1)))


def embedding_sin_first(t, dim, max_period=10000.0):
    return _embedding(t, dim, max_period, sin_first=True)


def embedding_interleaved(t, dim, max_period=10000.0):
    return _embedding(t, dim, max_period, interleave=True)


def _cross(x, context, w_q, w_k, w_v, heads, mask=None, softmax_dim=-1, scale="d", kv_from_x=False, use_mask=True):
    source = x if kv_from_x else context
    q, k, v = (rearrange(m, "b n (h d) -> b h n d", h=heads) for m in (x @ w_q, source @ w_k, source @ w_v))
    d = q.shape[-1]
    factor = {"d": d**-0.5, "none": 1.0, "inner": (d * heads) ** -0.5}[scale]
    scores = einsum(q, k, "b h n d, b h m d -> b h n m") * factor
    if mask is not None and use_mask:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    probs = scores.softmax(dim=softmax_dim)
    return rearrange(einsum(probs, v, "b h n m, b h m d -> b h n d"), "b h n d -> b n (h d)"), probs


def cross_softmax_over_queries(x, context, w_q, w_k, w_v, heads, mask=None):
    return _cross(x, context, w_q, w_k, w_v, heads, mask, softmax_dim=-2)


def cross_no_scaling(x, context, w_q, w_k, w_v, heads, mask=None):
    return _cross(x, context, w_q, w_k, w_v, heads, mask, scale="none")


def cross_scale_by_inner(x, context, w_q, w_k, w_v, heads, mask=None):
    return _cross(x, context, w_q, w_k, w_v, heads, mask, scale="inner")


def cross_keys_from_x(x, context, w_q, w_k, w_v, heads, mask=None):
    if x.shape[-1] != w_k.shape[0]:  # a self-attention layer by mistake: W_K, W_V sized for x
        w_k, w_v = w_k[: x.shape[-1]], w_v[: x.shape[-1]]
    return _cross(x, context, w_q, w_k, w_v, heads, mask, kv_from_x=True)


def cross_ignores_mask(x, context, w_q, w_k, w_v, heads, mask=None):
    return _cross(x, context, w_q, w_k, w_v, heads, mask, use_mask=False)


# lesson 10 ---------------------------------------------------------------
def _training_step(model, images, captions, p_uncond=0.1, generator=None, scale="multiply", drop="p",
                   context_grad=True, target="eps"):
    with torch.no_grad():
        z = model.autoencoder.encode(images)
    s = model.autoencoder.scale_factor
    z0 = {"multiply": z * s, "forget": z, "divide": z / s}[scale]
    tokens, empty = model.tokenizer.encode(captions), model.tokenizer.encode([""])
    if drop == "p":
        tokens = drop_tokens(tokens, empty, p_uncond, generator)
    elif drop == "1-p":
        tokens = drop_tokens(tokens, empty, 1 - p_uncond, generator)
    if context_grad:
        context, mask = model.text_encoder(tokens)
    else:
        with torch.no_grad():
            context, mask = model.text_encoder(tokens)
    t = torch.randint(0, model.schedule.num_timesteps, (len(captions),), generator=generator)
    eps = torch.randn(z0.shape, generator=generator)
    z_t = model.schedule.q_sample(z0, t, eps)
    return F.mse_loss(model.unet(z_t, t, context, mask), eps if target == "eps" else z0)


def step_forgets_scale(model, images, captions, p_uncond=0.1, generator=None):
    return _training_step(model, images, captions, p_uncond, generator, scale="forget")


def step_divides_by_scale(model, images, captions, p_uncond=0.1, generator=None):
    return _training_step(model, images, captions, p_uncond, generator, scale="divide")


def step_no_prompt_dropping(model, images, captions, p_uncond=0.1, generator=None):
    return _training_step(model, images, captions, p_uncond, generator, drop="never")


def step_drops_with_one_minus_p(model, images, captions, p_uncond=0.1, generator=None):
    return _training_step(model, images, captions, p_uncond, generator, drop="1-p")


def step_frozen_prompt_model(model, images, captions, p_uncond=0.1, generator=None):
    return _training_step(model, images, captions, p_uncond, generator, context_grad=False)


def step_against_z0(model, images, captions, p_uncond=0.1, generator=None):
    return _training_step(model, images, captions, p_uncond, generator, target="z0")


# lesson 11 ---------------------------------------------------------------
def timesteps_t_minus_T_over_n(num_timesteps, steps):
    timesteps = ddim.ddim_timesteps(num_timesteps, steps, spacing="trailing")
    return timesteps, timesteps - num_timesteps // steps  # the diffusers pitfall


def timesteps_repeat_last(num_timesteps, steps):
    timesteps = ddim.ddim_timesteps(num_timesteps, steps, spacing="trailing")
    return timesteps, torch.cat([timesteps[1:], timesteps[-1:]])


def timesteps_stop_at_zero(num_timesteps, steps):
    timesteps = ddim.ddim_timesteps(num_timesteps, steps, spacing="trailing")
    return timesteps, torch.cat([timesteps[1:], torch.tensor([0])])


def timesteps_leading(num_timesteps, steps):
    timesteps = ddim.ddim_timesteps(num_timesteps, steps, spacing="leading", offset=0)
    return timesteps, torch.cat([timesteps[1:], torch.tensor([-1])])


def timesteps_linspace(num_timesteps, steps):
    timesteps = torch.linspace(num_timesteps - 1, 0, steps).round().long()
    return timesteps, torch.cat([timesteps[1:], torch.tensor([-1])])


def _ddim(schedule, x_t, eps, t, t_prev, eta=0.0, noise=None, wrap=False, keep_sigma=False, short_sigma=False,
          skip_noise=False):
    abar = schedule.alphas_cumprod
    a = float(abar[t])
    a_prev = float(abar[t_prev]) if (wrap or t_prev >= 0) else 1.0
    x0 = (x_t - math.sqrt(1 - a) * eps) / math.sqrt(a)
    sigma = 0.0
    if eta > 0:
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a))
        if not short_sigma:
            sigma *= math.sqrt(1 - a / a_prev)
    direction = math.sqrt(1 - a_prev) if keep_sigma else math.sqrt(max(0.0, 1 - a_prev - sigma**2))
    x_prev = math.sqrt(a_prev) * x0 + direction * eps
    if sigma > 0 and not skip_noise:
        x_prev = x_prev + sigma * noise
    return x_prev, x0


def ddim_sigma_not_subtracted(schedule, x_t, eps, t, t_prev, eta=0.0, noise=None):
    return _ddim(schedule, x_t, eps, t, t_prev, eta, noise, keep_sigma=True)


def ddim_negative_index(schedule, x_t, eps, t, t_prev, eta=0.0, noise=None):
    return _ddim(schedule, x_t, eps, t, t_prev, eta, noise, wrap=True)  # alphas_cumprod[-1] for t_prev = -1


def ddim_sigma_one_factor(schedule, x_t, eps, t, t_prev, eta=0.0, noise=None):
    return _ddim(schedule, x_t, eps, t, t_prev, eta, noise, short_sigma=True)


def ddim_forgets_noise(schedule, x_t, eps, t, t_prev, eta=0.0, noise=None):
    return _ddim(schedule, x_t, eps, t, t_prev, eta, noise, skip_noise=True)


# lesson 12 ---------------------------------------------------------------
def drop_one_minus_p(tokens, empty_tokens, p=0.1, generator=None):
    return drop_tokens(tokens, empty_tokens, 1 - p, generator)


def drop_per_token(tokens, empty_tokens, p=0.1, generator=None):
    drop = torch.rand(tokens.shape, generator=generator) < p
    return torch.where(drop, empty_tokens.expand_as(tokens), tokens)


def drop_in_place(tokens, empty_tokens, p=0.1, generator=None):
    drop = torch.rand(tokens.shape[0], generator=generator) < p
    tokens[drop] = empty_tokens
    return tokens


def drop_to_zeros(tokens, empty_tokens, p=0.1, generator=None):
    drop = torch.rand(tokens.shape[0], generator=generator) < p
    return torch.where(drop[:, None], torch.zeros_like(tokens), tokens)  # forgets the start token


def guidance_sign_flipped(eps_u, eps_c, scale):
    return eps_c + scale * (eps_u - eps_c)


def guidance_eq6_with_s(eps_u, eps_c, scale):
    return (scale + 1) * eps_c - scale * eps_u  # BoLID's eq. 6 read with w = s


def guidance_missing_minus(eps_u, eps_c, scale):
    return eps_u + scale * eps_c


WRONG = [
    ("07_ddpm_forward", "beta_schedule", betas_compvis_linear),
    ("07_ddpm_forward", "beta_schedule", betas_float32),
    ("07_ddpm_forward", "beta_schedule", betas_cosine_unclipped),
    ("07_ddpm_forward", "beta_schedule", betas_ignore_arguments),
    ("07_ddpm_forward", "alphas_cumprod", abar_first_order),
    ("07_ddpm_forward", "alphas_cumprod", abar_prev),
    ("07_ddpm_forward", "q_sample", q_sample_slide),
    ("07_ddpm_forward", "q_sample", q_sample_no_sqrt_signal),
    ("07_ddpm_forward", "q_sample", q_sample_off_by_one),
    ("07_ddpm_forward", "q_sample", q_sample_first_t),
    ("07_ddpm_forward", "q_sample", q_sample_4d_only),
    ("07_ddpm_forward", "q_sample", q_sample_float64),
    ("07_ddpm_forward", "q_posterior", posterior_slide),
    ("07_ddpm_forward", "q_posterior", posterior_wraparound),
    ("07_ddpm_forward", "q_posterior", posterior_variance_beta),
    ("08_ddpm_training", "predict_x0", x0_slide),
    ("08_ddpm_training", "predict_x0", x0_no_sqrt),
    ("08_ddpm_training", "predict_x0", x0_divide_by_abar),
    ("08_ddpm_training", "ddpm_loss", loss_against_x0),
    ("08_ddpm_training", "ddpm_loss", loss_t_one_to_T),
    ("08_ddpm_training", "ddpm_loss", loss_never_last_t),
    ("08_ddpm_training", "ddpm_loss", loss_one_t_per_batch),
    ("08_ddpm_training", "ddpm_loss", loss_uniform_noise),
    ("08_ddpm_training", "ddpm_loss", loss_slide_q_sample),
    ("08_ddpm_training", "ddpm_loss", loss_sum),
    ("08_ddpm_training", "ddpm_loss", loss_item),
    ("08_ddpm_training", "p_sample_step", p_sample_noise_at_zero),
    ("08_ddpm_training", "p_sample_step", p_sample_variance_not_sqrt),
    ("08_ddpm_training", "p_sample_step", p_sample_beta_variance),
    ("08_ddpm_training", "p_sample_step", p_sample_mean_missing_sqrt),
    ("09_unet_cross_attention", "timestep_embedding", embedding_linear_freqs),
    ("09_unet_cross_attention", "timestep_embedding", embedding_half_minus_one),
    ("09_unet_cross_attention", "timestep_embedding", embedding_sin_first),
    ("09_unet_cross_attention", "timestep_embedding", embedding_interleaved),
    ("09_unet_cross_attention", "cross_attention", cross_softmax_over_queries),
    ("09_unet_cross_attention", "cross_attention", cross_no_scaling),
    ("09_unet_cross_attention", "cross_attention", cross_scale_by_inner),
    ("09_unet_cross_attention", "cross_attention", cross_keys_from_x),
    ("09_unet_cross_attention", "cross_attention", cross_ignores_mask),
    ("10_latent_diffusion", "training_step", step_forgets_scale),
    ("10_latent_diffusion", "training_step", step_divides_by_scale),
    ("10_latent_diffusion", "training_step", step_no_prompt_dropping),
    ("10_latent_diffusion", "training_step", step_drops_with_one_minus_p),
    ("10_latent_diffusion", "training_step", step_frozen_prompt_model),
    ("10_latent_diffusion", "training_step", step_against_z0),
    ("11_ddim", "ddim_timesteps", timesteps_t_minus_T_over_n),
    ("11_ddim", "ddim_timesteps", timesteps_repeat_last),
    ("11_ddim", "ddim_timesteps", timesteps_stop_at_zero),
    ("11_ddim", "ddim_timesteps", timesteps_leading),
    ("11_ddim", "ddim_timesteps", timesteps_linspace),
    ("11_ddim", "ddim_step", ddim_sigma_not_subtracted),
    ("11_ddim", "ddim_step", ddim_negative_index),
    ("11_ddim", "ddim_step", ddim_sigma_one_factor),
    ("11_ddim", "ddim_step", ddim_forgets_noise),
    ("12_classifier_free_guidance", "drop_prompt", drop_one_minus_p),
    ("12_classifier_free_guidance", "drop_prompt", drop_per_token),
    ("12_classifier_free_guidance", "drop_prompt", drop_in_place),
    ("12_classifier_free_guidance", "drop_prompt", drop_to_zeros),
    ("12_classifier_free_guidance", "guided_eps", guidance_sign_flipped),
    ("12_classifier_free_guidance", "guided_eps", guidance_eq6_with_s),
    ("12_classifier_free_guidance", "guided_eps", guidance_missing_minus),
]


@pytest.mark.parametrize("name, exercise, wrong", WRONG, ids=[w[2].__name__ for w in WRONG])
def test_wrong_version_fails(name, exercise, wrong):
    assert failed(name, only=exercise, **{exercise: wrong}), f"{wrong.__name__} passed every {exercise} check"


# ---------------------------------------------------------------------------------------------------------
# Right answers written differently (float32 arithmetic, another draw order, another spelling of the formula):
# the graders must accept them.
# ---------------------------------------------------------------------------------------------------------
def abar_via_logs(betas):
    return torch.exp(torch.cumsum(torch.log1p(-betas), dim=0))


def q_sample_float32_first(abar, x0, t, eps):
    a = abar.float()[t].view(-1, *[1] * (x0.ndim - 1))
    return a.sqrt() * x0 + (1 - a).sqrt() * eps


def posterior_float32_first(betas, abar, x0, x_t, t):
    betas, abar = betas.float(), abar.float()
    abar_prev = torch.cat([torch.ones(1), abar[:-1]])
    shape = (-1, *[1] * (x_t.ndim - 1))
    a, a_prev, b = abar[t].view(shape), abar_prev[t].view(shape), betas[t].view(shape)
    mean = a_prev.sqrt() * b / (1 - a) * x0 + (1 - b).sqrt() * (1 - a_prev) / (1 - a) * x_t
    return mean, (1 - a_prev) * b / (1 - a)


def x0_float32_first(schedule, x_t, t, eps):
    a = schedule.alphas_cumprod.float()[t].view(-1, *[1] * (x_t.ndim - 1))
    return (x_t - (1 - a).sqrt() * eps) / a.sqrt()


def loss_eps_first(model_fn, schedule, x0, generator=None):
    eps = torch.randn(x0.shape, generator=generator)
    t = torch.randint(0, schedule.num_timesteps, (x0.shape[0],), generator=generator)
    a = schedule.alphas_cumprod.float()[t].view(-1, *[1] * (x0.ndim - 1))
    return F.mse_loss(model_fn(a.sqrt() * x0 + (1 - a).sqrt() * eps, t), eps)


def p_sample_float32_first(schedule, x_t, t, eps, noise):
    shape = (-1, *[1] * (x_t.ndim - 1))
    b = schedule.betas.float()[t].view(shape)
    a = schedule.alphas_cumprod.float()[t].view(shape)
    a_prev = schedule.alphas_cumprod_prev.float()[t].view(shape)
    mean = (x_t - b / (1 - a).sqrt() * eps) / (1 - b).sqrt()
    return mean + ((1 - a_prev) * b / (1 - a)).sqrt() * noise


def embedding_float64(t, dim, max_period=10000.0):
    half = dim // 2
    freqs = max_period ** (-torch.arange(half, dtype=torch.float64) / half)
    args = t.double()[:, None] * freqs
    return torch.cat([args.cos(), args.sin()], dim=1).float()


def cross_attention_plain_torch(x, context, w_q, w_k, w_v, heads, mask=None):
    B, N, _ = x.shape
    d = w_q.shape[1] // heads
    q = (x @ w_q).view(B, N, heads, d).transpose(1, 2)
    k = (context @ w_k).view(B, -1, heads, d).transpose(1, 2)
    v = (context @ w_v).view(B, -1, heads, d).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return (probs @ v).transpose(1, 2).reshape(B, N, heads * d), probs


def step_with_own_q_sample(model, images, captions, p_uncond=0.1, generator=None):
    with torch.no_grad():
        z0 = model.autoencoder.encode(images) * model.autoencoder.scale_factor
    tokens = model.tokenizer.encode(captions)
    drop = torch.rand(len(captions), generator=generator) < p_uncond
    tokens = tokens.clone()
    tokens[drop] = model.tokenizer.encode([""])[0]
    context, mask = model.text_encoder(tokens)
    t = torch.randint(0, model.schedule.num_timesteps, (len(captions),), generator=generator)
    eps = torch.randn(z0.shape, generator=generator)
    a = model.schedule.alphas_cumprod.float()[t][:, None, None, None]
    return F.mse_loss(model.unet(a.sqrt() * z0 + (1 - a).sqrt() * eps, t, context, mask), eps)


def timesteps_python_round(num_timesteps, steps):
    timesteps = torch.tensor([round(k * num_timesteps / steps) - 1 for k in range(steps, 0, -1)])
    return timesteps, torch.tensor(timesteps.tolist()[1:] + [-1])


def ddim_float32_tensors(schedule, x_t, eps, t, t_prev, eta=0.0, noise=None):
    abar = torch.cat([schedule.alphas_cumprod.float(), torch.ones(1)])  # index -1 -> the appended 1
    a, a_prev = abar[t], abar[t_prev]
    x0 = (x_t - (1 - a).sqrt() * eps) / a.sqrt()
    sigma = eta * ((1 - a_prev) / (1 - a)).sqrt() * (1 - a / a_prev).sqrt()
    x_prev = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps
    return (x_prev + sigma * noise if eta > 0 and t_prev >= 0 else x_prev), x0


def drop_with_index_assignment(tokens, empty_tokens, p=0.1, generator=None):
    out = tokens.clone()
    out[torch.rand(tokens.shape[0], generator=generator) < p] = empty_tokens[0]
    return out


def guidance_ip_adapter_form(eps_u, eps_c, scale):
    return scale * eps_c + (1 - scale) * eps_u  # IP-Adapter's spelling, w = s


RIGHT = [
    ("07_ddpm_forward", "alphas_cumprod", abar_via_logs),
    ("07_ddpm_forward", "q_sample", q_sample_float32_first),
    ("07_ddpm_forward", "q_posterior", posterior_float32_first),
    ("08_ddpm_training", "predict_x0", x0_float32_first),
    ("08_ddpm_training", "ddpm_loss", loss_eps_first),
    ("08_ddpm_training", "p_sample_step", p_sample_float32_first),
    ("09_unet_cross_attention", "timestep_embedding", embedding_float64),
    ("09_unet_cross_attention", "cross_attention", cross_attention_plain_torch),
    ("10_latent_diffusion", "training_step", step_with_own_q_sample),
    ("11_ddim", "ddim_timesteps", timesteps_python_round),
    ("11_ddim", "ddim_step", ddim_float32_tensors),
    ("12_classifier_free_guidance", "drop_prompt", drop_with_index_assignment),
    ("12_classifier_free_guidance", "guided_eps", guidance_ip_adapter_form),
]


@pytest.mark.parametrize("name, exercise, right", RIGHT, ids=[r[2].__name__ for r in RIGHT])
def test_right_answer_written_differently_passes(name, exercise, right):
    assert not failed(name, only=exercise, **{exercise: right})


def test_every_exercise_has_two_wrong_versions():
    assert_two_wrong_versions_each(WRONG, NAMES)


def test_reference_embedding_is_the_unet_one():
    """Sanity: the wrong-version helper with default arguments is the library's embedding (so the variants differ
    from it only where they say)."""
    t = torch.tensor([0, 3, 999])
    assert torch.allclose(_embedding(t, 32), timestep_embedding(t, 32), atol=1e-5)
