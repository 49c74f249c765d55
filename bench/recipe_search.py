"""How the tiny preset's faster recipe was chosen: each stage's variants trained and scored on their own.

    python bench/recipe_search.py autoencoder a600_lr1e-3 --seeds 0 1 2   # one variant (see VARIANTS)
    python bench/recipe_search.py ldm k1000_lr2e-3 --seeds 0               # on runs/recipe_search/ae_reference
    python bench/recipe_search.py ldm k1200 --seeds 1 --samples 8 --every 100   # + circle vs square while training
    python bench/recipe_search.py --table                                  # bench/results/recipe_search.md

autoencoder: trains the tiny VQ-VAE with the variant's settings and reads fresh renders of all 90 colour x shape
x position combinations (8 each, never seen in training) back through the round trip D(E(x)) with `describe`:
the fraction still right is a ceiling on the LDM's prompt accuracy (a colour the autoencoder confuses, the LDM
cannot draw). ldm: trains the prompt encoder + UNet with the variant's settings on one fixed autoencoder (the
reference: the tiny recipe before the speed-up, seed 0; trained first if missing) and scores prompt accuracy as
`python -m minildm.evaluate` (DDIM 50, guidance 3, --samples per prompt: 4 unless the row says) on the 80 seen
and 10 held-out prompts. --every N also scores the EMA model every N steps while it trains, on the one
distinction short runs miss (bench/results/recipe_search.md): the seen circle and square prompts, 2 samples each
(DDIM 25, guidance 3), the fraction whose shape `describe` reads right. 0.5 is a model that draws one rounded
box for both words; the loss curve does not show when (or whether) a run leaves it.
Rows gather in runs/recipe_search/rows.jsonl; --table writes them out. Times are not compared here (these
runs shared the machine): bench/train_speed.py times whole recipes side by side.
"""
from __future__ import annotations

import argparse
import functools
import json
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

RUNS = ROOT / "runs" / "recipe_search"
ROWS = RUNS / "rows.jsonl"

# variant name -> settings replaced in the stage's train config (ldm: "unet" entries go to UNetConfig)
VARIANTS = {
    "autoencoder": {
        "before": dict(steps=1200, batch_size=32, lr=2e-3),
        "a600": dict(steps=600, batch_size=32, lr=2e-3),
        "a600_lr4e-3": dict(steps=600, batch_size=32, lr=4e-3),
        "a600_lr1e-3": dict(steps=600, batch_size=32, lr=1e-3),
        "b16": dict(steps=1200, batch_size=16, lr=2e-3),
        "b16_800": dict(steps=800, batch_size=16, lr=2e-3),
        "b8": dict(steps=1200, batch_size=8, lr=2e-3),
        "b8_800": dict(steps=800, batch_size=8, lr=2e-3),
    },
    "ldm": {
        "k1000": dict(steps=1000, lr=1e-3),
        "k1000_snr5": dict(steps=1000, lr=1e-3, snr_gamma=5.0),
        "k1000_lr2e-3": dict(steps=1000, lr=2e-3),
        "k1000_lr3e-3": dict(steps=1000, lr=3e-3),
        "k1200": dict(steps=1200, lr=1e-3),
        "k1500": dict(steps=1500, lr=1e-3),
        "k2000": dict(steps=2000, lr=1e-3),  # the tiny preset's own LDM steps
        "b32_1500": dict(steps=1500, batch_size=32, lr=1e-3),
        "b32_2000": dict(steps=2000, batch_size=32, lr=1e-3),  # the preset's steps at half its batch
    },
}
FAST_UNET = dict(kernel="sdpa", channels_last=True)  # every ldm variant: the speed-up's kernel and layout


