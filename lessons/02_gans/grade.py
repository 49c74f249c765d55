"""Grader of lesson 02: python lessons/02_gans/grade.py  (add -v for details).

Your losses are compared with minildm/autoencoder/losses.py on scores inside and beyond the margin, on
patch maps of different sizes, and through their gradients. REFERENCE holds the library's solutions
(tests/test_lessons_graders.py checks that they pass, tests/test_lessons_a.py that wrong versions fail).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from lessons.grading import Check, TypeMismatch, main  # noqa: E402
from minildm.autoencoder import losses  # noqa: E402

REFERENCE = {"hinge_d_loss": losses.hinge_d_loss, "hinge_g_loss": losses.hinge_g_loss}

REAL = torch.tensor([2.5, 1.2, 0.5, -0.5, -2.0])  # beyond the margin (2), inside it, on the wrong side
FAKE = torch.tensor([-3.0, -1.1, -0.2, 0.7, 1.5])  # (no score exactly at +-1, where max(0, u) has a kink)


def _close(got, expected, what: str) -> None:
    assert torch.is_tensor(got), f"{what}: expected a tensor, got {type(got).__name__}"
    if got.dtype != torch.float32:
        raise TypeMismatch(f"{what}: dtype {got.dtype}; float32 scores must give a float32 loss")
    assert got.dim() == 0, f"{what}: expected a 0-dim tensor (one number), got shape {tuple(got.shape)}"
    assert torch.allclose(got.double(), expected.double(), atol=1e-6), f"{what}: expected {expected.item():.6f}, got {got.item():.6f}"


def check_d_values(fn) -> None:
    _close(fn(REAL, FAKE), losses.hinge_d_loss(REAL, FAKE), "scores around the margin")
    confident = fn(torch.full((3,), 4.0), torch.full((3,), -4.0))
    _close(confident, torch.tensor(0.0), "D right with room to spare")


def check_d_patch_maps(fn) -> None:
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(4, 1, 3, 3, generator=g) * 2, torch.randn(2, 1, 3, 3, generator=g) * 2 + 0.5
    _close(fn(real, fake), losses.hinge_d_loss(real, fake), "patch maps, 4 real and 2 fake images")


def check_d_gradients(fn) -> None:
    real, fake = REAL.clone().requires_grad_(True), FAKE.clone().requires_grad_(True)
    fn(real, fake).backward()
    ref_real, ref_fake = REAL.clone().requires_grad_(True), FAKE.clone().requires_grad_(True)
    losses.hinge_d_loss(ref_real, ref_fake).backward()
    assert real.grad is not None and fake.grad is not None, "no gradient reached the scores"
    assert torch.allclose(real.grad, ref_real.grad), f"d/d real: expected {ref_real.grad.tolist()}, got {real.grad.tolist()}"
    assert torch.allclose(fake.grad, ref_fake.grad), f"d/d fake: expected {ref_fake.grad.tolist()}, got {fake.grad.tolist()}"


def check_g_values(fn) -> None:
    _close(fn(FAKE), losses.hinge_g_loss(FAKE), "scores of generated images")
    _close(fn(torch.full((2,), 5.0)), torch.tensor(-5.0), "D already fooled")


def check_g_patch_map_gradient(fn) -> None:
    fake = (torch.arange(12.0).reshape(3, 1, 2, 2) - 6).requires_grad_(True)
    loss = fn(fake)
    _close(loss, losses.hinge_g_loss(fake.detach()), "a patch map [3, 1, 2, 2]")
    loss.backward()
    expected = torch.full_like(fake, -1.0 / fake.numel())
    assert torch.allclose(fake.grad, expected), \
        f"d/d fake: expected {-1 / fake.numel():.4f} everywhere, got {fake.grad.flatten().tolist()}"


CHECKS = [
    Check("hinge_d_loss", check_d_values,
          "D wants real scores >= +1 and fake scores <= -1; only scores on the wrong side of their margin cost anything"),
    Check("hinge_d_loss", check_d_patch_maps,
          "each expectation is its own mean over all scores (images and patches) of that batch, then the two are added"),
    Check("hinge_d_loss", check_d_gradients,
          "the gradient should be -1/N for real scores below +1, +1/N for fake scores above -1, and 0 beyond the margins"),
    Check("hinge_g_loss", check_g_values,
          "G has no margin: it lowers its loss by raising D's score of its images, without limit"),
    Check("hinge_g_loss", check_g_patch_map_gradient,
          "the generator loss is the negative mean of all fake scores, so every score gets the same gradient"),
]

if __name__ == "__main__":
    sys.exit(main(CHECKS, __file__))
