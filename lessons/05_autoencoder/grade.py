"""Grader of lesson 05: python lessons/05_autoencoder/grade.py  (add -v for details).

adaptive_weight is compared with minildm/autoencoder/losses.py on gradients of known norms, a vanishing GAN
gradient, two losses that share one graph (as in real training) and the clamp. latent_scale is compared
with VQVAE.compute_scale_factor on latents with a large mean, channels of different spread, and the
latents of a real (small, untrained) VQ-VAE encoder. REFERENCE holds the library's solutions in the
exercises' signatures (lesson.py falls back to them; tests/test_lessons_graders.py checks that they pass).
"""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lessons.grading import Check, main  # noqa: E402
from minildm.autoencoder import losses  # noqa: E402
from minildm.autoencoder.vqvae import VQConfig, VQVAE  # noqa: E402
from minildm.data import shapes  # noqa: E402


def _as_number(value, what: str) -> torch.Tensor:
    value = torch.as_tensor(value)
    assert value.numel() == 1, f"{what}: expected one number (a 0-dim tensor), got shape {tuple(value.shape)}"
    return value.reshape(()).double()


def _linear_losses(rec_coeffs, gan_scale):
    """W [3] leaf; L_rec = W . rec_coeffs (gradient rec_coeffs); L_GAN = gan_scale * ||W||^2 / 2 (gradient gan_scale * W)."""
    w = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    rec = (w * torch.tensor(rec_coeffs)).sum()
    gan = 0.5 * gan_scale * (w ** 2).sum()
    return w, rec, gan


def check_weight_value(fn) -> None:
    w, rec, gan = _linear_losses([3.0, 0.0, 4.0], 0.2)
    lam = fn(rec, gan, w)
    assert torch.is_tensor(lam), f"expected a tensor, got {type(lam).__name__}"
    assert not lam.requires_grad, "lambda must be detached: it is a weight, not something to train"
    expected = 5.0 / (0.2 * 14 ** 0.5 + 1e-4)  # ||(3, 0, 4)|| = 5, ||0.2 * (1, 2, 3)|| = 0.2 sqrt(14)
    assert abs(_as_number(lam, "lambda").item() - expected) < 1e-5 * expected, f"expected {expected:.6f}, got {float(lam):.6f}"
    w2, rec2, gan2 = _linear_losses([3.0, 0.0, 4.0], 0.2)
    reference = losses.adaptive_weight(rec2, gan2, w2)
    assert torch.allclose(_as_number(lam, "lambda"), reference.double(), rtol=1e-6), "differs from the library's lambda"


def check_weight_epsilon(fn) -> None:
    w, rec, gan = _linear_losses([6e-4, 0.0, 8e-4], 1e-4 / 14 ** 0.5)  # ||grad rec|| = 1e-3, ||grad gan|| = 1e-4
    lam = _as_number(fn(rec, gan, w), "lambda")
    w2, rec2, gan2 = _linear_losses([6e-4, 0.0, 8e-4], 1e-4 / 14 ** 0.5)
    expected = losses.adaptive_weight(rec2, gan2, w2).double()  # 1e-3 / (1e-4 + 1e-4) = 5
    assert torch.allclose(lam, expected, rtol=1e-4), f"small GAN gradient: expected {expected.item():.4f}, got {lam.item():.4f}"
    w, rec, gan = _linear_losses([0.0, 0.0, 0.0], 0.0)  # both gradients vanish
    lam = _as_number(fn(rec, gan, w), "lambda")
    assert lam.item() == 0.0, f"both gradients zero: expected 0, got {lam.item()}"