def round_trip_accuracy(run: Path) -> dict:
    """describe(D(E(x))) against the captions of 8 fresh renders of each of the 90 combinations."""
    from minildm.data import shapes
    from minildm.data.describe import attribute_accuracy
    from minildm.pipeline import load_autoencoder
    from minildm.progress import step_rng

    autoencoder = load_autoencoder(run, torch.device("cpu")).eval()
    combos = [c for c in shapes.ALL_COMBOS for _ in range(8)]
    x = shapes.render_combos(combos, step_rng(123, 0, stream=2))  # a stream no training run draws
    with torch.no_grad():
        rec = torch.cat([autoencoder.decode(autoencoder.encode(x[i:i + 256])) for i in range(0, len(x), 256)])
    return attribute_accuracy(((rec + 1) / 2).clamp(0, 1), [shapes.caption(*c) for c in combos])


def train_autoencoder_variant(name: str, seed: int) -> dict:
    from minildm.config import tiny
    from minildm.train.autoencoder import train_autoencoder

    preset = tiny()
    preset.vq_train = replace(preset.vq_train, seed=seed, image_every=0, **VARIANTS["autoencoder"][name])
    out = RUNS / f"ae_{name}_seed{seed}"
    train_autoencoder(preset, out, torch.device("cpu"), show_progress=False)
    summary = torch.load(out / "autoencoder.pt", weights_only=True)["summary"]
    return {**round_trip_accuracy(out), "psnr": summary["psnr"]}


def reference_autoencoder() -> Path:
    """The autoencoder every ldm variant trains on: the tiny recipe before the speed-up, seed 0."""
    out = RUNS / "ae_before_seed0"
    if not (out / "autoencoder.pt").is_file():
        train_autoencoder_variant("before", 0)
    return out


def circle_or_square(pipe) -> float:
    """The fraction of 2 samples of each seen circle and square prompt whose shape `describe` reads right."""
    from minildm.data import shapes
    from minildm.data.describe import attribute_accuracy
    from minildm.evaluate import generate_split

    combos = [c for c in shapes.SEEN if c[1] in ("circle", "square")]
    images, prompts = generate_split(pipe, combos, 2, steps=25, progress=False)
    return attribute_accuracy(images, prompts)["shape"]


def train_ldm_variant(name: str, seed: int, samples: int = 4, every: int = 0) -> dict:
    from minildm.config import tiny
    from minildm.evaluate import prompt_accuracy_report
    from minildm.pipeline import LatentDiffusion
    from minildm.train.ldm import train_ldm

    preset = tiny()
    preset.ldm = replace(preset.ldm, seed=seed, sample_every=every, **VARIANTS["ldm"][name])
    preset.unet = replace(preset.unet, **FAST_UNET)
    out = RUNS / f"ldm_{name}_seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(reference_autoencoder() / "autoencoder.pt", out / "autoencoder.pt")
    trajectory = {}  # step -> circle_or_square of the EMA model then

    def score(step, pipe):
        trajectory[step] = circle_or_square(pipe)

    train_ldm(preset, out, torch.device("cpu"), show_progress=False, on_sample=score if every else None)
    with torch.no_grad():
        report = prompt_accuracy_report(LatentDiffusion.load(out), n=samples, progress=False)
    return {"samples": samples, **({"circle_or_square": trajectory} if every else {}),
            **{f"{split}_{k}": report[split][k] for split in report for k in ("color", "shape", "all")}}


