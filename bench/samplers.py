"""DDIM 10 / 25 / 50 steps against ancestral DDPM with all 1000 steps: time and prompt accuracy.

    python bench/samplers.py --run runs/tiny [--n 1]      # writes bench/results/samplers.md

Every sampler draws `n` samples for each of the 80 SEEN prompts with guidance 3 and the same seeds;
accuracy is `describe` (minildm/data/describe.py) agreeing on colour, shape and position.
"""
from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from minildm.evaluate import prompt_accuracy_report
from minildm.pipeline import LatentDiffusion

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--run", default="runs/tiny")
    p.add_argument("--n", type=int, default=1, help="samples per prompt")
    p.add_argument("--guidance", type=float, default=3.0)
    args = p.parse_args()
    pipe = LatentDiffusion.load(args.run)
    rows = []
    for sampler, steps, eta in [("ddim", 10, 0.0), ("ddim", 25, 0.0), ("ddim", 50, 0.0), ("ddim", 50, 1.0),
                                ("ddpm", 1000, 1.0)]:
        t0 = time.perf_counter()
        r = prompt_accuracy_report(pipe, steps=steps, guidance_scale=args.guidance, n=args.n, sampler=sampler, eta=eta)
        seconds = time.perf_counter() - t0
        samples = r["seen"]["samples"] + r["held_out"]["samples"]
        rows.append(f"| {sampler.upper()} | {steps} | {eta:g} | {seconds:.1f} s | {1000 * seconds / samples:.0f} ms | "
                    f"{r['seen']['all']:.3f} | {r['held_out']['all']:.3f} |")
        print(rows[-1], flush=True)
    table = "\n".join([
        f"Samplers on {args.run}: guidance {args.guidance}, {args.n} sample(s) per prompt (80 seen + 10 held-out "
        f"prompts), batch 160. Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}.",
        "",
        "| sampler | steps | eta | wall time (90 prompts) | per image | accuracy seen | accuracy held-out |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ])
    out = ROOT / "bench" / "results" / "samplers.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
