"""Grade lesson 15:  python lessons/15_body_vae/grade.py  (add -v to see what differed).

Every check compares your function with the library (minildm/adapters/body_vae.py) on inputs where the usual
mistakes show: crowded keypoints (max, not sum), a hidden keypoint, a distance of exactly sigma, alpha at
its ends, the variance against the standard deviation, the sign of the KL.
REFERENCE holds the library's solutions in the exercises' signatures (tests/test_lessons_body.py checks
that they pass and that typical wrong versions fail).
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for `lessons` and `minildm`

import torch  # noqa: E402

from lessons.grading import Check, assert_same_kind, main  # noqa: E402
from minildm.adapters import body_vae as lib  # noqa: E402

REFERENCE = {
    "gaussian_keypoint_weights": lib.gaussian_keypoint_weights,
    "weight_image": lib.weight_image,
    "reparameterize": lib.reparameterize,
    "kl_divergence": lib.kl_divergence,
}


def close(mine, ref, what: str, atol: float = 1e-6) -> None:
    assert_same_kind(mine, ref, what)
    err = (mine.double() - ref.double()).abs().max().item()
    assert torch.allclose(mine.double(), ref.double(), atol=atol, rtol=1e-5), f"{what}: max abs error {err:.3g}"


# ---------------------------------------------------------------- gaussian_keypoint_weights
def check_one_keypoint(fn):
    """One keypoint on a non-square image: peak 1 on it, e^(-1/2) at distance sigma (rows and columns apart)."""
    sigma = 2.0
    kp, vis = torch.tensor([[11.0, 4.0]]), torch.tensor([True])
    w = fn(kp, vis, 12, 20, sigma)
    close(w, lib.gaussian_keypoint_weights(kp, vis, 12, 20, sigma), "one keypoint at (x=11, y=4) on 12x20")
    assert abs(w[4, 11].item() - 1.0) < 1e-6, f"weight on the keypoint {w[4, 11].item():.4f}, expected 1"
    assert abs(w[4, 13].item() - math.exp(-0.5)) < 1e-6, f"weight at distance sigma {w[4, 13].item():.4f}"


def check_crowded_keypoints(fn):
    """Five keypoints close together (a face): the max keeps each bump's height; a sum would pile them up."""
    kp = torch.tensor([[8.0, 5.0], [9.0, 4.0], [7.0, 4.0], [10.0, 5.0], [6.0, 5.0], [8.0, 14.0]])
    vis = torch.ones(6, dtype=torch.bool)
    close(fn(kp, vis, 18, 16, 2.0), lib.gaussian_keypoint_weights(kp, vis, 18, 16, 2.0), "crowded keypoints")


def check_hidden_keypoints(fn):
    """A hidden keypoint far from the others must leave no bump; all hidden -> all ones."""
    kp = torch.tensor([[[3.0, 3.0], [12.0, 9.0]], [[5.0, 5.0], [1.0, 1.0]]])
    vis = torch.tensor([[True, False], [False, False]])
    close(fn(kp, vis, 12, 14, 1.5), lib.gaussian_keypoint_weights(kp, vis, 12, 14, 1.5), "with hidden keypoints")


def check_normalised_batch(fn):
    """A batch [B, K, 2] with keypoints between pixels and outside the image: each image's max is 1 after eq. 13."""
    g = torch.Generator().manual_seed(0)
    kp = torch.rand(3, 17, 2, generator=g) * torch.tensor([20.0, 14.0]) - 2.0
    vis = torch.rand(3, 17, generator=g) > 0.5
    kp[1, :, :] = torch.tensor([30.5, 4.5])  # image 1: every keypoint right of the image
    vis[1] = True
    w = fn(kp, vis, 12, 16, 1.7)
    close(w, lib.gaussian_keypoint_weights(kp, vis, 12, 16, 1.7), "batch of 3 images")


