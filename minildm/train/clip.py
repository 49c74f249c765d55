"""Stage "clip": train the small CLIP of minildm/clip.py and store it in the run as clip.pt.

The CLIP is a judge and an image encoder, not part of the text-to-image model: IP-Adapter reads its image
embedding, and the benchmarks score images with it (CLIP-T, CLIP-I). Its report card is zero-shot
classification: an image counts as right when, among ALL 90 shapes captions, its own caption is the most
similar one (chance: 1/90). The evaluation images are fresh jittered renders (random stream 2 of
`step_rng`, never a training batch).
"""
from __future__ import annotations

from pathlib import Path

import torch

from minildm.clip import CLIP, distinct_batch, save_clip, train_clip, zero_shot_accuracy
from minildm.data import shapes
from minildm.text.tokenizer import Tokenizer
from minildm.train.common import step_rng
from minildm.viz import plot_curves

CLIP_STEPS = 300  # about a minute of one CPU core; zero-shot accuracy ~0.95+ on the shapes captions
CLIP_BATCH = 64  # distinct combinations per batch (at most 90)


def evaluate_clip(model: CLIP, tokenizer: Tokenizer, seed: int = 0, rounds: int = 2) -> float:
    """Zero-shot accuracy among all 90 captions on `rounds` x 90 fresh jittered images (each combination once per round)."""
    images, captions = [], []
    for r in range(rounds):
        x, c = distinct_batch(len(shapes.ALL_COMBOS), step_rng(seed, r, stream=2), split="all")
        images.append(x)
        captions += c
    return zero_shot_accuracy(model, tokenizer, torch.cat(images), captions)


def train_clip_stage(run_dir: str | Path, device: torch.device, steps: int | None = None,
                     batch_size: int | None = None, seed: int = 0, show_progress: bool = True) -> tuple[Path, float]:
    """Train the CLIP, report its zero-shot accuracy, write RUN/clip.pt (+ clip_loss.png); -> (path, accuracy)."""
    run_dir = Path(run_dir)
    model, tokenizer, log = train_clip(steps or CLIP_STEPS, batch_size or CLIP_BATCH, device, seed, show_progress)
    accuracy = evaluate_clip(model, tokenizer, seed)
    path = save_clip(run_dir / "clip.pt", model, tokenizer)
    plot_curves({"loss": log.history["loss"]}, run_dir / "clip_loss.png",
                title="CLIP contrastive loss (chance = log batch)")
    print(f"CLIP zero-shot accuracy among all {len(shapes.ALL_COMBOS)} captions: {accuracy:.3f} "
          f"(chance {1 / len(shapes.ALL_COMBOS):.3f}); saved {path}")
    return path, accuracy
