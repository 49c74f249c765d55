"""Wrong versions from an audit of every grader against five classes of mistake that used to get through:

1. changing the caller's tensors in place;
2. hyperparameters only at values where a wrong formula coincides with the right one (alpha / r a whole number,
   only the default betas, one T);
3. randomness from torch's global RNG instead of the generator given;
4. tolerances or inputs that hide a wrong token or a missing mask;
5. inputs the docstring allows but no check used (digits and hyphens in captions, far keypoints whose weights
   underflow, float64 inputs, a gradient the function must pass on).

Classes 1 and 3 are enforced for every function exercise by lessons.grading.Recorder; the rest by the lessons'
own checks. Each wrong version below must fail at least one check of its exercise, and the graders' messages
for the type-only and contract failures must say what is wrong.
"""
from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

from lesson_helpers import failed, grader
from lessons.grading import grade, is_stub

# ---------------------------------------------------------------- class 1: in place
def hinge_d_in_place(logits_real, logits_fake):
    return logits_real.neg_().add_(1).clamp_(min=0).mean() + logits_fake.add_(1).clamp_(min=0).mean()


def latent_scale_centres_in_place(z):
    z -= z.mean()
    return 1 / z.std()


def attention_masks_scores_in_place(q, k, v, mask=None):
    if mask is not None:
        k.masked_fill_(~mask[:, None, :, None], 0.0)  # "zero the padded keys" (and the caller's k with them)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    probs = torch.nan_to_num(scores.softmax(dim=-1))
    return probs @ v


def q_sample_in_place(alphas_cumprod, x0, t, eps):
    a = alphas_cumprod[t].sqrt().float().view(-1, *[1] * (x0.dim() - 1))
    b = (1 - alphas_cumprod[t]).sqrt().float().view(-1, *[1] * (x0.dim() - 1))
    return x0.mul_(a).add_(b * eps)


def guided_eps_in_place(eps_u, eps_c, scale):
    return eps_u.add_(scale * (eps_c - eps_u))


def frechet_in_place(mu1, sigma1, mu2, sigma2):
    import numpy as np
    from scipy import linalg

    sigma1 += 1e-6 * torch.eye(sigma1.shape[0], dtype=sigma1.dtype)  # "for stability", on the caller's matrix
    s1, s2 = sigma1.double().numpy(), sigma2.double().numpy()
    covmean = linalg.sqrtm(s1 @ s2).real
    diff = (mu1 - mu2).double().numpy()
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def reparameterize_in_place(mu, logvar, eps):
    return mu.add_(logvar.mul(0.5).exp() * eps)


