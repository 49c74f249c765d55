"""How good is a trained run?  python -m minildm.evaluate --run runs/tiny

Generates `n` samples for every SEEN prompt (80 combinations training saw) and every HELD_OUT prompt (10
combinations it never saw: compositional generalisation) and prints one table:

- FID-shapes: Frechet distance between the feature Gaussians of the samples and of fresh real shapes (same
  prompts, same count), seen through minildm's own shapes classifier (minildm/feature_net.py). Lower is
  better. Not Inception FID: compare it only with other FID-shapes numbers at the same number of images.
  The "real shapes" column scores a second fresh real set against the first: the floor that finite samples
  leave even for a perfect model.
- IS-shapes: exp(E KL(p(y|x) || p(y))) with the classifier's 90 classes; at most 90, higher is better.
- CLIP-T: mean cosine between the small CLIP's image and prompt embeddings (minildm/clip.py; the CLIP of
  the run, RUN/clip.pt, trained and saved there on first use). Higher is better; real shapes show the ceiling.
- prompt accuracy: the rule-based `describe` reads each sample back; it counts only when colour,
  shape and position all match the prompt. Reported separately on seen and HELD_OUT prompts.

`prompt_accuracy_report` / `format_report` give the per-attribute accuracies alone (the benchmarks use them).

A run of the scenes preset (two objects per picture, minildm/data/scenes.py) gets the binding table instead:
both objects right, and each binding error on its own, on seen and held-out pairings (`scenes_report`).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from minildm.checkpoint import CheckpointError, load_checkpoint
from minildm.clip import clip_t, load_clip
from minildm.data import scenes, shapes
from minildm.data.describe import attribute_accuracy
from minildm.feature_net import ShapesFeatureNet, embed, load_or_train_feature_net
from minildm.metrics import fid_from_features, inception_score
from minildm.pipeline import LatentDiffusion
from minildm.train.clip import train_clip_stage
from minildm.progress import step_rng

SPLIT_COMBOS = (("seen", shapes.SEEN), ("held_out", shapes.HELD_OUT))


@torch.no_grad()
def generate_split(pipe, combos, n: int, steps: int = 50, guidance_scale: float = 3.0, sampler: str = "ddim",
                   eta: float = 0.0, seed: int = 0, batch_size: int = 160, progress: bool = True,
                   desc: str = "sampling") -> tuple[torch.Tensor, list[str]]:
    """n samples of every combination's caption: (images [len(combos) * n, 3, H, W] in [0, 1], prompts).

    Image k of the prompt list is drawn with seed + k (its own generator), so the same arguments give the same
    images whatever the batch size.
    """
    prompts = [shapes.caption(*c) for c in combos for _ in range(n)]
    images = []
    batches = range(0, len(prompts), batch_size)
    for i in tqdm(batches, desc=desc, disable=not progress, leave=False):
        images.append(pipe.generate(prompts[i:i + batch_size], steps=steps, guidance_scale=guidance_scale,
                                    sampler=sampler, eta=eta, seed=seed + i).cpu())
    return torch.cat(images), prompts


def prompt_accuracy_report(pipe, steps: int = 50, guidance_scale: float = 3.0, n: int = 4, sampler: str = "ddim",
                           eta: float = 0.0, seed: int = 0, batch_size: int = 160, progress: bool = True) -> dict:
    """{"seen": {...}, "held_out": {...}} with per-attribute accuracies ("color", "shape", "position", "all")."""
    report = {}
    for split, combos in SPLIT_COMBOS:
        images, prompts = generate_split(pipe, combos, n, steps, guidance_scale, sampler, eta, seed, batch_size, progress,
                                         desc=f"sampling {split}")
        report[split] = attribute_accuracy(images, prompts)
        report[split]["samples"] = len(prompts)
    return report


def format_report(report: dict, title: str = "") -> str:
    lines = [title] if title else []
    lines += ["| prompts | samples | colour | shape | position | all three |", "|---|---|---|---|---|---|"]
    for split, r in report.items():
        lines.append(f"| {split} | {r['samples']} | {r['color']:.3f} | {r['shape']:.3f} | {r['position']:.3f} | **{r['all']:.3f}** |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# The evaluation table: FID-shapes, IS-shapes, CLIP-T, prompt accuracy
# ----------------------------------------------------------------------------------------------------------
def real_shapes(combos, n: int, seed: int = 0, stream: int = 0) -> torch.Tensor:
    """n fresh jittered renders of every combination, in the order of `generate_split`: [len * n, 3, 32, 32] in [0, 1].

    The renders come from random stream 2 of `step_rng` (held-back evaluation images), never a training batch;
    `stream` picks independent sets (0: the reference the samples are compared with, 1: a second real set).
    """
    rng = step_rng(seed, stream, stream=2)
    return (shapes.render_combos([c for c in combos for _ in range(n)], rng) + 1) / 2


def _scores(images: torch.Tensor, prompts: list[str], reference_features: torch.Tensor,
            feature_net: ShapesFeatureNet, clip=None) -> dict:
    """The table's numbers for one image set [N, 3, H, W] in [0, 1] with its N prompts (seen and held-out)."""
    features, probs = embed(feature_net, images * 2 - 1)  # the feature net reads [-1, 1], like every model
    seen = torch.tensor([shapes.parse_caption(p) in shapes.SEEN for p in prompts])  # [N] bool
    scores = {
        "images": len(images),
        "fid_shapes": fid_from_features(reference_features, features),  # FD(N(mu_r, S_r), N(mu_g, S_g))
        "is_shapes": inception_score(probs)[0],  # exp(E_x KL(p(y|x) || p(y)))
        "clip_t": None,
        "seen": attribute_accuracy(images[seen], [p for p, s in zip(prompts, seen) if s]),
        "held_out": attribute_accuracy(images[~seen], [p for p, s in zip(prompts, seen) if not s]),
    }
    if clip is not None:
        model, tokenizer = clip
        scores["clip_t"] = clip_t(model, tokenizer, images * 2 - 1, prompts)  # mean cos(I(x_i), T(y_i))
    return scores