def check_far_keypoints_and_float64(fn):
    """Keypoints so far outside the image that every Gaussian underflows to 0 (W_max = 0: all ones, no 0 / 0),
    and float64 keypoints, whose dtype the weights keep."""
    kp = torch.tensor([[[400.0, 5.0], [-300.0, 2.0]], [[4.0, 5.0], [500.0, 500.0]]])
    vis = torch.ones(2, 2, dtype=torch.bool)
    close(fn(kp, vis, 10, 12, 1.5), lib.gaussian_keypoint_weights(kp, vis, 10, 12, 1.5), "keypoints 300+ pixels away")
    kp64 = kp.double()
    close(fn(kp64, vis, 10, 12, 1.5), lib.gaussian_keypoint_weights(kp64, vis, 10, 12, 1.5), "float64 keypoints")


# ---------------------------------------------------------------- weight_image
def _image_and_weights(seed: int, lead=(2,)):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*lead, 3, 6, 7, generator=g) * 2 - 1, torch.rand(*lead, 6, 7, generator=g)


def check_weight_image(fn):
    image, weights = _image_and_weights(1)
    for alpha in (0.25, 0.6):
        close(fn(image, weights, alpha), lib.weight_image(image, weights, alpha), f"alpha = {alpha}")


def check_alpha_ends(fn):
    """alpha = 1 keeps the image; alpha = 0 multiplies it by W_norm (the background goes to 0)."""
    image, weights = _image_and_weights(2)
    close(fn(image, weights, 1.0), image, "alpha = 1")
    close(fn(image, weights, 0.0), image * weights[:, None], "alpha = 0")


def check_weight_image_broadcast(fn):
    """Sets of views [B, V, 3, H, W] with weights [B, V, H, W]: one weight per pixel for all three channels."""
    image, weights = _image_and_weights(3, lead=(2, 4))
    close(fn(image, weights, 0.3), lib.weight_image(image, weights, 0.3), "[2, 4, 3, 6, 7] views")


# ---------------------------------------------------------------- reparameterize
def _gaussian(seed: int, shape=(4, 5)):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g), torch.randn(*shape, generator=g) * 1.5,
            torch.randn(*shape, generator=g))


def check_reparameterize(fn):
    mu, logvar, eps = _gaussian(4)
    close(fn(mu, logvar, eps), lib.reparameterize(mu, logvar, eps), "z for random mu, logvar, eps")


def check_reparameterize_by_hand(fn):
    """sigma^2 = 4 means sigma = 2: z = mu + 2 eps."""
    mu, eps = torch.tensor([[1.0, -3.0]]), torch.tensor([[0.5, 1.0]])
    close(fn(mu, torch.full((1, 2), math.log(4.0)), eps), torch.tensor([[2.0, -1.0]]), "mu + sigma eps, sigma^2 = 4")


def check_reparameterize_gradients(fn):
    """dz/dmu = 1 and dz/dlogvar = eps sigma / 2: the sample is a differentiable function of mu and logvar."""
    mu, logvar, eps = _gaussian(5, shape=(3,))
    mu.requires_grad_(True)
    logvar.requires_grad_(True)
    fn(mu, logvar, eps).sum().backward()
    assert mu.grad is not None and logvar.grad is not None, "no gradient reached mu or logvar"
    close(mu.grad, torch.ones(3), "dz/dmu")
    close(logvar.grad, eps * torch.exp(0.5 * logvar.detach()) / 2, "dz/dlogvar")


# ---------------------------------------------------------------- kl_divergence
def check_kl_zero_at_the_prior(fn):
    kl = fn(torch.zeros(3, 6), torch.zeros(3, 6))
    close(kl, torch.zeros(3), "KL(N(0, I) || N(0, I))")


def check_kl_closed_form(fn):
    mu, logvar, _ = _gaussian(6, shape=(2, 3, 7))
    close(fn(mu, logvar), lib.kl_divergence(mu, logvar), "KL for [2, 3, 7] latents", atol=1e-5)


