"""Lesson 18: two objects in one picture. The binding errors your score_scene names, the cross-attention maps
per word and per level that show where they come from, Attend-and-Excite with your excite_loss, and
Prompt-to-Prompt word swaps with your swap_maps.

    python lessons/18_binding/lesson.py [--quick]

Uses runs/scenes (python train.py --preset scenes); without it, or in quick mode, a micro model trained on
scenes here in seconds (blurry: its numbers mean nothing). Figures go to lessons/18_binding/out/.
"""
from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from einops import rearrange  # noqa: E402

from lessons import common  # noqa: E402
from minildm.data import scenes  # noqa: E402
from minildm.diffusion.attend_excite import attend_and_excite  # noqa: E402
from minildm.diffusion.prompt_to_prompt import word_swap  # noqa: E402
from minildm.evaluate import scene_prompts  # noqa: E402
from minildm.modules.attention_maps import AttentionMaps  # noqa: E402
from minildm.pipeline import LatentDiffusion  # noqa: E402

SCENES_RUN = common.ROOT / "runs" / "scenes"
MICRO_SCENES = common.ROOT / "lessons" / ".cache" / "micro_scenes"
STEPS = 5 if common.QUICK else 25
N_PROMPTS = 4 if common.QUICK else 48  # held-out prompts sampled for the error table
MAP_PROMPT = "a red circle on the left and a blue square on the right"


def scenes_pipeline() -> LatentDiffusion:
    if not common.QUICK and (SCENES_RUN / "ldm.pt").is_file():
        return LatentDiffusion.load(SCENES_RUN)
    if not (MICRO_SCENES / "ldm.pt").is_file():
        from dataclasses import replace

        from minildm.config import micro
        from minildm.train.autoencoder import train_autoencoder
        from minildm.train.ldm import train_ldm

        print(f"no trained scenes model in {SCENES_RUN} (python train.py --preset scenes makes one): training a "
              f"micro one into {MICRO_SCENES}")
        preset = micro()
        preset.text = replace(preset.text, max_len=16)
        images, captions = scenes.training_set(256, seed=0)
        train_autoencoder(preset, MICRO_SCENES, torch.device("cpu"), show_progress=False, images=images)
        train_ldm(preset, MICRO_SCENES, torch.device("cpu"), show_progress=False, data=(images, captions))
    return LatentDiffusion.load(MICRO_SCENES)


def verdicts(images: torch.Tensor, prompts: list[str], score_scene) -> Counter:
    return Counter(score_scene(scenes.parse_caption(p), scenes.describe_scene(x)) for x, p in zip(images, prompts))


def print_verdicts(title: str, counts: Counter) -> None:
    total = sum(counts.values())
    binding = sum(counts[k] for k in ("colours swapped", "one colour on both", "shapes swapped"))
    print(f"  {title}: both right {counts['right'] / total:.2f}, binding errors {binding / total:.2f} "
          f"(" + ", ".join(f"{k} {counts[k]}" for k in scenes.VERDICTS[1:]) + f") of {total}")


def plot_maps(pipe, out: Path) -> None:
    """Cross-attention maps of each word at each level, averaged over heads, layers and the sampling steps."""
    with AttentionMaps(pipe.unet) as maps:
        image = pipe.generate([MAP_PROMPT], STEPS, 3.0, seed=0)
    levels = maps.per_level(rows=slice(1, 2))  # the conditional half of the [uncond, cond] batch
    words = MAP_PROMPT.split()
    shown = [i for i, w in enumerate(words) if w not in ("a", "on", "the", "and")]  # content words
    fig, axes = plt.subplots(len(levels), len(shown) + 1, figsize=(1.25 * (len(shown) + 1), 1.35 * len(levels)),
                             squeeze=False)
    for r, (side, a) in enumerate(levels.items()):
        axes[r, 0].imshow(rearrange(image[0], "c h w -> h w c").numpy(), interpolation="nearest")
        axes[r, 0].set_ylabel(f"{side}x{side}", fontsize=8)
        for c, i in enumerate(shown, start=1):
            axes[r, c].imshow(a[0, i + 1].numpy(), cmap="magma", vmin=0, interpolation="nearest")  # token i+1: <s> first
            if r == 0:
                axes[r, c].set_title(words[i], fontsize=8)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f'cross-attention per word and level: "{MAP_PROMPT}"', fontsize=8)
    fig.tight_layout()
    common.save_figure(fig, out / "attention_maps.png")
    finest = levels[max(levels)][0]  # [L, h, w]
    for i in shown:
        m = finest[i + 1]
        print(f"    {words[i]:<7} share of its map on the left half {m[:, :m.shape[1] // 2].sum() / m.sum():.2f}")


def show_grid(rows: dict[str, torch.Tensor], titles: list[str], path: Path) -> None:
    cols = len(titles)
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.3 * cols, 1.4 * len(rows)), squeeze=False)
    for r, (label, images) in enumerate(rows.items()):
        for c in range(cols):
            axes[r, c].imshow(rearrange(images[c], "c h w -> h w c").numpy(), interpolation="nearest")
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
            if r == 0:
                axes[r, c].set_title(titles[c], fontsize=6)
        axes[r, 0].set_ylabel(label, fontsize=7)
    fig.tight_layout()
    common.save_figure(fig, path)


def main() -> None:
    out, fns = common.start(__file__, "lesson 18: two objects, attribute binding, attention maps and editing")
    pipe = scenes_pipeline()
    score = fns["score_scene"]
    print("  your score_scene on what a judge could read for 'a red circle on the left and a blue square on the right':")
    want = {"left": ("red", "circle"), "right": ("blue", "square")}
    for seen in ({"left": ("blue", "circle"), "right": ("red", "square")}, {"left": ("red", "circle")},
                 {"left": ("red", "circle"), "right": ("red", "square")}):
        print(f"    {seen} -> {score(want, seen)}")

    prompts = scene_prompts("held_out")[:N_PROMPTS]
    plain = pipe.generate(prompts, STEPS, 3.0, seed=0)
    print_verdicts("plain DDIM, held-out pairings", verdicts(plain, prompts, score))

    print("  cross-attention maps (figure); share of each word's finest map on the left half:")
    plot_maps(pipe, out)

    words = [[w for w in p.split() if w in scenes.SHAPES] for p in prompts]
    excited = attend_and_excite(pipe, prompts, words, STEPS, 3.0, seed=0, loss_fn=fns["excite_loss"])
    print_verdicts("Attend-and-Excite (your excite_loss), same seeds", verdicts(excited, prompts, score))
    short = [p.replace(" on the", "").replace(" and ", "\n") for p in prompts[:8]]
    show_grid({"plain": plain[:8], "A&E": excited[:8]}, short, out / "attend_and_excite.png")

    sources = prompts[:8]
    targets = [p.replace(p.split()[1], next(c for c in scenes.COLORS if c not in p.split()), 1) for p in sources]
    src, edit = word_swap(pipe, sources, targets, STEPS, seed=1, swap=fns["swap_maps"])
    _, fresh = word_swap(pipe, sources, targets, STEPS, seed=1, inject_fraction=0.0)
    print(f"  word swap (your swap_maps): source == plain sampling at seed 1: "
          f"{torch.allclose(src, pipe.generate(sources, STEPS, 3.0, seed=1), atol=1e-5)}")
    show_grid({"source": src, "swap, maps kept": edit, "swap, no maps": fresh},
              [t.replace(" on the", "").replace(" and ", "\n") for t in targets], out / "word_swap.png")
    print(f"figures in {out}: attention_maps.png attend_and_excite.png word_swap.png")


if __name__ == "__main__":
    main()
