"""Lesson 13: LoRA. Teach a trained model a new word, "corner", with adapters of rank 1, 4 and 16, and measure
what each one costs (parameters, file size) and buys (concept accuracy), and what it does to the old prompts.

    python lessons/13_lora/lesson.py [--quick]

Figures go to lessons/13_lora/out/: first_stage.png, samples.png, rank_sweep.png, loss.png, spectrum.png.
The adapters are saved there too (lora_corner_r*.pt; try them with sample.py --lora). Your LoRALinear and
merge from exercises.py are used once you have filled them in; until then the library's are.
"""
from __future__ import annotations

import copy
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from lessons import common  # noqa: E402
from minildm.adapters.lora import LoRALinear  # noqa: E402
from minildm.checkpoint import save_checkpoint  # noqa: E402
from minildm.config import micro  # noqa: E402
from minildm.data import shapes  # noqa: E402
from minildm.data.describe import prompt_accuracy  # noqa: E402
from minildm.evaluate import generate_split  # noqa: E402
from minildm.train.lora import LoRATrainConfig, finetune_concept, lora_train_config, trainable_counts  # noqa: E402
from minildm.viz import make_grid  # noqa: E402

CONCEPT = "corner"
RANKS = (1, 4, 16)
BASE_COMBOS = shapes.SEEN[::4]  # 20 of the 80 seen combinations
SHOW = ["a red circle in the corner", "a blue square in the corner", "a green triangle in the corner",
        "a yellow circle on the left", "a purple square on the top", "a cyan triangle in the center"]


def accuracy(pipe, combos, samples: int, steps: int, concepts: tuple = ()) -> float:
    """Fraction of `samples` images per combination's prompt (DDIM, guidance 3) that describe reads right."""
    images, prompts = generate_split(pipe, combos, samples, steps=steps, progress=False)
    return prompt_accuracy(images, prompts, concepts)


@torch.no_grad()
def eps_of(pipe, prompts: list[str]) -> torch.Tensor:
    """The UNet's eps for `prompts` at one fixed noisy latent and timestep: [B, c, h, w]."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(len(prompts), *pipe.latent_shape(), generator=g)
    context, mask = pipe.encode_prompts(prompts)
    return pipe.unet(x, torch.full((len(prompts),), 500), context, mask)


def show_exercises(pipe, lora_cls, merge, tuned) -> None:
    """Your layer leaves a real projection unchanged at init; your merge keeps the fine-tuned UNet's outputs."""
    layer = next(m for name, m in pipe.unet.named_modules() if name.endswith("attn2.to_k"))
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        fresh = lora_cls(copy.deepcopy(layer), rank=4)
        print(f"  a fresh LoRALinear around a cross-attention to_k: max |change| = {(fresh(x) - layer(x)).abs().max():.1e}")
    merged = copy.deepcopy(tuned)
    prompts = SHOW[:3] + SHOW[3:]
    before = eps_of(merged, prompts)
    layers = [m for m in merged.unet.modules() if isinstance(m, LoRALinear)]
    for m in layers:
        merge(m)
    print(f"  merge on all {len(layers)} LoRA layers of the rank-4 UNet: max |eps_merged - eps| = "
          f"{(eps_of(merged, prompts) - before).abs().max():.1e} (same model, base-model cost)")


@torch.no_grad()
def first_stage_figure(pipe, out: Path) -> dict:
    """Concept images through the frozen autoencoder, D(E(x)): what any UNet adapter can reach at best."""
    rng = np.random.default_rng(0)
    rows, scores = [], {}
    for concept in shapes.CONCEPTS:
        combos = list(shapes.concept_combos(concept))
        picks = [combos[i] for i in rng.permutation(len(combos))[:6]]
        x = shapes.render_combos(picks * 8, rng, pipe.image_size)  # [48, 3, H, W] in [-1, 1]
        rec = pipe.decode(pipe.autoencoder.encode(x) * pipe.autoencoder.scale_factor)
        scores[concept] = prompt_accuracy(rec, [shapes.caption(*c) for c in picks * 8], (concept,))
        rows += [(x[:6] + 1) / 2, rec[:6]]
    grid = make_grid(torch.cat(rows), nrow=6, upscale=3)
    fig, ax = plt.subplots(figsize=(6, 6.5))
    ax.imshow(grid)
    ax.set_axis_off()
    ax.set_title("rows: concept images, then D(E(x)) through the frozen VQ-VAE\n" +
                 ", ".join(f"{c}: {s:.0%} survive" for c, s in scores.items()), fontsize=9)
    fig.tight_layout()
    common.save_figure(fig, out / "first_stage.png")
    return scores