# ---------------------------------------------------------------- class 2: coincidences
class LoRAIntegerRatio(torch.nn.Module):
    """alpha // r: right whenever alpha / r is a whole number."""

    def __init__(self, base, rank, alpha=None):
        super().__init__()
        self.base, self.rank, self.alpha, self.scale, self.merged = base, rank, alpha or rank, 1.0, False
        base.requires_grad_(False)
        self.lora_A = torch.nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = torch.nn.Linear(rank, base.out_features, bias=False)
        torch.nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        torch.nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):
        y = self.base(x)
        if self.merged:
            return y
        return y + (self.alpha // self.rank) * self.scale * self.lora_B(self.lora_A(x))


def merge_integer_ratio(layer):
    with torch.no_grad():
        layer.base.weight += (layer.alpha // layer.rank) * layer.scale * layer.lora_B.weight @ layer.lora_A.weight
    layer.merged = True


def betas_scaled_linear_defaults_only(kind, num_timesteps, beta_start=None, beta_end=None):
    from minildm.diffusion.schedule import beta_schedule

    if kind == "scaled_linear":
        return beta_schedule(kind, num_timesteps)  # forgets the arguments for this kind
    return beta_schedule(kind, num_timesteps, beta_start, beta_end)


# ---------------------------------------------------------------- class 3: global RNG
def drop_prompt_global_rng(tokens, empty_tokens, p=0.1, generator=None):
    drop = torch.rand(tokens.shape[0]) < p
    return torch.where(drop[:, None], empty_tokens.expand_as(tokens), tokens)


def ddpm_loss_global_noise(model_fn, schedule, x0, generator=None):
    t = torch.randint(0, schedule.num_timesteps, (x0.shape[0],), generator=generator)
    eps = torch.randn_like(x0)  # randn_like has no generator argument: the global RNG
    return (model_fn(schedule.q_sample(x0, t, eps), t) - eps).pow(2).mean()


def training_step_global_rng(model, images, captions, p_uncond=0.1, generator=None):
    from minildm.diffusion.ddpm import diffusion_loss
    from minildm.diffusion.guidance import drop_tokens

    with torch.no_grad():
        z0 = model.autoencoder.encode(images) * model.autoencoder.scale_factor
    tokens = drop_tokens(model.tokenizer.encode(captions), model.tokenizer.encode([""]), p_uncond, generator)
    context, mask = model.text_encoder(tokens)
    t = torch.randint(0, model.schedule.num_timesteps, (len(captions),), generator=generator)
    eps = torch.randn(z0.shape)  # forgot the generator
    return diffusion_loss(lambda z_t, t_: model.unet(z_t, t_, context, mask), model.schedule, z0, t=t, eps=eps)


# ---------------------------------------------------------------- class 4/5: unexercised inputs
def encode_digits_are_words(caption, words, max_len):
    table = {w: i for i, w in enumerate(words)}
    ids = [2] + [table.get(w, 1) for w in re.findall(r"[a-z0-9]+", caption.lower())]
    row = torch.zeros(max_len, dtype=torch.long)
    ids = ids[:max_len]
    row[: len(ids)] = torch.tensor(ids)
    return row


def encode_split_on_spaces(caption, words, max_len):
    table = {w: i for i, w in enumerate(words)}
    ids = [2] + [table.get(w.strip(".,!?"), 1) for w in caption.lower().split()]
    row = torch.zeros(max_len, dtype=torch.long)
    ids = ids[:max_len]
    row[: len(ids)] = torch.tensor(ids)
    return row


def hinge_d_float64(logits_real, logits_fake):
    return F.relu(1 - logits_real.double()).mean() + F.relu(1 + logits_fake.double()).mean()


def keypoints_normalise_without_guard(keypoints, visible, height, width, sigma):
    """W / max W without the all-zero case: far keypoints whose Gaussians underflow give 0 / 0 = NaN."""
    ys = torch.arange(height, dtype=keypoints.dtype)[:, None]
    xs = torch.arange(width, dtype=keypoints.dtype)[None, :]
    dx = xs - keypoints[..., 0, None, None]
    dy = ys - keypoints[..., 1, None, None]
    w = torch.exp(-(dx**2 + dy**2) / (2 * sigma**2)) * visible[..., None, None]
    W = w.amax(dim=-3)
    W_max = W.amax(dim=(-2, -1), keepdim=True)
    if not visible.any():
        return torch.ones_like(W)
    return torch.where(visible.any(dim=-1)[..., None, None], W / W_max, torch.ones_like(W))


def keypoints_float32_grid(keypoints, visible, height, width, sigma):
    from minildm.adapters.body_vae import gaussian_keypoint_weights

    return gaussian_keypoint_weights(keypoints.float(), visible, height, width, sigma)  # loses float64


def kl_float32(mu, logvar):
    from minildm.adapters.body_vae import kl_divergence

    return kl_divergence(mu.float(), logvar.float())


WRONG = [
    # class 1
    ("02_gans", "hinge_d_loss", hinge_d_in_place),
    ("05_autoencoder", "latent_scale", latent_scale_centres_in_place),
    ("06_prompt_model", "attention", attention_masks_scores_in_place),
    ("07_ddpm_forward", "q_sample", q_sample_in_place),
    ("12_classifier_free_guidance", "guided_eps", guided_eps_in_place),
    ("16_beyond", "frechet_distance", frechet_in_place),
    ("15_body_vae", "reparameterize", reparameterize_in_place),
    # class 2
    ("13_lora", "LoRALinear", LoRAIntegerRatio),
    ("13_lora", "merge", merge_integer_ratio),
    ("07_ddpm_forward", "beta_schedule", betas_scaled_linear_defaults_only),
    # class 3
    ("12_classifier_free_guidance", "drop_prompt", drop_prompt_global_rng),
    ("08_ddpm_training", "ddpm_loss", ddpm_loss_global_noise),
    ("10_latent_diffusion", "training_step", training_step_global_rng),
    # classes 4 and 5
    ("01_conditional_generation", "encode_caption", encode_digits_are_words),
    ("01_conditional_generation", "encode_caption", encode_split_on_spaces),
    ("02_gans", "hinge_d_loss", hinge_d_float64),
    ("15_body_vae", "gaussian_keypoint_weights", keypoints_normalise_without_guard),
    ("15_body_vae", "gaussian_keypoint_weights", keypoints_float32_grid),
    ("15_body_vae", "kl_divergence", kl_float32),
]


@pytest.mark.parametrize("name, exercise, wrong", WRONG, ids=[w.__name__ for _, _, w in WRONG])
def test_audited_wrong_version_fails(name, exercise, wrong):
    if name == "16_beyond":
        pytest.importorskip("scipy", reason="the wrong version uses scipy's sqrtm")
    assert failed(name, only=exercise, **{exercise: wrong}), f"{wrong.__name__} passes every check of {exercise}"


def _messages(name, exercise, wrong, verbose=False):
    checks = [c for c in grader(name).CHECKS if c.exercise == exercise]
    return [m for ok, m in grade(checks, {**grader(name).REFERENCE, exercise: wrong}, verbose).values() if not ok]


def test_in_place_and_global_rng_say_so():
    assert any("changed in place" in m for m in _messages("12_classifier_free_guidance", "guided_eps",
                                                          guided_eps_in_place))
    assert any("global RNG" in m for m in _messages("12_classifier_free_guidance", "drop_prompt",
                                                    drop_prompt_global_rng))


def test_a_dtype_only_mistake_gets_a_type_hint_and_verbose_shows_the_input():
    messages = _messages("02_gans", "hinge_d_loss", hinge_d_float64, verbose=True)
    assert messages and all("dtype" in m for m in messages), messages
    assert any("last call: hinge_d_loss(tensor(" in m for m in messages), messages


def finished_but_refuses_some_input(kind, num_timesteps, beta_start=None, beta_end=None):
    from minildm.diffusion.schedule import beta_schedule

    if kind not in ("linear", "scaled_linear", "cosine"):
        raise NotImplementedError(f"unknown schedule {kind}")
    return beta_schedule(kind, num_timesteps, beta_start, beta_end)


def test_is_stub_only_for_an_untouched_todo():
    from lesson_helpers import stubs

    assert is_stub(stubs("07_ddpm_forward").beta_schedule)
    assert not is_stub(finished_but_refuses_some_input)
    assert is_stub(stubs("13_lora").LoRALinear)


# ---------------------------------------------------------------- more, found in the audit of the remaining lessons
def training_step_without_mask(model, images, captions, p_uncond=0.1, generator=None):
    """The prompt's padding mask is not passed on: the UNet attends to <pad> tokens."""
    from minildm.diffusion.ddpm import diffusion_loss
    from minildm.diffusion.guidance import drop_tokens

    with torch.no_grad():
        z0 = model.autoencoder.encode(images) * model.autoencoder.scale_factor
    tokens = drop_tokens(model.tokenizer.encode(captions), model.tokenizer.encode([""]), p_uncond, generator)
    context, _ = model.text_encoder(tokens)
    t = torch.randint(0, model.schedule.num_timesteps, (len(captions),), generator=generator)
    eps = torch.randn(z0.shape, generator=generator)
    return diffusion_loss(lambda z_t, t_: model.unet(z_t, t_, context, None), model.schedule, z0, t=t, eps=eps)


def ddim_step_float64(schedule, x_t, eps, t, t_prev, eta=0.0, noise=None):
    from minildm.diffusion.ddim import ddim_step

    x_prev, x0 = ddim_step(schedule, x_t.double(), eps.double(), t, t_prev, eta,
                           None if noise is None else noise.double())
    return x_prev, x0  # float64 for float32 latents


MORE_WRONG = [
    ("10_latent_diffusion", "training_step", training_step_without_mask),
    ("11_ddim", "ddim_step", ddim_step_float64),
]


@pytest.mark.parametrize("name, exercise, wrong", MORE_WRONG, ids=[w.__name__ for _, _, w in MORE_WRONG])
def test_more_audited_wrong_versions_fail(name, exercise, wrong):
    assert failed(name, only=exercise, **{exercise: wrong}), f"{wrong.__name__} passes every check of {exercise}"


def test_a_dtype_assertion_of_a_check_gets_the_type_hint():
    messages = _messages("11_ddim", "ddim_step", ddim_step_float64)
    assert messages and all("type is not" in m and "float64" in m for m in messages), messages


def clip_scale_as_float(image_emb, text_emb, logit_scale):
    """exp(float(s)): right values, but CLIP's learnt temperature gets no gradient."""
    image_emb, text_emb = F.normalize(image_emb, dim=-1), F.normalize(text_emb, dim=-1)
    logits = math.exp(float(logit_scale)) * image_emb @ text_emb.T
    labels = torch.arange(len(logits))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")
def test_a_gradient_the_function_must_pass_on():
    assert failed("04_clip", only="clip_loss", clip_loss=clip_scale_as_float) == {"clip_loss #6"}


def straight_through_overwrites_z_e(z_e, z_q):
    """Copy z_q's values into z_e (gradient still the identity to z_e): the caller's encoder output is lost."""
    z_e.data.copy_(z_q.data)
    return z_e


def embedding_float64(t, dim, max_period=10000.0):
    from minildm.modules.unet import timestep_embedding

    return timestep_embedding(t, dim, max_period).double()


def decoupled_zeroes_padding_in_place(x, text, text_mask, image_tokens, w, heads, ip_lambda):
    """'Zero the padded text tokens' on the caller's tensor, instead of masking them."""
    import importlib.util

    from lessons.grading import ROOT

    if text_mask is not None:
        text.masked_fill_(~text_mask[..., None], 0.0)
    spec = importlib.util.spec_from_file_location("grade14", ROOT / "lessons" / "14_ip_adapter" / "grade.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.reference(x, text, None, image_tokens, w, heads, ip_lambda)


LAST_WRONG = [
    ("03_image_tokens", "straight_through", straight_through_overwrites_z_e),
    ("09_unet_cross_attention", "timestep_embedding", embedding_float64),
    ("14_ip_adapter", "decoupled_cross_attention", decoupled_zeroes_padding_in_place),
]


@pytest.mark.parametrize("name, exercise, wrong", LAST_WRONG, ids=[w.__name__ for _, _, w in LAST_WRONG])
def test_last_audited_wrong_versions_fail(name, exercise, wrong):
    assert failed(name, only=exercise, **{exercise: wrong}), f"{wrong.__name__} passes every check of {exercise}"