def _reference_features(feature_net: ShapesFeatureNet, n: int, seed: int) -> torch.Tensor:
    combos = shapes.SEEN + shapes.HELD_OUT
    return embed(feature_net, real_shapes(combos, n, seed, stream=0) * 2 - 1)[0]


def real_reference(feature_net: ShapesFeatureNet, clip=None, n: int = 4, seed: int = 0) -> dict:
    """The same scores for a second set of fresh REAL shapes: FID's finite-sample floor and the ceilings of the rest."""
    combos = shapes.SEEN + shapes.HELD_OUT
    prompts = [shapes.caption(*c) for c in combos for _ in range(n)]
    return _scores(real_shapes(combos, n, seed, stream=1), prompts, _reference_features(feature_net, n, seed),
                   feature_net, clip)


def evaluation_report(pipe, feature_net: ShapesFeatureNet, clip=None, steps: int = 50, guidance_scale: float = 3.0,
                      n: int = 4, sampler: str = "ddim", eta: float = 0.0, seed: int = 0, batch_size: int = 160,
                      progress: bool = True) -> dict:
    """Sample n images per seen and held-out prompt and score them.

    clip: None (no CLIP-T) or (CLIP model, tokenizer) as returned by `minildm.clip.load_clip`.
    Returns {"images", "fid_shapes", "is_shapes", "clip_t" (None without a CLIP), "seen": {...}, "held_out": {...}}
    where "seen" and "held_out" are `attribute_accuracy` dicts ("color", "shape", "position", "all").
    """
    images, prompts = [], []
    for split, combos in SPLIT_COMBOS:
        x, p = generate_split(pipe, combos, n, steps, guidance_scale, sampler, eta, seed, batch_size, progress,
                              desc=f"sampling {split}")
        images.append(x)
        prompts += p
    return _scores(torch.cat(images), prompts, _reference_features(feature_net, n, seed), feature_net, clip)


