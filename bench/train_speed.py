"""The default run, `python train.py`, against the recipe before it: wall time and prompt accuracy, several seeds.

    python bench/train_speed.py --recipes before after --seeds 0 1 2      # bench/results/train_speed.md
    python bench/train_speed.py --recipes after --seeds 3                  # one more row into the same table

Each (recipe, seed) trains in a fresh process, as `python train.py --seed S --out DIR` does (train.main with
the recipe's preset, stage by stage so that each stage is timed), the recipes taking turns (before s0, after
s0, before s1, ...) so that a slow stretch of the machine hits both alike. "wall" is that process from start
to exit, imports included, as `time python train.py` measures it. Then prompt accuracy as
`python -m minildm.evaluate` reads it (DDIM 50 steps, guidance 3, 4 samples per prompt, seed 0), on the 80 seen
and the 10 held-out prompts, and the autoencoder's summary (PSNR on held-back shapes, codes in use).

The recipes (RECIPES below):
    before       the tiny preset at commit 968ca07: autoencoder 1200 steps x 32, LDM 2000 steps x 64, naive attention
    after        the tiny preset of this commit (the same steps, the sdpa kernel in channels_last layout)
Shorter candidates that were tried as "after" (their rows carry their fingerprints): autoencoder batch 8 + LDM
1100 steps, autoencoder batch 16 + LDM 1200 steps.
Rows gather in RUNS/rows.jsonl (recipe fingerprint, commit and load average with each); the table shows them all,
an "after" row of an earlier tiny preset as "candidate <fingerprint>".
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def before():
    """The tiny preset as it was at commit 968ca07, every field this benchmark's changes touch spelled out."""
    from minildm.config import tiny
    p = tiny()
    p.vq_train = replace(p.vq_train, steps=1200, batch_size=32, lr=2e-3)
    p.unet = replace(p.unet, kernel="naive", channels_last=False)
    p.ldm = replace(p.ldm, steps=2000, batch_size=64, lr=1e-3, warmup=100, sample_every=1000, save_every=500,
                    snr_gamma=None)
    return p


def after():
    from minildm.config import tiny
    return tiny()


RECIPES = {"before": before, "after": after}


def train_one(recipe: str, seed: int, out: str) -> None:
    """The child process: train one run stage by stage, write the stage times to out/timing.json."""
    import train  # noqa: E402  (train.py at the repository root)
    times = {}
    preset = RECIPES[recipe]()
    for stage in ("autoencoder", "ldm"):
        t0 = time.time()
        code = train.main(["--stage", stage, "--out", out, "--seed", str(seed), "--overwrite"], preset=preset)
        if code:
            sys.exit(code)
        times[stage] = time.time() - t0
    Path(out, "timing.json").write_text(json.dumps(times))


def evaluate(run: Path) -> dict:
    import torch

    from minildm.checkpoint import load_checkpoint
    from minildm.evaluate import prompt_accuracy_report
    from minildm.pipeline import LatentDiffusion

    pipe = LatentDiffusion.load(run)
    with torch.no_grad():
        report = prompt_accuracy_report(pipe, steps=50, guidance_scale=3.0, n=4, seed=0, progress=False)
    summary = load_checkpoint(run / "autoencoder.pt", "autoencoder")["summary"]
    return {"seen": report["seen"]["all"], "held_out": report["held_out"]["all"], "psnr": summary["psnr"],
            "codes": summary["codes_used"]}


def spread(values: list[float], digits: int) -> str:
    """'mean (min-max)' of several seeds, the value alone for one."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", nargs="+", default=["before", "after"], choices=list(RECIPES))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--runs", default="runs/train_speed", help="where the runs go (one folder per recipe and seed)")
    p.add_argument("--name", default="train_speed", help="bench/results/NAME.md")
    p.add_argument("--one", nargs=3, metavar=("RECIPE", "SEED", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        return train_one(args.one[0], int(args.one[1]), args.one[2])

    import hashlib

    import torch

    from lesson_numbers import recipe_fingerprint
    from machine import commit, machine

    # every row lands in RUNS/rows.jsonl with its recipe's fingerprint; the table shows all rows of the file, so
    # runs of one sitting made by several invocations (e.g. more seeds of one recipe) end up side by side
    rows_file = Path(args.runs) / "rows.jsonl"
    rows_file.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    for seed in args.seeds:
        for recipe in args.recipes:
            out = Path(args.runs) / f"{recipe}_seed{seed}"
            t0 = time.time()
            subprocess.run([sys.executable, __file__, "--one", recipe, str(seed), str(out)], check=True, env=env,
                           stdout=subprocess.DEVNULL)
            wall = time.time() - t0
            stages = json.loads((out / "timing.json").read_text())
            t1 = time.time()
            scores = evaluate(out)
            fingerprint = hashlib.sha256(repr(RECIPES[recipe]()).encode()).hexdigest()[:12]
            row = {"recipe": recipe, "fingerprint": fingerprint, "seed": seed, "wall": wall, **stages, **scores,
                   "eval": time.time() - t1, "commit": commit(), "load": os.getloadavg()[0]}
            with rows_file.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)

    today = recipe_fingerprint()
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]

    def label(r: dict) -> str:  # "after" only for today's tiny preset; an earlier candidate by its fingerprint
        if r["recipe"] == "after" and r["fingerprint"] != today:
            return f"candidate {r['fingerprint']}"
        return r["recipe"]

    lines = [f"`python bench/train_speed.py --recipes ... --seeds ...` (the rows of {rows_file.as_posix()}, each with "
             f"the commit it ran at); after = the tiny preset {today}. Machine: {machine()}; each run in its own "
             f"process with torch's default {torch.get_num_threads()} thread(s).", "",
             "| recipe | seed | wall | autoencoder | ldm | PSNR | codes | seen | held-out | commit, load |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {label(r)} | {r['seed']} | {r['wall'] / 60:.2f} min | {r['autoencoder'] / 60:.2f} min | "
                     f"{r['ldm'] / 60:.2f} min | {r['psnr']:.1f} dB | {r['codes']} | {r['seen']:.3f} | "
                     f"{r['held_out']:.3f} | {r.get('commit', '?')}, {r.get('load', float('nan')):.1f} |")
    labels = list(dict.fromkeys(label(r) for r in rows))
    first = statistics.mean(r["wall"] for r in rows if label(r) == "before")
    lines += ["", "Per recipe over its seeds, mean (min-max):", "",
              "| recipe | wall | / before | seen | held-out |", "|---|---|---|---|---|"]
    for name in labels:
        rs = [r for r in rows if label(r) == name]
        lines.append(f"| {name} | {spread([r['wall'] / 60 for r in rs], 2)} min | "
                     f"{statistics.mean(r['wall'] for r in rs) / first:.2f} | {spread([r['seen'] for r in rs], 3)} | "
                     f"{spread([r['held_out'] for r in rs], 3)} |")
    out = ROOT / "bench" / "results" / f"{args.name}.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
