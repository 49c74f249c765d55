"""Grade lesson 10: python lessons/10_latent_diffusion/grade.py  (add -v to see what differed).

The checks build a small LatentDiffusion with random weights (the numbers do not need a trained model) and
wrap its UNet and prompt encoder in spies that record what they are given. The reference composes the
library's pieces in the order of minildm/train/ldm.py's training loop (the library has no separate
training_step function): drop_tokens, the prompt encoder, t and eps, diffusion_loss.
"""
from __future__ import annotations

import inspect
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from lessons.grading import Check, main  # noqa: E402
from minildm.autoencoder.vqvae import VQVAE  # noqa: E402
from minildm.config import micro  # noqa: E402
from minildm.data import shapes  # noqa: E402
from minildm.diffusion.ddpm import diffusion_loss  # noqa: E402
from minildm.diffusion.guidance import drop_tokens  # noqa: E402
from minildm.diffusion.schedule import NoiseSchedule, gather_at  # noqa: E402
from minildm.modules.unet import UNet  # noqa: E402
from minildm.pipeline import LatentDiffusion  # noqa: E402
from minildm.text.encoder import PromptEncoder, TextEncoderConfig  # noqa: E402
from minildm.train.ldm import build_tokenizer  # noqa: E402


def reference_training_step(model, images, captions, p_uncond=0.1, generator=None):
    with torch.no_grad():
        z0 = model.autoencoder.encode(images) * model.autoencoder.scale_factor  # z_0 = s E(x)
    tokens = drop_tokens(model.tokenizer.encode(captions), model.tokenizer.encode([""]), p_uncond, generator)
    context, mask = model.text_encoder(tokens)  # tau_theta(y), with gradients
    t = torch.randint(0, model.schedule.num_timesteps, (len(captions),), generator=generator)
    eps = torch.randn(z0.shape, generator=generator)
    return diffusion_loss(lambda z_t, t_: model.unet(z_t, t_, context, mask), model.schedule, z0, t=t, eps=eps)


REFERENCE = {"training_step": reference_training_step}

SCALE = 4.0  # a scale factor far from 1, so forgetting it shows


class Spy(nn.Module):
    """Wraps the UNet or the prompt encoder and records the (detached) inputs of every call."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.calls = inner, []

    def forward(self, *args, **kwargs):
        bound = inspect.signature(self.inner.forward).bind(*args, **kwargs)  # positional or by keyword alike
        self.calls.append([a.detach().clone() if torch.is_tensor(a) else a for a in bound.arguments.values()])
        return self.inner(*args, **kwargs)


def make_model() -> LatentDiffusion:
    """A micro LatentDiffusion with random weights; zero-initialised layers get small random values so that
    the prompt and the input both change the UNet's output."""
    torch.manual_seed(0)
    preset = micro()
    autoencoder = VQVAE(preset.vq).eval().requires_grad_(False)
    autoencoder.scale_factor.fill_(SCALE)
    tokenizer = build_tokenizer([], preset.text.max_len)
    text_encoder = PromptEncoder(TextEncoderConfig(**{**asdict(preset.text), "vocab_size": tokenizer.vocab_size}))
    unet = UNet(preset.unet)
    with torch.no_grad():
        for p in unet.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    model = LatentDiffusion(autoencoder, tokenizer, text_encoder, unet, NoiseSchedule(1000, "linear"), preset.image_size)
    model.unet, model.text_encoder = Spy(model.unet), Spy(model.text_encoder)
    return model


def batch(n: int, seed: int, size: int = 32):
    return shapes.sample_batch(n, torch.Generator().manual_seed(seed), split="all", size=size)


def check_replay(fn):
    images, captions = batch(8, seed=1)
    model = make_model()
    mine = fn(model, images, captions, 0.25, torch.Generator().manual_seed(2))
    ref = reference_training_step(make_model(), images, captions, 0.25, torch.Generator().manual_seed(2))
    assert torch.is_tensor(mine) and mine.ndim == 0, "return the loss as a scalar tensor"
    assert torch.allclose(mine.detach(), ref.detach(), rtol=1e-4, atol=1e-6), \
        f"loss {mine.item():.6f}, expected {ref.item():.6f}"


