"""Lesson 10 exercise: one training step of the latent diffusion model (prompt model + UNet, jointly).

Fill in the code between `# TODO begin` and `# TODO end`, then grade with

    python lessons/10_latent_diffusion/grade.py

`model` is a minildm LatentDiffusion; the parts you need:
    model.autoencoder.encode(x) -> z [B, c, h, w]   the frozen first stage E (unscaled latents)
    model.autoencoder.scale_factor                  0-d tensor s = 1 / std(z), so that s * E(x) has std ~ 1
    model.tokenizer.encode(list[str]) -> LongTensor [B, L]; model.tokenizer.encode([""]) is the empty prompt [1, L]
    model.text_encoder(tokens [B, L]) -> (context [B, L, d], mask [B, L] bool)    tau_theta(y), trained
    model.unet(z_t [B, c, h, w], t [B], context, mask) -> eps prediction [B, c, h, w]   eps_theta, trained
    model.schedule: NoiseSchedule (alphas_cumprod, num_timesteps; q_sample(x0, t, eps) is Property 1)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: F401  (for you to use)


def training_step(model, images: torch.Tensor, captions: list[str], p_uncond: float = 0.1,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """The LDM loss on one batch: || eps - eps_theta(z_t, t, tau_theta(y)) ||^2 in the autoencoder's latent space.

    Input:
        model:     LatentDiffusion (see the module docstring)
        images:    float tensor [B, 3, H, W] in [-1, 1]
        captions:  B prompts
        p_uncond:  probability of replacing a caption by the empty prompt "" (classifier-free guidance training)
        generator: torch.Generator for every random draw (None = torch's global one). Draw in this order, so
                   that the grader can replay your draws:
                   1. drop = torch.rand(B, generator=generator) < p_uncond     (one coin per caption)
                   2. t = torch.randint(0, T, (B,), generator=generator)
                   3. eps = torch.randn(z0.shape, generator=generator)
    Output:
        loss: scalar tensor, the mean squared error over every element. It must backpropagate into both
              model.unet and model.text_encoder (they learn together); the autoencoder stays frozen.
    """
    # TODO begin ------------------------------------------------------
    raise NotImplementedError("exercise: training_step")
    # TODO end --------------------------------------------------------
