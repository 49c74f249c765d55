"""Attend-and-Excite (Chefer, Alaluf, Vinker, Wolf & Cohen-Or 2023, arXiv:2301.13826): an inference-time fix
for objects the sampler neglects, acting on the cross-attention maps.

At each of the first denoising steps, before the usual DDIM step, the latent is moved so that every object
token is strongly attended somewhere (their Algorithm 1):

    A_t      = cross-attention maps of the conditional pass at one resolution, mean over heads and layers,
               the <s> token dropped and the text tokens renormalised per pixel: softmax(100 A_t)
    A_t^s    = Gaussian-smoothed map of object token s (3x3 kernel, sigma 0.5)
    L        = max_s ( 1 - max_ij A_t^s[i, j] )          the WEAKEST object token sets the loss
    z_t'     = z_t - alpha_t grad_{z_t} L                 alpha_t = alpha sqrt(linspace(1, 0.5))
    z_{t-1}  = DDIM step from z_t' (with the guided eps at z_t')

At a few early steps the update is repeated until max_ij A_t^s reaches a threshold for every s ("iterative
latent refinement"). Only z moves: no weight of the model changes. The paper excites the nouns (here the
two shape words); minildm measures what it does to binding in bench/scenes.py.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from minildm.diffusion.ddim import ddim_step, ddim_timesteps
from minildm.diffusion.ddpm import as_eps_fn, gaussian_noise, seeded_generators
from minildm.diffusion.guidance import cfg_model_fn
from minildm.modules.attention_maps import AttentionMaps


def gaussian_smooth(maps: torch.Tensor, sigma: float = 0.5) -> torch.Tensor:
    """maps [B, K, h, w] blurred by a normalised 3x3 Gaussian (reflect padding); sigma = 0 returns maps."""
    if sigma <= 0:
        return maps
    g = torch.exp(-torch.tensor([-1.0, 0.0, 1.0]) ** 2 / (2 * sigma**2))
    kernel = torch.outer(g, g) / torch.outer(g, g).sum()  # sums to 1: a constant map stays constant
    b, k, h, w = maps.shape
    x = F.pad(maps.reshape(b * k, 1, h, w), (1, 1, 1, 1), mode="reflect")
    return F.conv2d(x, kernel.to(maps)[None, None]).reshape(b, k, h, w)


def excite_loss(maps: torch.Tensor, sigma: float = 0.5) -> torch.Tensor:
    """L = max_s (1 - max_ij smooth(A^s)[i, j]) per sample: maps [B, S, h, w] of the S object tokens -> [B]."""
    peaks = gaussian_smooth(maps, sigma).flatten(2).amax(-1)  # [B, S]: each token's strongest pixel
    return (1 - peaks).amax(-1)


def text_maps(maps: torch.Tensor, n_tokens: torch.Tensor, temperature: float = 100.0) -> torch.Tensor:
    """maps [B, L, h, w] (softmax over the L tokens, <s> first) -> [B, L, h, w] with <s> and padding at 0 and
    the words renormalised per pixel by softmax(temperature * A) (the paper's code: x100 then softmax).
    n_tokens [B]: real tokens of each prompt, <s> included."""
    L = maps.shape[1]
    words = torch.arange(L, device=maps.device)[None, :]
    keep = (words >= 1) & (words < n_tokens[:, None])  # [B, L]
    logits = (temperature * maps).masked_fill(~keep[:, :, None, None], float("-inf"))
    return torch.softmax(logits, dim=1)


def attend_and_excite(pipe, prompts: list[str], object_words: list[list[str]], steps: int = 50,
                      guidance_scale: float = 3.0, seed: int = 0, alpha: float = 20.0, excite_fraction: float = 0.5,
                      side: int | None = None, sigma: float = 0.5, refine: dict[float, float] | None = None,
                      max_refine: int = 5, loss_fn=excite_loss) -> torch.Tensor:
    """Sample prompts with Attend-and-Excite; returns images [B, 3, H, W] in [0, 1].

    object_words[b]: the words of prompt b to excite (e.g. its two shape words). The same seed gives the same
    x_T as pipe.generate, so alpha = 0 reproduces plain deterministic DDIM sampling (trailing spacing).
    excite_fraction: the first fraction of steps that update z (the paper: 25 of 50). side: resolution of
    the maps (default: the finest with cross-attention). refine: {fraction of the steps: threshold}; at
    those steps the update repeats (at most max_refine times) until every token's peak reaches the
    threshold (the paper: steps 0, 10, 20 of 50 with 0.05, 0.5, 0.8). loss_fn(maps [B, S, h, w], sigma) -> [B]:
    `excite_loss` (lesson 18 passes the learner's).
    """
    if len(object_words) != len(prompts):
        raise ValueError(f"give the object words of every prompt: {len(prompts)} prompts, {len(object_words)} lists.")
    refine = {0.0: 0.05, 0.2: 0.5, 0.4: 0.8} if refine is None else refine
    tokens = pipe.tokenizer.encode(prompts)  # [B, L]
    index = []
    for b, (prompt, words) in enumerate(zip(prompts, object_words)):
        ids = tokens[b].tolist()
        try:
            index.append([ids.index(pipe.tokenizer.word_to_id[w]) for w in words])
        except (KeyError, ValueError):
            raise ValueError(f"object words {words} are not all words of the prompt {prompt!r}.") from None
    index = torch.tensor(index, device=pipe.device)  # [B, S]
    n_tokens = (tokens != 0).sum(1).to(pipe.device)

    generator = seeded_generators(seed, len(prompts))  # image i: seed + i, as in pipe.generate
    z = gaussian_noise(torch.empty(len(prompts), *pipe.latent_shape()), generator).to(pipe.device)
    context_c, mask_c = pipe.encode_prompts(prompts)
    context_u, mask_u = pipe.encode_prompts([""])
    eps_fn = as_eps_fn(cfg_model_fn(pipe.unet, context_c, mask_c, context_u, mask_u, guidance_scale),
                       pipe.schedule, pipe.prediction)
    cond_eps_fn = as_eps_fn(cfg_model_fn(pipe.unet, context_c, mask_c, context_u, mask_u, 1.0),
                            pipe.schedule, pipe.prediction)
    timesteps = ddim_timesteps(pipe.schedule.num_timesteps, steps, "trailing").tolist()
    n_excite = round(excite_fraction * steps)
    refine_at = {round(f * steps): thr for f, thr in refine.items()}
    step_sizes = [alpha * math.sqrt(s) for s in torch.linspace(1.0, 0.5, steps).tolist()]

    def loss_and_grad(z: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        z = z.detach().requires_grad_(True)
        with torch.enable_grad(), AttentionMaps(pipe.unet, keep_grad=True) as maps:
            cond_eps_fn(z, torch.full((len(z),), t, device=z.device, dtype=torch.long))
            levels = maps.per_level()
            a = text_maps(levels[side or max(levels)], n_tokens)  # [B, L, h, w]
            objects = a[torch.arange(len(z))[:, None], index]  # [B, S, h, w]
            loss = loss_fn(objects, sigma)  # [B]
            grad, = torch.autograd.grad(loss.sum(), z)  # samples are independent: the sum's grad is each one's
        return loss.detach(), grad

    with torch.no_grad():
        for i, (t, t_prev) in enumerate(zip(timesteps, timesteps[1:] + [-1])):
            if i < n_excite and alpha > 0:
                loss, grad = loss_and_grad(z, t)
                z = z - step_sizes[i] * grad
                if i in refine_at:  # iterative refinement: until every object token peaks above the threshold
                    for _ in range(max_refine):
                        loss, grad = loss_and_grad(z, t)
                        todo = (loss > 1 - refine_at[i]).float().view(-1, *[1] * (z.ndim - 1))
                        if not todo.any():
                            break
                        z = z - step_sizes[i] * grad * todo
            eps = eps_fn(z, torch.full((len(z),), t, device=z.device, dtype=torch.long))
            z, _ = ddim_step(pipe.schedule, z, eps, t, t_prev)
    return pipe.decode(z)
