"""Lesson 15 exercises: BoLID's Gaussian keypoint weighting (eqs. 11-13) and the two pieces of a VAE.

Fill in the regions between `# TODO begin` and `# TODO end`, then grade with

    python lessons/15_body_vae/grade.py

Once an exercise passes, `lesson.py` uses your version instead of the library's.

Conventions (the library's): keypoints are pixel (x, y) = (column, row), pixel centres at integer positions,
so pixel (row i, column j) sits at x = j, y = i. Images inside models are in [-1, 1]. Use torch only; no
loops over pixels or keypoints are needed (broadcasting does it).
"""
from __future__ import annotations

import torch

LOGVAR_RANGE = (-30.0, 20.0)  # the usual clamp of log sigma^2 (keeps exp() finite)


def gaussian_keypoint_weights(keypoints: torch.Tensor, visible: torch.Tensor, height: int, width: int,
                              sigma: float) -> torch.Tensor:
    """The pixel weights W_norm of eqs. 11-13.

        w_i(x, y) = exp(-((x - x_i)^2 + (y - y_i)^2) / (2 sigma^2))        eq. 11, one bump per keypoint
        W(x, y)   = max over the VISIBLE keypoints i of w_i(x, y)            eq. 12
        W_norm    = W / max_{x, y} W                                          eq. 13, per image

    Input:
        keypoints  [..., K, 2] float, pixel (x, y) of each keypoint (e.g. [B, K, 2] or [K, 2])
        visible    [..., K] bool, False = the keypoint is hidden: it must not contribute at all
        height, width: the image size H, W (pixels x = 0..W-1, y = 0..H-1)
        sigma:     the radius of influence, in pixels
    Output:
        W_norm [..., H, W] in [0, 1], keypoints' dtype. An image with no visible keypoint gets all ones
        (nothing to focus on, so the image is kept as it is).
    """
    # TODO begin ------------------------------------------------------
    raise NotImplementedError("exercise: gaussian_keypoint_weights")
    # TODO end --------------------------------------------------------


def weight_image(image: torch.Tensor, weights: torch.Tensor, alpha: float) -> torch.Tensor:
    """The weighted image of eq. 13: I_w(x, y) = I(x, y) * (alpha + (1 - alpha) W_norm(x, y)).

    Input:
        image    [..., 3, H, W] float
        weights  [..., H, W] in [0, 1] (W_norm; the same weight for the three colour channels)
        alpha    in [0, 1]: what the background keeps (1 = the image unchanged, 0 = background zeroed)
    Output:
        I_w [..., 3, H, W]
    """
    # TODO begin ------------------------------------------------------
    raise NotImplementedError("exercise: weight_image")
    # TODO end --------------------------------------------------------


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """A sample of q(z | views) = N(mu, sigma^2) written so gradients reach mu and logvar.

    Input:
        mu, logvar  [..., D]: the encoder's mean and log-variance (logvar = log sigma^2)
        eps         [..., D]: standard normal noise (given, so the result is reproducible)
    Output:
        z [..., D] = mu + sigma * eps
    """
    # TODO begin ------------------------------------------------------
    raise NotImplementedError("exercise: reparameterize")
    # TODO end --------------------------------------------------------


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, I)) per sample: the VAE's prior term, in closed form.

    Input:
        mu, logvar  [..., D] (logvar = log sigma^2). Clamp logvar to LOGVAR_RANGE first, so a wild
                    encoder output cannot overflow exp().
    Output:
        KL [...]: summed over the D latent dimensions (one number per sample, >= 0)
    """
    # TODO begin ------------------------------------------------------
    raise NotImplementedError("exercise: kl_divergence")
    # TODO end --------------------------------------------------------