def check_kl_by_hand(fn):
    """mu = 1, logvar = 1 (sigma^2 = e): each dim gives -1/2 (1 + 1 - 1 - e) = (e - 1) / 2; two dims sum to e - 1."""
    kl = fn(torch.ones(1, 2), torch.ones(1, 2))
    close(kl, torch.tensor([math.e - 1.0]), "mu = 1, logvar = 1 in 2 dims", atol=1e-6)


def check_kl_float64(fn):
    mu, logvar, _ = _gaussian(7, shape=(3, 5))
    close(fn(mu.double(), logvar.double()), lib.kl_divergence(mu.double(), logvar.double()), "float64 latents",
          atol=1e-9)


def check_kl_clamped(fn):
    kl = fn(torch.zeros(2, 3), torch.tensor([[500.0, 0.0, 0.0], [-500.0, 0.0, 0.0]]))
    assert torch.isfinite(kl).all(), f"KL for logvar = +-500 is {kl.tolist()}"
    close(kl, lib.kl_divergence(torch.zeros(2, 3), torch.tensor([[500.0, 0.0, 0.0], [-500.0, 0.0, 0.0]])),
          "KL with a clamped logvar", atol=1e-3)


CHECKS = [
    Check("gaussian_keypoint_weights", check_one_keypoint,
          "eq. 11: x is the column and y the row; at a distance of sigma the weight is exp(-1/2), so the "
          "exponent's denominator is 2 sigma^2."),
    Check("gaussian_keypoint_weights", check_crowded_keypoints,
          "eq. 12 takes the MAX over keypoints, not the sum: crowded keypoints (the face) must not outweigh a "
          "lone one."),
    Check("gaussian_keypoint_weights", check_hidden_keypoints,
          "a hidden keypoint contributes nothing (its bump is zero everywhere); with nothing visible the "
          "weights are all ones."),
    Check("gaussian_keypoint_weights", check_far_keypoints_and_float64,
          "far-away keypoints underflow to W = 0 everywhere: eq. 13 would divide 0 by 0, so that image is all ones "
          "like an image with nothing visible; keep the keypoints' dtype."),
    Check("gaussian_keypoint_weights", check_normalised_batch,
          "eq. 13 divides by the largest weight of EACH image, so every image peaks at 1 even when its "
          "keypoints sit between pixels or outside the image; work on any leading batch dims."),
    Check("weight_image", check_weight_image,
          "I_w = I * (alpha + (1 - alpha) W_norm): alpha is the floor every pixel keeps."),
    Check("weight_image", check_alpha_ends,
          "alpha is what the background keeps: alpha = 1 leaves the image unchanged, alpha = 0 zeroes "
          "the background. Check which side of the formula alpha is on."),
    Check("weight_image", check_weight_image_broadcast,
          "the weights [..., H, W] need a channel axis to multiply an image [..., 3, H, W]."),
    Check("reparameterize", check_reparameterize,
          "z = mu + sigma eps, and sigma is a standard deviation: logvar is log sigma^2."),
    Check("reparameterize", check_reparameterize_by_hand,
          "sigma = exp(logvar / 2), not exp(logvar) (that is the variance)."),
    Check("reparameterize", check_reparameterize_gradients,
          "compute z from mu, logvar and eps with tensor arithmetic so gradients reach mu and logvar."),
    Check("kl_divergence", check_kl_zero_at_the_prior,
          "the KL of the prior to itself is 0: mind the constant 1 inside the sum."),
    Check("kl_divergence", check_kl_closed_form,
          "KL = -1/2 sum_j (1 + log sigma_j^2 - mu_j^2 - sigma_j^2), summed over the LAST dim only."),
    Check("kl_divergence", check_kl_by_hand,
          "a KL is never negative: check the sign in front of the sum, and that sigma^2 = exp(logvar)."),
    Check("kl_divergence", check_kl_float64, "compute in the dtype you are given (float64 latents stay float64)."),
    Check("kl_divergence", check_kl_clamped, "clamp logvar to LOGVAR_RANGE before exp()."),
]

if __name__ == "__main__":
    sys.exit(main(CHECKS, __file__))
