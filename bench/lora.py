"""LoRA fine-tuning on a new word: time, trainable fraction, file size, concept accuracy, and what it costs the
base prompts.

    python bench/lesson_numbers.py lesson13_lora    # on runs/tiny -> bench/results/numbers/lesson13_lora.md,
                                                    # the table lesson 13 quotes (tests check it is current)
    python bench/lora.py --base runs/tiny [--concept corner] [--rank 8] [--steps 1000] [--n 4] [--threads 2]
                                                    # the same measurement, printed: for trying other recipes

1. Prompt accuracy of the base run on the 80 SEEN prompts (and the 10 HELD_OUT ones), 4 samples each, DDIM 50,
   guidance 3 (minildm.evaluate), and on the concept prompts (the base has no such word: a reference point).
2. `train.py --stage lora` equivalent: fine-tune the adapter (wall time and process CPU time are both
   reported: the machine may be shared, CPU seconds / threads estimates the time on an idle machine).
3. The adapter file applied to a fresh copy of the base at strength 1 (as `sample.py --lora FILE` does): concept
   accuracy on every concept prompt (4 samples each, `describe` may answer the concept word) and again the
   SEEN / HELD_OUT accuracy of the base vocabulary.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: `python bench/x.py` works

from machine import cpu_name, shown  # noqa: E402  (bench/machine.py)
from minildm.adapters.lora import apply_lora_file  # noqa: E402
from minildm.checkpoint import load_checkpoint  # noqa: E402
from minildm.config import get_preset  # noqa: E402
from minildm.data import shapes  # noqa: E402
from minildm.data.describe import prompt_accuracy  # noqa: E402
from minildm.evaluate import generate_split, prompt_accuracy_report  # noqa: E402
from minildm.pipeline import LatentDiffusion  # noqa: E402
from minildm.progress import step_rng  # noqa: E402
from minildm.train.ldm import encode_latent_cache  # noqa: E402
from minildm.train.lora import (concept_prompts, first_stage_accuracy, lora_train_config, train_lora,
                                trainable_counts)  # noqa: E402


def concept_accuracy(pipe, concept: str, n: int, steps: int = 50) -> float:
    """All three attributes right on n samples of every concept prompt (DDIM `steps`, guidance 3)."""
    images, prompts = generate_split(pipe, shapes.concept_combos(concept), n, steps=steps,
                                     desc=f"sampling '{concept}'")
    return prompt_accuracy(images, prompts, (concept,))


def first_stage_ceilings(pipe, n: int = 256) -> dict[str, float]:
    """describe(D(E(x))) accuracy on n renders of every concept word: the most any adapter of the UNet can reach
    with this run's frozen autoencoder (why the default concept is "corner")."""
    ceilings = {}
    for concept in shapes.CONCEPTS:
        combos = shapes.concept_combos(concept)
        rng = step_rng(0, 0, stream=4)
        picks = [combos[i] for i in rng.integers(len(combos), size=n)]
        images = shapes.render_combos(picks, rng, pipe.image_size)  # [n, 3, H, W] in [-1, 1]
        z0 = encode_latent_cache(pipe.autoencoder, images, show_progress=False)
        ceilings[concept] = first_stage_accuracy(pipe, z0, [shapes.caption(*c) for c in picks], concept)
    return ceilings


