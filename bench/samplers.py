"""DDIM 10 / 25 / 50 steps against ancestral DDPM with all 1000 steps: time and prompt accuracy.

    python bench/lesson_numbers.py samplers        # on runs/tiny: bench/results/numbers/samplers.md, the README
    python bench/samplers.py --run RUN --n 4       # the same table for another run or sample count (printed)

Every sampler draws `n` samples for each of the 80 SEEN and 10 HELD_OUT prompts with guidance 3 and the same
seeds; accuracy is `describe` (minildm/data/describe.py) agreeing on colour, shape and position.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from minildm.evaluate import prompt_accuracy_report
from minildm.pipeline import LatentDiffusion

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from machine import machine  # noqa: E402  (bench/machine.py)

SAMPLERS = [("ddim", 10, 0.0), ("ddim", 25, 0.0), ("ddim", 50, 0.0), ("ddim", 50, 1.0), ("ddpm", 1000, 1.0)]


def measure(pipe, n: int = 1, guidance_scale: float = 3.0) -> str:
    """The samplers' table (markdown) for a loaded pipeline."""
    rows = []
    for sampler, steps, eta in SAMPLERS:
        t0 = time.perf_counter()
        r = prompt_accuracy_report(pipe, steps=steps, guidance_scale=guidance_scale, n=n, sampler=sampler, eta=eta,
                                   progress=False)
        seconds = time.perf_counter() - t0
        samples = r["seen"]["samples"] + r["held_out"]["samples"]
        rows.append(f"| {sampler.upper()} | {steps} | {eta:g} | {seconds:.1f} s | {1000 * seconds / samples:.0f} ms | "
                    f"{r['seen']['all']:.3f} | {r['held_out']['all']:.3f} |")
    return "\n".join([
        f"Guidance {guidance_scale:g}, {n} sample(s) per prompt (80 seen + 10 held-out prompts), batch 160. "
        f"Machine: {machine()}.",
        "",
        "| sampler | steps | eta | wall time (90 prompts) | per image | accuracy seen | accuracy held-out |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="runs/tiny")
    p.add_argument("--n", type=int, default=1, help="samples per prompt")
    p.add_argument("--guidance", type=float, default=3.0)
    args = p.parse_args()
    with torch.no_grad():
        print(measure(LatentDiffusion.load(args.run), args.n, args.guidance))


if __name__ == "__main__":
    main()
