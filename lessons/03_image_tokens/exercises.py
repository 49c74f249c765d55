"""Lesson 03 exercises: vector quantisation, the step that turns an image into a grid of tokens.

An encoder maps the image to continuous latents z_e [B, D, h, w]: one D-dimensional vector per latent
pixel. A codebook holds K vectors e_0 .. e_{K-1} (a tensor [K, D]). Quantising replaces each latent vector
by its nearest codebook vector; the index of that vector is the latent pixel's token:

    k(i) = argmin_k || z_e(i) - e_k ||^2        z_q(i) = e_{k(i)}

The argmin has no gradient, so training needs two tricks (van den Oord et al. 2017), with sg[.] = stop-gradient:

    straight-through:   z_q_st = z_e + sg[z_q - z_e]      forward: the value z_q; backward: d/dz_e = identity
    loss:               L_VQ = ||sg[z_e] - z_q||^2 + beta ||z_e - sg[z_q]||^2
                               codebook term             commitment term
                               (moves the codes)         (keeps the encoder near its codes)

||.||^2 here is the MEAN of the squared differences over all elements (as F.mse_loss computes it).
The reference is minildm/autoencoder/vqvae.py (nearest_code_indices, VectorQuantizer).

Grade with:  python lessons/03_image_tokens/grade.py
"""
from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: F401
from einops import rearrange  # noqa: F401  ("b d h w -> (b h w) d" lists the latent vectors one per row)


def quantize(z: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Snap every latent vector to its nearest codebook vector (squared Euclidean distance).

    Input:  z         [B, D, h, w]  continuous latents, channel dimension D second
            codebook  [K, D]        one code vector per row
    Output: z_q       [B, D, h, w]  z_q[b, :, i, j] = codebook[indices[b, i, j]]; built FROM the codebook
                                    (by indexing it), so gradients of z_q reach the codebook
            indices   LongTensor [B, h, w]  the token ids, argmin over k of ||z[b, :, i, j] - codebook[k]||^2

    Example: codebook = tensor([[0., 0.], [1., 1.]]); z[0, :, 0, 0] = (0.9, 0.7) -> indices[0, 0, 0] = 1
    """
    # TODO begin ------------------------------------------------------
    raise NotImplementedError("exercise: quantize")
    # TODO end --------------------------------------------------------


def vq_loss(z_e: torch.Tensor, z_q: torch.Tensor, beta: float = 0.25) -> torch.Tensor:
    """VQ-VAE loss: codebook term + beta * commitment term, with the stop-gradients on the right sides.

    Input:  z_e   [B, D, h, w]  encoder output (gradients flow into the encoder through it)
            z_q   [B, D, h, w]  quantised latents from `quantize` (gradients flow into the codebook through it)
            beta  weight of the commitment term (0.25 in the paper and in LDM)
    Output: 0-dim tensor  mean((sg[z_e] - z_q)^2) + beta * mean((z_e - sg[z_q])^2)
            (sg[x] is x.detach(): the same value, but no gradient flows through it)

    Check: the gradient w.r.t. z_e is beta * 2 (z_e - z_q) / N, and w.r.t. z_q it is 2 (z_q - z_e) / N.
    """
    # TODO begin ------------------------------------------------------
    raise NotImplementedError("exercise: vq_loss")
    # TODO end --------------------------------------------------------


def straight_through(z_e: torch.Tensor, z_q: torch.Tensor) -> torch.Tensor:
    """Pass z_q forward but copy the decoder's gradient straight back to z_e (the quantiser is skipped).

    Input:  z_e  [B, D, h, w]  encoder output
            z_q  [B, D, h, w]  quantised latents
    Output: [B, D, h, w]  equal in value to z_q; its gradient reaches z_e unchanged and does not reach z_q
    """
    # TODO begin ------------------------------------------------------
    raise NotImplementedError("exercise: straight_through")
    # TODO end --------------------------------------------------------