def format_evaluation(columns: dict[str, dict], title: str = "") -> str:
    """One markdown table: a row per metric, a column per report (e.g. {"real shapes": ..., "s = 3": ...})."""
    def number(value, digits: int) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    rows = [
        ("FID-shapes (lower is better)", lambda r: number(r["fid_shapes"], 2)),
        ("IS-shapes (higher, at most 90)", lambda r: number(r["is_shapes"], 1)),
        ("CLIP-T (higher)", lambda r: number(r["clip_t"], 3)),
        (f"prompt accuracy, seen ({len(shapes.SEEN)} prompts)", lambda r: number(r["seen"]["all"], 3)),
        (f"prompt accuracy, HELD_OUT ({len(shapes.HELD_OUT)} prompts)", lambda r: number(r["held_out"]["all"], 3)),
    ]
    lines = [title] if title else []
    lines += ["| metric | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    lines += [f"| {name} | " + " | ".join(cell(r) for r in columns.values()) + " |" for name, cell in rows]
    return "\n".join(lines)


def load_judges(run: str | Path, feature_net_path: str | Path | None = None, with_clip: bool = True,
                progress: bool = True):
    """(feature net, (CLIP, tokenizer) or None) for scoring a run; each is trained and cached on first use.

    The feature net lives NEXT TO the run directories (runs/feature_net.pt for runs/tiny), so every run is
    scored by the same judge; the CLIP is the run's own clip.pt (what `python train.py --stage clip` writes).
    """
    run = Path(run)
    feature_net = load_or_train_feature_net(feature_net_path or run.parent / "feature_net.pt", progress=progress)
    if not with_clip:
        return feature_net, None
    if not (run / "clip.pt").is_file():
        print(f"no CLIP in {run}: training one for CLIP-T (python train.py --stage clip does the same)")
        train_clip_stage(run, torch.device("cpu"), show_progress=progress)
    return feature_net, load_clip(run / "clip.pt")


# ----------------------------------------------------------------------------------------------------------
# Scenes: two objects per picture
# ----------------------------------------------------------------------------------------------------------
def scene_prompts(split: str) -> list[str]:
    """The evaluation prompts of the scenes preset. held_out: all 48 scenes of the 12 held-out pairings
    (2 layouts x 2 object orders), phrase order alternating; seen: one scene per seen pairing (78), the
    layout, object order and phrase order turning with the pairing's index."""
    if split == "held_out":
        return [scenes.caption(s, swap=bool(i % 2)) for i, s in enumerate(scenes.SPLITS["held_out"])]
    if split == "seen":
        return [scenes.caption(scenes.scenes_of([pair])[k % 4], swap=bool(k // 4 % 2))
                for k, pair in enumerate(scenes.SEEN_PAIRS)]
    raise ValueError(f"unknown scenes split {split!r}: use seen or held_out.")


def scene_samples(sample, prompts: list[str], n: int = 4, batch_size: int = 96, seed: int = 0,
                  progress: bool = True) -> tuple[torch.Tensor, list[str]]:
    """n samples of every prompt by sample(prompts, seed) -> images [B, 3, H, W] in [0, 1] (e.g. pipe.generate
    or Attend-and-Excite); the batch starting at image i of the repeated prompt list uses seed + i, so image k
    draws its x_T from seed + k whatever the method and the batch size."""
    repeated = [p for p in prompts for _ in range(n)]
    batches = list(range(0, len(repeated), batch_size))
    images = [sample(repeated[i:i + batch_size], seed + i).cpu()
              for i in tqdm(batches, desc="sampling scenes", disable=not progress, leave=False)]
    return torch.cat(images), repeated


def scenes_report(sample, n: int = 4, seed: int = 0, progress: bool = True) -> dict:
    """{"seen": binding report, "held_out": binding report} (scenes.binding_report) of n samples per prompt."""
    return {split: scenes.binding_report(*scene_samples(sample, scene_prompts(split), n, seed=seed, progress=progress))
            for split in ("seen", "held_out")}


def format_scenes_report(columns: dict[str, dict], title: str = "") -> str:
    """A markdown table with a row per (split, outcome) and a column per report."""
    rows = ["right", "binding errors", "colours swapped", "one colour on both", "shapes swapped", "object missing",
            "other"]
    lines = [title] if title else []
    lines += ["| pairings | outcome | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for split in ("seen", "held_out"):
        for row in rows:
            name = "**both objects right**" if row == "right" else row
            lines.append(f"| {split} ({next(iter(columns.values()))[split]['n']} samples) | {name} | "
                         + " | ".join(f"{r[split][row]:.3f}" for r in columns.values()) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="FID-shapes, IS-shapes, CLIP-T and prompt accuracy (seen and "
                                            "held-out prompts) of a trained run.")
    p.add_argument("--run", default="runs/tiny")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--n", type=int, default=4, help="samples per prompt")
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--feature-net", default=None,
                   help="feature-net checkpoint (default: feature_net.pt next to the run, trained on first use)")
    p.add_argument("--no-clip", action="store_true", help="skip CLIP-T (no CLIP is loaded or trained)")
    args = p.parse_args(argv)
    try:
        pipe = LatentDiffusion.load(args.run)
        if load_checkpoint(Path(args.run) / "ldm.pt", "ldm").get("preset") == "scenes":  # two objects per picture
            report = scenes_report(lambda prompts, seed: pipe.generate(prompts, args.steps, args.guidance,
                                                                       args.sampler, seed=seed), args.n, args.seed)
            print(format_scenes_report({Path(args.run).name: report}, f"{args.run}: {args.sampler} {args.steps} "
                                       f"steps, guidance {args.guidance}, {args.n} samples per prompt, seed {args.seed}"))
            return 0
        feature_net, clip = load_judges(args.run, args.feature_net, with_clip=not args.no_clip)
        report = evaluation_report(pipe, feature_net, clip, args.steps, args.guidance, args.n, args.sampler,
                                   seed=args.seed)
        reference = real_reference(feature_net, clip, args.n, args.seed)
    except (ValueError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_evaluation(
        {"real shapes": reference, f"{Path(args.run).name}": report},
        f"{args.run}: {args.sampler} {args.steps} steps, guidance {args.guidance}, {args.n} samples per prompt "
        f"({report['images']} images), seed {args.seed}. FID-shapes / IS-shapes use minildm's shapes classifier: "
        "not comparable with Inception FID / IS."))
    return 0


if __name__ == "__main__":
    sys.exit(main())