def spectrum_figure(tuned_by_rank: dict, out: Path) -> None:
    """Singular values of Delta W = (alpha / r) B A of one cross-attention key projection, per rank."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for rank, pipe in tuned_by_rank.items():
        name, layer = next((n, m) for n, m in pipe.unet.named_modules()
                           if isinstance(m, LoRALinear) and n.endswith("attn2.to_k"))
        s = torch.linalg.svdvals(layer.delta_weight().detach())[:rank]
        ax.plot(np.arange(1, len(s) + 1), (s / s[0]).numpy(), "o-", label=f"rank {rank}")
    ax.set(xlabel="singular value index", ylabel="sigma_i / sigma_1", yscale="log",
           title=f"Delta W of {name}: a few directions carry the update")
    ax.legend(fontsize=8)
    fig.tight_layout()
    common.save_figure(fig, out / "spectrum.png")


def sweep_figures(rows: list[dict], logs: dict, out: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    ranks = [str(r["rank"]) for r in rows]
    axes[0].bar(ranks, [r["trainable"] for r in rows])
    axes[0].set(xlabel="rank r", title="trainable parameters (log)", yscale="log")
    axes[1].bar(ranks, [r["file_kb"] for r in rows], color="tab:orange")
    axes[1].set(xlabel="rank r", title="LoRA file size (KB)")
    width = 0.35
    x = np.arange(len(rows))
    axes[2].bar(x - width / 2, [r["concept"] for r in rows], width, label=f"'{CONCEPT}' prompts")
    axes[2].bar(x + width / 2, [r["seen"] for r in rows], width, label="base prompts, adapter on")
    axes[2].axhline(rows[0]["seen_base"], color="gray", ls="--", lw=1, label="base prompts, base model")
    axes[2].set(xticks=x, xticklabels=ranks, xlabel="rank r", ylim=(0, 1.05), title="prompt accuracy")
    axes[2].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    common.save_figure(fig, out / "rank_sweep.png")

    fig, ax = plt.subplots(figsize=(6, 3.4))
    for rank, log in logs.items():
        steps, values = zip(*log.history["loss"])
        smooth = np.convolve(values, np.ones(10) / 10, mode="valid")
        ax.plot(steps[len(steps) - len(smooth):], smooth, label=f"rank {rank}")
    ax.set(xlabel="step", ylabel="loss: MSE of the base's target (10-step mean)", title="LoRA fine-tuning loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    common.save_figure(fig, out / "loss.png")


def main() -> None:
    # your LoRALinear class and merge, or the library's
    out, fns = common.start(__file__, "lesson 13: LoRA", trained_model=True)
    lora_cls, merge = fns["LoRALinear"], fns["merge"]
    base = common.trained_pipeline()

    scores = first_stage_figure(base, out)
    print("  what survives the frozen autoencoder, describe(D(E(x))): " +
          ", ".join(f"{c} {s:.0%}" for c, s in scores.items()) + "  -> we teach 'corner'")

    cfg = lora_train_config(micro()) if common.QUICK else replace(LoRATrainConfig(), steps=200)
    samples, steps = (1, 10) if common.QUICK else (2, 25)
    seen_base = accuracy(base, BASE_COMBOS, samples, steps)
    rows, logs, tuned_by_rank, images = [], {}, {}, [base.generate(SHOW, steps=steps, seed=0)]
    for rank in RANKS:
        pipe = copy.deepcopy(base)
        start = time.process_time()
        state, logs[rank] = finetune_concept(pipe, CONCEPT, replace(cfg, rank=rank), show_progress=not common.QUICK)
        cpu = time.process_time() - start
        path = save_checkpoint(out / f"lora_{CONCEPT}_r{rank}.pt", "lora", {**state, "concept": CONCEPT})
        trainable, total = trainable_counts(pipe)
        rows.append({"rank": rank, "trainable": trainable, "fraction": trainable / total,
                     "file_kb": path.stat().st_size / 1e3, "cpu": cpu,
                     "concept": accuracy(pipe, shapes.concept_combos(CONCEPT), samples, steps, (CONCEPT,)),
                     "seen": accuracy(pipe, BASE_COMBOS, samples, steps), "seen_base": seen_base,
                     "delta_norm": sum(m.delta_weight().norm().item() ** 2 for m in pipe.unet.modules()
                                       if isinstance(m, LoRALinear)) ** 0.5})
        tuned_by_rank[rank] = pipe
        images.append(pipe.generate(SHOW, steps=steps, seed=0))
        r = rows[-1]
        print(f"  rank {rank:>2}: {r['trainable']:>7,} trainable ({100 * r['fraction']:.2f}%), file {r['file_kb']:.0f} KB, "
              f"{r['cpu']:.0f} s CPU | '{CONCEPT}' accuracy {r['concept']:.2f} | base prompts {r['seen']:.2f} "
              f"(base model {seen_base:.2f}) | ||Delta W||_F summed {r['delta_norm']:.2f}")

    show_exercises(base, lora_cls, merge, tuned_by_rank[4])
    grid = make_grid(torch.cat(images), nrow=len(SHOW), upscale=3)
    fig, ax = plt.subplots(figsize=(7, 5))
    ax.imshow(grid)
    ax.set_yticks([(i + 0.5) * grid.shape[0] / len(images) for i in range(len(images))],
                  ["base"] + [f"rank {r}" for r in RANKS], fontsize=8)
    ax.set_xticks([(i + 0.5) * grid.shape[1] / len(SHOW) for i in range(len(SHOW))],
                  [p.replace("a ", "").replace(" in the ", "\n").replace(" on the ", "\n") for p in SHOW], fontsize=7)
    ax.set_title(f"three prompts with the new word '{CONCEPT}', three old prompts", fontsize=9)
    fig.tight_layout()
    common.save_figure(fig, out / "samples.png")
    sweep_figures(rows, logs, out)
    spectrum_figure(tuned_by_rank, out)
    run = common.trained_run().relative_to(common.ROOT)
    print(f"figures in {out}: first_stage.png samples.png rank_sweep.png loss.png spectrum.png")
    print(f'try: python sample.py "a blue triangle in the corner" --run {run} --lora {out / "lora_corner_r4.pt"}')


if __name__ == "__main__":
    main()