def check_latents(fn):
    images, captions = batch(64, seed=3)
    model = make_model()
    fn(model, images, captions, 0.0, torch.Generator().manual_seed(4))
    assert len(model.unet.calls) == 1, f"the UNet was called {len(model.unet.calls)} times, expected once"
    z_t, t = model.unet.calls[0][:2]
    T = model.schedule.num_timesteps
    assert t.dtype == torch.long and t.shape == (64,) and 0 <= int(t.min()) and int(t.max()) < T, \
        f"t must be a LongTensor [B] in 0..{T - 1}"
    with torch.no_grad():
        z0 = model.autoencoder.encode(images) * SCALE
    assert z_t.shape == z0.shape, f"the UNet got {tuple(z_t.shape)}, expected latents {tuple(z0.shape)}"
    mask = model.unet.calls[0][3] if len(model.unet.calls[0]) > 3 else None
    expected_mask = model.tokenizer.encode(captions) != 0
    assert mask is not None and torch.equal(mask, expected_mask), (
        "the UNet must get the prompt encoder's padding mask with the context, so that no pixel attends to <pad>")
    s = model.schedule
    eps = (z_t - gather_at(s.sqrt_alphas_cumprod, t, z_t) * z0) / gather_at(s.sqrt_one_minus_alphas_cumprod, t, z_t)
    assert abs(eps.mean().item()) < 0.1 and abs(eps.std().item() - 1) < 0.1, (
        f"the noise implied by z_t has mean {eps.mean():.3f} and std {eps.std():.3f}; expected 0 and 1")


def check_prompt_dropping(fn):
    images, captions = batch(8, seed=5, size=16)  # small images: only the captions matter here
    images, captions = images.repeat(50, 1, 1, 1), captions * 50  # 400 captions
    tokens, empty = make_model().tokenizer.encode(captions), make_model().tokenizer.encode([""])[0]
    for p, low, high in ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), (0.1, 0.04, 0.17)):
        model = make_model()
        with torch.no_grad():
            fn(model, images, captions, p, torch.Generator().manual_seed(6))
        assert model.text_encoder.calls, "the prompt encoder was never called"
        seen = torch.cat([call[0] for call in model.text_encoder.calls])  # one call per batch or per caption
        assert seen.shape == tokens.shape, f"prompt encoder got tokens {tuple(seen.shape)}, expected {tuple(tokens.shape)}"
        is_empty, is_caption = (seen == empty).all(dim=1), (seen == tokens).all(dim=1)
        assert (is_empty | is_caption).all(), "every row must be either its caption or the whole empty prompt"
        frac = is_empty.float().mean().item()
        assert low <= frac <= high, f"p_uncond = {p}: {frac:.2f} of the captions were dropped"


def check_gradients(fn):
    images, captions = batch(8, seed=7)
    model = make_model()
    loss = fn(model, images, captions, 0.0, torch.Generator().manual_seed(8))
    assert torch.is_tensor(loss) and loss.requires_grad, "the loss must be a differentiable tensor"
    loss.backward()
    for part in ("unet", "text_encoder"):
        grads = [p.grad for p in getattr(model, part).parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), f"no gradient reached model.{part}"


CHECKS = [
    Check("training_step", check_replay,
          "follow the recipe in order: encode and scale, drop prompts, encode prompts, draw t then eps, noise "
          "(Property 1), regress the noise."),
    Check("training_step", check_latents,
          "the UNet must see z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps with z_0 = scale_factor * E(x): the "
          "diffusion model lives in the scaled latent space, t in 0..T-1; it also gets the context AND its "
          "padding mask from the prompt encoder."),
    Check("training_step", check_prompt_dropping,
          "classifier-free guidance training: each whole caption becomes the empty prompt with probability "
          "p_uncond (one coin per caption, kept when the coin is not below p)."),
    Check("training_step", check_gradients,
          "the prompt model is trained jointly with the UNet: do not encode the prompts under no_grad or detach "
          "the context."),
]

if __name__ == "__main__":
    sys.exit(main(CHECKS, __file__))
