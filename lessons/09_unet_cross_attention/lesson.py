"""Lesson 09: how the UNet hears the timestep and the prompt. The timestep embedding, where the
SpatialTransformers sit in the UNet, and the cross-attention maps of every prompt token, recomputed with
your cross_attention from the inputs the trained UNet's layers saw.

    python lessons/09_unet_cross_attention/lesson.py [--quick]

Figures go to lessons/09_unet_cross_attention/out/. Your exercises.py functions are used once you have
filled them in; until then the library's versions are.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from einops import rearrange  # noqa: E402

from lessons import common  # noqa: E402

PROMPTS = ["a red circle on the left", "a blue square on the right", "a green triangle on the top",
           "a yellow circle in the center"]
STEPS = 10 if common.QUICK else 25


def describe_unet(pipe, seen: dict) -> None:
    """Print where the cross-attention layers sit: pixel queries N (resolution), width, prompt keys M."""
    c, h, w = pipe.latent_shape()
    print(f"  UNet on latents [{c}, {h}, {w}]; prompt context tau(y): [M = {pipe.tokenizer.max_len} tokens, "
          f"d = {pipe.unet.cfg.context_dim}]")
    for name, ((x, context, _), _) in seen.items():
        side = int(round(x.shape[1] ** 0.5))
        print(f"    {name.replace('.transformer_blocks.', ' block ').replace('.attn2', ''):<27} {side}x{side} pixels: "
              f"N = {x.shape[1]:>3} queries of width {x.shape[2]} attend to M = {context.shape[1]} prompt tokens")


def plot_embedding(emb: torch.Tensor, out: Path) -> None:
    """emb [T, dim]: the embedding itself, and the cosine similarity between timesteps."""
    unit = F.normalize(emb, dim=1)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    im = ax1.imshow(emb.T.numpy(), aspect="auto", cmap="RdBu", interpolation="nearest")
    ax1.set(xlabel="t", ylabel="dimension (cos | sin)", title="timestep_embedding(t, 64)")
    fig.colorbar(im, ax=ax1)
    im = ax2.imshow((unit @ unit.T).numpy(), cmap="viridis", origin="lower")
    ax2.set(xlabel="t", ylabel="t'", title="cosine similarity of embeddings")
    fig.colorbar(im, ax=ax2)
    fig.tight_layout()
    common.save_figure(fig, out / "timestep_embedding.png")


def plot_maps(images: torch.Tensor, maps: torch.Tensor, words: list[list[str]], out: Path, label: str) -> None:
    """images [n, 3, H, W] in [0, 1]; maps [n, L, h, w]; words: the real tokens of each prompt."""
    cols = 1 + max(len(w) for w in words)
    fig, axes = plt.subplots(len(words), cols, figsize=(1.35 * cols, 1.5 * len(words)))
    for r, prompt_words in enumerate(words):
        axes[r, 0].imshow(rearrange(images[r], "c h w -> h w c").numpy())
        axes[r, 0].set_title("sample", fontsize=8)
        for c in range(1, cols):
            ax = axes[r, c]
            if c - 1 < len(prompt_words):
                ax.imshow(maps[r, c - 1].numpy(), cmap="inferno", vmin=0, vmax=float(maps[r].max()))
                ax.set_title(prompt_words[c - 1], fontsize=8)
            else:
                ax.axis("off")
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"cross-attention weight of each pixel (finest attended level, last step) on each prompt token "
                 f"({label})", fontsize=9)
    fig.tight_layout()
    common.save_figure(fig, out / "cross_attention_maps.png")


def main() -> None:
    out, fns = common.start(__file__, "lesson 09: the UNet's timestep embedding and cross-attention",
                            trained_model=True)

    plot_embedding(fns["timestep_embedding"](torch.arange(1000), 64), out)
    pipe = common.trained_pipeline()

    # Sample, and keep what every cross-attention layer (attn2) saw at the last step
    seen = {}
    layers = {name: m for name, m in pipe.unet.named_modules() if name.endswith("attn2")}
    hooks = [m.register_forward_hook(lambda m, args, output, name=name: seen.__setitem__(name, (args, output)))
             for name, m in layers.items()]
    try:
        images, extras = pipe.generate(PROMPTS, steps=STEPS, guidance_scale=3.0, seed=0, return_attention=True)
    finally:
        for hook in hooks:
            hook.remove()

    describe_unet(pipe, seen)

    # Recompute the finest level's maps with your cross_attention from those inputs
    finest = max(args[0].shape[1] for args, _ in seen.values())
    n, side = len(PROMPTS), int(round(finest**0.5))
    probs_all, worst = [], 0.0
    for name, ((x, context, mask), output) in seen.items():
        layer = layers[name]
        mine, probs = fns["cross_attention"](x, context, layer.to_q.weight.T, layer.to_k.weight.T,
                                             layer.to_v.weight.T, layer.heads, mask)
        worst = max(worst, (layer.to_out(mine) - output).abs().max().item())  # attn2 = to_out(attention)
        if x.shape[1] == finest:
            probs_all.append(probs[-n:].mean(dim=1))  # conditional half of the [uncond, cond] batch, mean over heads
    print(f"  your cross_attention reproduces all {len(layers)} attn2 layers of the UNet: max |difference| {worst:.2e}")
    maps = rearrange(torch.stack(probs_all).mean(dim=0), "b (h w) m -> b m h w", h=side, w=side)
    print(f"  maps agree with pipeline.generate(return_attention=True): max |difference| "
          f"{(maps - extras['attention']).abs().max().item():.2e}")

    tokens = pipe.tokenizer.encode(PROMPTS)
    words = [[pipe.tokenizer.words[i] for i in row.tolist() if i != 0] for row in tokens]
    plot_maps(images, maps, words, out, pipe.label)
    for prompt, row, prompt_words in zip(PROMPTS, maps, words):
        share = row[: len(prompt_words)].flatten(1).mean(dim=1)
        print(f"  {prompt!r}: mean weight per token " + " ".join(f"{w}={s:.2f}" for w, s in zip(prompt_words, share)))
    print(f"figures in {out}: timestep_embedding.png cross_attention_maps.png")


if __name__ == "__main__":
    main()