def measure(base: str | Path, concept: str = "corner", rank: int | None = None, steps: int | None = None,
            n: int = 4, sample_steps: int = 50) -> str:
    """Fine-tune a LoRA on the run `base` (only read) and return the markdown table of its costs and accuracies.

    rank, steps: None = the preset's recipe (minildm/train/lora.py); n samples per prompt, DDIM sample_steps,
    guidance 3. The table quoted in lesson 13 uses the defaults."""
    base = Path(base)
    preset = get_preset(load_checkpoint(base / "ldm.pt", "ldm")["preset"])
    cfg = lora_train_config(preset)
    steps, rank = steps or cfg.steps, rank or cfg.rank
    threads = torch.get_num_threads()
    sampling = dict(steps=sample_steps, guidance_scale=3.0, n=n)
    load_start = os.getloadavg()[0]

    with torch.no_grad():
        pipe = LatentDiffusion.load(base)
        ceilings = first_stage_ceilings(pipe)
        before = prompt_accuracy_report(pipe, **sampling)
        concept_before = concept_accuracy(pipe, concept, n, sample_steps)
    print(f"base: seen {before['seen']['all']:.3f}, held-out {before['held_out']['all']:.3f}, "
          f"concept {concept_before:.3f}", flush=True)

    with tempfile.TemporaryDirectory() as tmp, torch.enable_grad():
        path = train_lora(preset, base, torch.device("cpu"), concept=concept, rank=rank, steps=steps,
                          out=tmp, show_progress=False)
        file_state = load_checkpoint(path, "lora")
        file_kb = path.stat().st_size / 1e3
        tuned = apply_lora_file(LatentDiffusion.load(base), path, lora_strength=1.0)
    adapter, total = trainable_counts(tuned)
    wall, cpu = file_state["train_seconds"], file_state["train_cpu_seconds"]
    with torch.no_grad():
        concept_after = concept_accuracy(tuned, concept, n, sample_steps)
        after = prompt_accuracy_report(tuned, **sampling)
    load_end = os.getloadavg()[0]

    seen_change = after["seen"]["all"] - before["seen"]["all"]
    ldm_mb = (base / "ldm.pt").stat().st_size / 1e6
    n_seen, n_held = len(shapes.SEEN), len(shapes.HELD_OUT)
    rows = [
        ("fine-tuning steps x batch", f"{steps} x {cfg.batch_size} (half concept, half base prompts), lr {cfg.lr:g}"),
        ("fine-tuning time", f"{wall:.0f} s wall, {cpu:.0f} s CPU with {threads} torch thread(s): on 2 idle "
                             + (f"cores ~{cpu / 2:.0f} s" if threads == 2 else
                                f"cores between {cpu / 2:.0f} s (perfect 2-thread scaling) and {cpu:.0f} s (one thread)")),
        ("trainable parameters", f"{adapter:,} of {total:,} = **{100 * adapter / total:.2f}%** "
                                 f"(LoRA A, B on {len(file_state['names'])} UNet projections + 1 word row)"),
        ("LoRA file", f"{file_kb:.0f} KB, against {4 * (total - adapter) / 1e6:.1f} MB of base weights "
                      f"(ldm.pt with EMA and optimizer state: {ldm_mb:.1f} MB)"),
        ("first stage round trip, describe(D(E(x))) of concept images (the ceiling)",
         ", ".join(f"{'**' if c == concept else ''}{c} {a:.3f}{'**' if c == concept else ''}"
                   for c, a in ceilings.items())),
        (f"concept accuracy ({len(concept_prompts(concept))} prompts x {n})",
         f"{concept_before:.3f} base -> **{concept_after:.3f}** with the adapter"),
        (f"seen accuracy ({n_seen} prompts x {n})",
         f"{before['seen']['all']:.3f} base -> **{after['seen']['all']:.3f}** with the adapter "
         f"(change {seen_change:+.3f})"),
        (f"held-out accuracy ({n_held} prompts x {n})",
         f"{before['held_out']['all']:.3f} base -> {after['held_out']['all']:.3f} with the adapter"),
    ]
    return "\n".join([
        f"LoRA on `{shown(base)}` (preset {preset.name}), concept '{concept}' "
        f"(e.g. \"{concept_prompts(concept)[0]}\"), rank {rank}, alpha {file_state['alpha']:g}; "
        f"sampling: DDIM {sample_steps} steps, guidance 3, {n} samples per prompt, adapter strength 1.",
        f"Machine: {cpu_name()}, {os.cpu_count()} cores, {threads} torch thread(s), torch {torch.__version__}; "
        f"load average {load_start:.1f} at the start, {load_end:.1f} at the end (shared machine).",
        "",
        "| measure | result |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in rows],
    ])


def main() -> None:
    p = argparse.ArgumentParser(description="LoRA on a trained run, printed (the quoted table: "
                                            "python bench/lesson_numbers.py lesson13_lora).")
    p.add_argument("--base", default="runs/tiny")
    p.add_argument("--concept", default="corner")
    p.add_argument("--rank", type=int, default=None, help="adapter rank (default: the preset's recipe)")
    p.add_argument("--steps", type=int, default=None, help="fine-tuning steps (default: the preset's recipe)")
    p.add_argument("--n", type=int, default=4, help="samples per prompt")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if not (Path(args.base) / "ldm.pt").is_file():
        p.error(f"no trained model in {args.base}: run `python train.py` first.")
    torch.set_num_threads(args.threads)
    print(measure(args.base, args.concept, args.rank, args.steps, args.n))


if __name__ == "__main__":
    start = time.time()
    main()
    print(f"(bench took {(time.time() - start) / 60:.1f} min)")