def check_weight_shared_graph(fn) -> None:
    """Both losses come from the same decoder output, and the caller backpropagates them afterwards."""
    g = torch.Generator().manual_seed(0)
    features, target = torch.randn(8, 4, generator=g), torch.randn(8, 3, generator=g)
    w = torch.randn(3, 4, generator=g).requires_grad_(True)  # the "last layer"
    out = torch.tanh(features @ w.t())
    rec, gan = (out - target).abs().mean(), -(out * torch.linspace(-1, 1, 3)).mean()
    lam = fn(rec, gan, w)
    assert w.grad is None, "computing lambda must not write .grad (use torch.autograd.grad, not .backward())"
    (rec + lam * gan).backward()  # fails if the graph was freed
    w_ref = w.detach().clone().requires_grad_(True)
    out_ref = torch.tanh(features @ w_ref.t())
    rec_ref, gan_ref = (out_ref - target).abs().mean(), -(out_ref * torch.linspace(-1, 1, 3)).mean()
    lam_ref = losses.adaptive_weight(rec_ref, gan_ref, w_ref)
    assert torch.allclose(_as_number(lam, "lambda"), lam_ref.double(), rtol=1e-5), \
        f"expected {lam_ref.item():.6f}, got {float(lam):.6f}"


def check_weight_clamp(fn) -> None:
    w, rec, gan = _linear_losses([30.0, 0.0, 40.0], 1e-3)
    lam = _as_number(fn(rec, gan, w, max_weight=10.0), "lambda")
    assert lam.item() == 10.0, f"lambda above max_weight must be clamped to it: expected 10, got {lam.item():.4f}"


def _library_scale(z: torch.Tensor) -> float:
    """VQVAE.compute_scale_factor on latents that are given directly (encode = identity)."""
    holder = SimpleNamespace(encode=lambda x: x, scale_factor=torch.tensor(1.0))
    return VQVAE.compute_scale_factor(holder, [z])


REFERENCE = {"adaptive_weight": losses.adaptive_weight,
             "latent_scale": lambda z: torch.tensor(_library_scale(z))}


def _same_scale(fn, z: torch.Tensor, what: str) -> None:
    got = _as_number(fn(z.clone()), what)
    expected = _library_scale(z)
    assert abs(got.item() - expected) < 1e-3 * expected, f"{what}: expected {expected:.5f}, got {got.item():.5f}"


def check_scale_offset(fn) -> None:
    z = 3.0 + 0.5 * torch.randn(64, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    _same_scale(fn, z, "latents with mean 3, std 0.5")


def check_scale_channels(fn) -> None:
    z = torch.randn(64, 4, 8, 8, generator=torch.Generator().manual_seed(2)) * torch.tensor([0.1, 0.5, 2.0, 4.0]).view(1, 4, 1, 1)
    _same_scale(fn, z, "channels with different spreads")


def check_scale_real_latents(fn) -> None:
    torch.manual_seed(0)
    model = VQVAE(VQConfig(channels=8, channel_mult=(1, 2, 2), num_codes=16)).eval()
    x = shapes.sample_batch(16, np.random.default_rng(0), split="all")[0]
    with torch.no_grad():
        z = model.encode(x)
        expected = model.compute_scale_factor([x])
    got = _as_number(fn(z.clone()), "latents of a VQ-VAE encoder")
    assert abs(got.item() - expected) < 1e-3 * expected, f"expected {expected:.5f}, got {got.item():.5f}"
    assert abs((z * got.float()).std().item() - 1.0) < 1e-3, "z * scale should have standard deviation 1"


CHECKS = [
    Check("adaptive_weight", check_weight_value,
          "lambda is a ratio of gradient NORMS at the last layer (reconstruction over GAN), not of loss values; detach it"),
    Check("adaptive_weight", check_weight_epsilon,
          "the 1e-4 is added to the GAN gradient's norm in the denominator; it keeps lambda finite (and 0/0 away)"),
    Check("adaptive_weight", check_weight_shared_graph,
          "take the gradients with torch.autograd.grad(..., retain_graph=True): the caller backpropagates both losses later "
          "and .grad must stay untouched"),
    Check("adaptive_weight", check_weight_clamp,
          "clamp lambda to [0, max_weight]: a vanishing GAN gradient would otherwise make it explode"),
    Check("latent_scale", check_scale_offset,
          "the scale is one over the standard deviation of z around its mean (not its root-mean-square, not the variance)"),
    Check("latent_scale", check_scale_channels,
          "one number for all of z: the standard deviation over every element together, not per channel"),
    Check("latent_scale", check_scale_real_latents,
          "after scaling, z * scale must have standard deviation 1"),
]

if __name__ == "__main__":
    sys.exit(main(CHECKS, __file__))
