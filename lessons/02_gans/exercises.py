"""Lesson 02 exercises: the hinge loss of a GAN's discriminator D and generator G.

D outputs a real-valued score ("logit") for each image, or a map of scores, one per image patch. The hinge
loss (Lim & Ye 2017; used by SNGAN, BigGAN and VQGAN's patch discriminator, so by LDM's autoencoder) asks
D for a margin: a score of at least +1 on real images and at most -1 on generated ones. Scores already
beyond the margin cost nothing, so D stops pushing on examples it gets right with room to spare.

    L_D = E_x[ max(0, 1 - D(x)) ] + E_z[ max(0, 1 + D(G(z))) ]
    L_G = -E_z[ D(G(z)) ]

Every expectation is a mean over all the scores of the batch (all images, and all patches of a score map).
The reference is minildm/autoencoder/losses.py.

Grade with:  python lessons/02_gans/grade.py
"""
from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: F401  (F.relu(u) = max(0, u))


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss.

    Input:  logits_real  D's scores of real images, any shape, e.g. [B] or a patch map [B, 1, h, w]
            logits_fake  D's scores of generated images, any shape (the sizes of the two may differ)
    Output: 0-dim tensor  mean(max(0, 1 - logits_real)) + mean(max(0, 1 + logits_fake))

    Example: hinge_d_loss(torch.tensor([2.0, 0.5]), torch.tensor([-3.0, 0.0])) -> tensor(0.75)
             (real terms 0 and 0.5, mean 0.25; fake terms 0 and 1, mean 0.5)
    """
    # TODO begin ------------------------------------------------------
    raise NotImplementedError("exercise: hinge_d_loss")
    # TODO end --------------------------------------------------------


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator loss of the hinge GAN: raise D's score of the generated images.

    Input:  logits_fake  D's scores of generated images, any shape
    Output: 0-dim tensor  -mean(logits_fake)   (no margin here: G gains from every bit of score)

    Example: hinge_g_loss(torch.tensor([-3.0, 0.0, 1.5])) -> tensor(0.5)
    """
    # TODO begin ------------------------------------------------------
    raise NotImplementedError("exercise: hinge_g_loss")
    # TODO end --------------------------------------------------------
