"""Prompt-to-Prompt word swap (Hertz, Mokady, Tenenbaum, Aberman, Pritch & Cohen-Or 2022, arXiv:2208.01626):
edit one word of a prompt and keep the rest of the picture, by reusing the source prompt's attention maps.

The layout of an image is decided early and lives in the cross-attention maps M_t (which pixels read which
word). Sample the source prompt P and the edited prompt P* from the SAME x_T, side by side; in every
cross-attention layer, for the first tau steps, the edited branch uses the source's maps:

    Edit(M_t, M_t*, t) = M_t    if t is among the first tau steps     (word swap, their eq. for Edit)
                         M_t*   otherwise
    out* = Edit(M_t, M_t*, t) V*                  (V* = W_V tau_theta(P*): the new word's values)

The values still come from P*, so the swapped word ("blue" for "red") paints its own attribute into the
places the source word occupied. A word swap keeps the token count, so token l of P maps to token l of P*.
Only the conditional half of the classifier-free guidance batch is edited (as in the authors' code).
"""
from __future__ import annotations

import torch

from minildm.diffusion.ddim import ddim_step, ddim_timesteps
from minildm.diffusion.ddpm import as_eps_fn, gaussian_noise, seeded_generators
from minildm.diffusion.guidance import cfg_model_fn
from minildm.modules.attention_maps import AttentionMaps


def swap_maps(probs: torch.Tensor, n: int) -> torch.Tensor:
    """Edit(M, M*) for the first steps: the edited prompts' conditional maps become the sources' (a new tensor).

    probs [R, H, N, L] of one cross-attention layer, the UNet batch being [sources (n); targets (n)]:
    R = 2n without guidance, or R = 4n = [uncond src, uncond tgt, cond src, cond tgt] under classifier-free
    guidance, where only the conditional half is edited (the unconditional maps read the empty prompt).
    """
    cond = 0 if len(probs) == 2 * n else 2 * n  # first row of the conditional half
    out = probs.clone()
    out[cond + n:cond + 2 * n] = probs[cond:cond + n]  # the edit reads the source's maps
    return out


def word_swap(pipe, sources: list[str], targets: list[str], steps: int = 50, guidance_scale: float = 3.0,
              seed: int = 0, inject_fraction: float = 0.4, swap=swap_maps) -> tuple[torch.Tensor, torch.Tensor]:
    """(source images, edited images), each [B, 3, H, W] in [0, 1]: targets[b] is sources[b] with words swapped.

    The source images equal pipe.generate(sources, steps, guidance_scale, seed=seed) (same x_T, same DDIM);
    inject_fraction: the first fraction of steps in which the edit uses the source's cross-attention maps
    (0 = no injection: the edited prompt sampled from the same noise; 1 = every step).
    swap(probs, n) -> probs: the edit of one layer's maps (`swap_maps`; lesson 18 passes the learner's).
    """
    n = len(sources)
    if len(targets) != n or n == 0:
        raise ValueError(f"give one edited prompt per source prompt: {n} sources, {len(targets)} targets.")
    src_tok, tgt_tok = pipe.tokenizer.encode(sources), pipe.tokenizer.encode(targets)
    if not torch.equal(src_tok != 0, tgt_tok != 0):
        raise ValueError("a word swap keeps the number of words: every edited prompt must have as many words as "
                         "its source (use the same words except the swapped ones).")
    if not 0 <= inject_fraction <= 1:
        raise ValueError(f"inject_fraction must lie in [0, 1], got {inject_fraction}.")

    generator = seeded_generators(seed, n)  # image i: seed + i, as in pipe.generate
    x_T = gaussian_noise(torch.empty(n, *pipe.latent_shape()), generator).to(pipe.device)
    z = torch.cat([x_T, x_T])  # [sources; targets] from the same noise
    context_c, mask_c = pipe.encode_prompts(sources + targets)
    context_u, mask_u = pipe.encode_prompts([""])
    eps_fn = as_eps_fn(cfg_model_fn(pipe.unet, context_c, mask_c, context_u, mask_u, guidance_scale),
                       pipe.schedule, pipe.prediction)
    timesteps = ddim_timesteps(pipe.schedule.num_timesteps, steps, "trailing").tolist()
    n_inject = round(inject_fraction * steps)
    step = 0

    def edit(name: str, probs: torch.Tensor) -> torch.Tensor:
        return swap(probs, n) if step < n_inject and guidance_scale != 0 else probs

    with torch.no_grad(), AttentionMaps(pipe.unet, edit=edit, record=False):
        for step, (t, t_prev) in enumerate(zip(timesteps, timesteps[1:] + [-1])):
            eps = eps_fn(z, torch.full((2 * n,), t, device=z.device, dtype=torch.long))
            z, _ = ddim_step(pipe.schedule, z, eps, t, t_prev)
    images = pipe.decode(z)
    return images[:n], images[n:]
