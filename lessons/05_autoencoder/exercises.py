"""Lesson 05 exercises: two numbers that make LDM's autoencoder work in practice.

1. The adaptive GAN weight (VQGAN, Esser et al. 2021, eq. 7). The generator of the autoencoder minimises
   L_rec + lambda * L_GAN. The raw sizes of the two losses say little about how hard each one pulls on the
   network, so lambda compares their GRADIENTS at the decoder's last layer W_last:

       lambda = || grad_{W_last} L_rec || / ( || grad_{W_last} L_GAN || + 1e-4 )

   clamped to [0, max_weight] and detached (lambda is a number, not something to train). The 1e-4 keeps
   lambda finite when the GAN gradient vanishes.

2. The latent scale factor (Rombach et al. 2022; Stable Diffusion's 0.18215). The diffusion model adds
   unit-variance noise to the latents, so it expects latents of roughly unit variance. After the
   autoencoder is trained we measure the spread of its latents once and rescale:

       scale_factor = 1 / std(z)        (one number over ALL elements of all latents)
       diffusion trains on z * scale_factor and the decoder gets z_0 / scale_factor back.

The references are minildm/autoencoder/losses.py (adaptive_weight) and VQVAE.compute_scale_factor in
minildm/autoencoder/vqvae.py.

Grade with:  python lessons/05_autoencoder/grade.py
"""
from __future__ import annotations

import torch


def adaptive_weight(rec_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4) -> torch.Tensor:
    """VQGAN's balance between the reconstruction and the GAN loss.

    Input:  rec_loss    0-dim tensor, the reconstruction loss (L1 + perceptual), with its autograd graph
            gan_loss    0-dim tensor, the generator's GAN loss, with its autograd graph
            last_layer  the weight tensor W_last of the decoder's last layer (a leaf that requires grad),
                        e.g. [3, C, 3, 3] for a conv
            max_weight  upper clamp of lambda
    Output: 0-dim tensor lambda = ||dL_rec/dW|| / (||dL_GAN/dW|| + 1e-4), clamped to [0, max_weight], with
            requires_grad False

    Rules: use torch.autograd.grad(loss, last_layer, retain_graph=True), not .backward(): the caller still
    backpropagates both losses afterwards, and .grad of the weights must stay untouched.
    ||.|| is the Euclidean (Frobenius) norm of the whole gradient tensor.
    """
    # TODO begin ------------------------------------------------------
    raise NotImplementedError("exercise: adaptive_weight")
    # TODO end --------------------------------------------------------


def latent_scale(z: torch.Tensor) -> torch.Tensor:
    """The latent scale factor 1 / std(z).

    Input:  z  [N, c, h, w]  unscaled latents of many training images (the encoder's output)
    Output: 0-dim tensor     1 / std(z), the standard deviation taken over ALL N*c*h*w elements together
                             (around their mean), so that std(z * scale) = 1

    Example: z with mean 3 and standard deviation 0.5 -> tensor(2.)
    """
    # TODO begin ------------------------------------------------------
    raise NotImplementedError("exercise: latent_scale")
    # TODO end --------------------------------------------------------