def write_table() -> Path:
    from machine import cpu_name

    rows = [json.loads(line) for line in ROWS.read_text().splitlines()] if ROWS.is_file() else []
    order = {(stage, name): i for stage in VARIANTS for i, name in enumerate(VARIANTS[stage])}
    rows.sort(key=lambda r: (order.get((r["stage"], r["variant"]), 99), r["seed"]))
    lines = ["`python bench/recipe_search.py STAGE VARIANT --seeds ...` for each row, then `--table` (module "
             "docstring: what each stage's score means). The rows were trained one torch thread each, two to four "
             "at a time on a 2-core machine, so their times are not compared (bench/results/train_speed.md times "
             f"the chosen recipe); {cpu_name()}, torch {torch.__version__}.", "",
             "## Autoencoder: describe(D(E(x))) of 720 fresh renders", ""]
    # per stage: its section's heading, then (column, how a row fills it) after variant, settings and seed
    sections = {
        "autoencoder": ("", [("colour", lambda r: f"{r['color']:.3f}"), ("all three", lambda r: f"{r['all']:.3f}"),
                             ("PSNR (held-back shapes)", lambda r: f"{r['psnr']:.1f} dB")]),
        "ldm": (f"## LDM on the reference autoencoder ({FAST_UNET['kernel']} kernel, channels_last): prompt "
                "accuracy on the 80 seen and 10 held-out prompts",
                [("samples per prompt", lambda r: str(r.get("samples", 4))),
                 ("seen", lambda r: f"{r['seen_all']:.3f}"), ("held-out", lambda r: f"{r['held_out_all']:.3f}"),
                 ("colour seen / held-out", lambda r: f"{r['seen_color']:.3f} / {r['held_out_color']:.3f}"),
                 ("shape seen / held-out", lambda r: f"{r['seen_shape']:.3f} / {r['held_out_shape']:.3f}"
                  if "seen_shape" in r else "-")]),
    }
    for stage, (heading, columns) in sections.items():
        if heading:
            lines += ["", heading, ""]
        lines += ["| variant | settings | seed | " + " | ".join(c for c, _ in columns) + " |",
                  "|---|---|---|" + "---|" * len(columns)]
        lines += [f"| {r['variant']} | {r['settings']} | {r['seed']} | " + " | ".join(f(r) for _, f in columns) + " |"
                  for r in rows if r["stage"] == stage]
    tracked = [r for r in rows if "circle_or_square" in r]
    if tracked:
        lines += ["", "## Circle against square while the LDM trains (`--every`): shape read right on the seen circle "
                  "and square prompts (2 samples each, DDIM 25) at each step; 0.5 draws one shape for both words", "",
                  "| variant | seed | step: shape right |", "|---|---|---|"]
        lines += [f"| {r['variant']} | {r['seed']} | "
                  + ", ".join(f"{step}: {acc:.2f}" for step, acc in r["circle_or_square"].items()) + " |"
                  for r in tracked]
    out = ROOT / "bench" / "results" / "recipe_search.md"
    out.write_text("\n".join(lines) + "\n")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stage", nargs="?", choices=list(VARIANTS))
    p.add_argument("variant", nargs="?")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--samples", type=int, default=4,
                   help="(ldm) samples per prompt; at 4 one miss moves held-out accuracy by 0.025")
    p.add_argument("--every", type=int, default=0,
                   help="(ldm) also score circle against square every N steps while training, and at the end (0: not at all)")
    p.add_argument("--table", action="store_true", help="write bench/results/recipe_search.md from the rows so far")
    args = p.parse_args()
    if args.table:
        print(f"wrote {write_table()}")
        return
    if args.stage is None or args.variant not in VARIANTS[args.stage]:
        p.error(f"give a stage and one of its variants: {json.dumps({s: list(v) for s, v in VARIANTS.items()})}")
    if args.samples < 1:
        p.error(f"--samples is the number of samples per prompt: give 1 or more, not {args.samples}.")
    if args.stage == "autoencoder":
        if args.samples != 4 or args.every:
            p.error("--samples and --every set the ldm stage's scores; the autoencoder stage reads back 8 renders of "
                    "each combination.")
        train = train_autoencoder_variant
    else:
        if args.every < 0:
            p.error(f"--every is a number of steps between scores: give 1 or more (or 0 for none), not {args.every}.")
        train = functools.partial(train_ldm_variant, samples=args.samples, every=args.every)
    RUNS.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        t0 = time.time()
        row = {"stage": args.stage, "variant": args.variant, "seed": seed,
               "settings": ", ".join(f"{k} {v:g}" for k, v in VARIANTS[args.stage][args.variant].items()),
               **train(args.variant, seed), "minutes": (time.time() - t0) / 60}
        with ROWS.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
