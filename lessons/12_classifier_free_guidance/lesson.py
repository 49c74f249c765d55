"""Lesson 12: classifier-free guidance. Your drop_prompt on a batch of captions, the three ways papers write
the guidance formula, and a sweep of the guidance scale s with your guided_eps: samples and prompt accuracy.

    python lessons/12_classifier_free_guidance/lesson.py [--quick]

Figures go to lessons/12_classifier_free_guidance/out/. Your exercises.py functions are used once you have
filled them in; until then the library's versions are.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from einops import rearrange  # noqa: E402

from lessons import common  # noqa: E402
from minildm.data import shapes  # noqa: E402
from minildm.data.describe import prompt_accuracy  # noqa: E402
from minildm.diffusion.ddim import ddim_sample  # noqa: E402
from minildm.diffusion.ddpm import as_eps_fn  # noqa: E402

SCALES = (0.0, 1.0, 1.5, 3.0, 5.0, 10.0)  # s = 0 is the unconditional model, for comparison
STEPS = 10 if common.QUICK else 25
PROMPTS = [shapes.caption(*combo) for combo in shapes.SEEN[:: 10 if common.QUICK else 3]]  # 8 or 27 prompts
GRID = 8  # prompts shown in the sweep grid


def show_dropping(pipe, drop_prompt) -> None:
    """Your drop_prompt on 8 captions (p = 0.25), and its rate over many."""
    captions = PROMPTS[:8]
    tokens, empty = pipe.tokenizer.encode(captions), pipe.tokenizer.encode([""])
    dropped = drop_prompt(tokens, empty, 0.25, torch.Generator().manual_seed(0))
    print("  drop_prompt(p = 0.25) on a batch, decoded:")
    for before, after in zip(captions, pipe.tokenizer.decode(dropped)):
        print(f"    {before!r:<36} -> {after!r}")
    many = tokens.repeat(500, 1)
    for p in (0.1, 0.5):
        rate = (drop_prompt(many, empty, p, torch.Generator().manual_seed(1)) == empty).all(dim=1).float().mean()
        print(f"  p = {p}: {rate:.3f} of {len(many)} captions dropped")


def print_conventions() -> None:
    print("  one family, three spellings: eps_u + s (eps_c - eps_u) = (w + 1) eps_c - w eps_u = w' eps_c + (1 - w') eps_u")
    print("    s  (ours; the slides' LDM scale s)           " + "  ".join(f"{s:>5g}" for s in SCALES))
    print("    w  = s - 1 (Ho & Salimans; BoLID eq. 6)      " + "  ".join(f"{s - 1:>5g}" for s in SCALES))
    print("    w' = s     (IP-Adapter; BoLID eq. 10)        " + "  ".join(f"{s:>5g}" for s in SCALES))


@torch.no_grad()
def sample(pipe, guided_eps, prompts: list[str], scale: float, seed: int = 0) -> torch.Tensor:
    """DDIM (trailing, eta 0) with your guided_eps; z_T from `seed` as in pipeline.generate -> [n, 3, H, W]."""
    n = len(prompts)
    g = torch.Generator().manual_seed(seed)
    z_T = torch.randn((n, *pipe.latent_shape()), generator=g)
    context_c, mask_c = pipe.encode_prompts(prompts)
    context_u, mask_u = pipe.encode_prompts([""] * n)  # same length L as the prompts (fixed-length tokenizer)

    def model_fn(z_t, t):
        # one forward pass on the batch [uncond, cond]
        out = pipe.unet(torch.cat([z_t, z_t]), torch.cat([t, t]), torch.cat([context_u, context_c]),
                        torch.cat([mask_u, mask_c]))
        eps_u, eps_c = out.chunk(2)
        return guided_eps(eps_u, eps_c, scale)

    eps_fn = as_eps_fn(model_fn, pipe.schedule, pipe.prediction)
    return pipe.decode(ddim_sample(eps_fn, pipe.schedule, z_T, STEPS, spacing="trailing", progress=False))


def sweep(pipe, guided_eps) -> tuple[dict, dict, dict]:
    """Every scale of SCALES on PROMPTS: ({s: first GRID images}, {s: prompt accuracy}, {s: mean saturation}).
    bench/lesson_numbers.py calls this too, so the README's table is what this lesson prints."""
    grids, accuracy, saturation = {}, {}, {}
    for s in SCALES:
        start = time.process_time()
        images = sample(pipe, guided_eps, PROMPTS, s)
        accuracy[s] = prompt_accuracy(images, PROMPTS)
        saturation[s] = (images.amax(dim=1) - images.amin(dim=1)).mean().item()
        grids[s] = images[:GRID]
        print(f"  s = {s:>4g}: prompt accuracy {accuracy[s]:.2f}, mean pixel saturation {saturation[s]:.3f}  "
              f"({time.process_time() - start:.1f} s CPU)")
    return grids, accuracy, saturation


def plot_sweep(grids: dict, accuracy: dict, out: Path, label: str) -> None:
    fig, axes = plt.subplots(len(grids), GRID, figsize=(1.2 * GRID, 1.3 * len(grids)))
    for r, (s, images) in enumerate(grids.items()):
        for c in range(GRID):
            ax = axes[r, c]
            ax.imshow(rearrange(images[c], "c h w -> h w c").numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(f"s = {s:g}\nacc {accuracy[s]:.2f}", fontsize=8)
            if r == 0:
                ax.set_title(PROMPTS[c].replace("a ", "", 1).replace(" on the", "\n").replace(" in the", "\n"), fontsize=6)
    fig.suptitle(f"guidance sweep, DDIM {STEPS} steps, same z_T per column ({label})", fontsize=9)
    fig.tight_layout()
    common.save_figure(fig, out / "guidance_sweep.png")

    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    ax.plot(list(accuracy), list(accuracy.values()), "o-")
    ax.set(xlabel="guidance scale s", ylabel="prompt accuracy", ylim=(-0.02, 1.02),
           title=f"describe() agrees with the prompt ({len(PROMPTS)} prompts, {label})")
    ax.axvline(1, color="gray", ls="--", lw=0.8)
    fig.tight_layout()
    common.save_figure(fig, out / "accuracy_vs_guidance.png")


def main() -> None:
    out, fns = common.start(__file__, "lesson 12: classifier-free guidance", trained_model=True)
    pipe = common.trained_pipeline()
    show_dropping(pipe, fns["drop_prompt"])
    print_conventions()

    check = sample(pipe, fns["guided_eps"], PROMPTS[:2], 3.0)
    library = pipe.generate(PROMPTS[:2], steps=STEPS, guidance_scale=3.0, seed=0)
    print(f"  your guided sampler vs pipeline.generate(guidance_scale=3): max |difference| {(check - library).abs().max():.2e}")

    grids, accuracy, _ = sweep(pipe, fns["guided_eps"])
    plot_sweep(grids, accuracy, out, pipe.label)
    print(f"figures in {out}: guidance_sweep.png accuracy_vs_guidance.png")


if __name__ == "__main__":
    main()
