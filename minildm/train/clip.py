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

from minildm.clip import (CLIP, MAX_LOGIT_SCALE, CLIPConfig, clip_loss, clip_state, distinct_batch, shapes_tokenizer,
                          zero_shot_accuracy)
from minildm.data import shapes
from minildm.progress import LossLog, step_rng
from minildm.text.tokenizer import Tokenizer
from minildm.train.common import Checkpoint, fit
from minildm.viz import plot_curves

CLIP_STEPS = 300  # about a minute of one CPU core; zero-shot accuracy ~0.95+ on the shapes captions
CLIP_BATCH = 64  # distinct combinations per batch (at most 90)


def train_clip(steps: int = 300, batch_size: int = 64, device: str | torch.device = "cpu", seed: int = 0,
               progress: bool = True, cfg: CLIPConfig | None = None, lr: float = 2e-3, split: str = "all",
               paraphrase_prob: float = 0.25, noise_std: float = 0.1, path: Path | None = None,
               resume: bool = False) -> tuple[CLIP, Tokenizer, LossLog]:
    """Train a CLIP on shapes; returns (model in eval mode, tokenizer, LossLog with "loss" and "scale").

    Each step: a batch of distinct combinations (see `distinct_batch`), each caption in the paraphrase
    form with probability paraphrase_prob, Gaussian noise of std ~ U(0, noise_std) on each image (so the
    judge also copes with slightly noisy generated images), AdamW on `clip_loss` at a constant rate. The
    data of step k depends only on (seed, k). With a path, the "clip" checkpoint is written there (resume
    continues it). About a minute on one CPU core for the defaults.
    """
    cfg = cfg or CLIPConfig()
    torch.manual_seed(seed)
    tokenizer = shapes_tokenizer(cfg.max_len)
    model = CLIP(cfg, tokenizer.vocab_size).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)

    def loss_fn(step: int):
        rng = step_rng(seed, step)
        images, captions = distinct_batch(batch_size, rng, split, paraphrase_prob=paraphrase_prob)
        sigma = torch.from_numpy(rng.uniform(0, noise_std, size=(batch_size, 1, 1, 1))).float()
        images = images + sigma * torch.from_numpy(rng.standard_normal(images.shape)).float()  # x + sigma eps
        loss = clip_loss(*model(images.to(device), tokenizer.encode(captions).to(device)))
        return loss, {"loss": loss.item()}

    def temperature(step: int) -> dict:  # exp(s) after the step, as the bar shows it
        return {"scale": model.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp().item()}

    def load(saved: dict) -> None:
        model.load_state_dict(saved["weights"])

    model.train()
    run = fit(loss_fn, optimizer, steps, Checkpoint(path, "clip", lambda: clip_state(model, tokenizer), load,
                                                    keep_optimizer=False),
              resume=resume, desc="clip", show_progress=progress, device=device, after_step=temperature,
              postfix=("loss", "scale"))
    return model.eval(), tokenizer, run.log


def evaluate_clip(model: CLIP, tokenizer: Tokenizer, seed: int = 0, rounds: int = 2) -> float:
    """Zero-shot accuracy among all 90 captions on `rounds` x 90 fresh jittered images (each combination once per round)."""
    images, captions = [], []
    for r in range(rounds):
        x, c = distinct_batch(len(shapes.ALL_COMBOS), step_rng(seed, r, stream=2), split="all")
        images.append(x)
        captions += c
    return zero_shot_accuracy(model, tokenizer, torch.cat(images), captions)


def train_clip_stage(run_dir: str | Path, device: torch.device, steps: int | None = None,
                     batch_size: int | None = None, seed: int = 0, show_progress: bool = True,
                     resume: bool = False) -> tuple[Path, float]:
    """Train the CLIP, report its zero-shot accuracy, write RUN/clip.pt (+ clip_loss.png); -> (path, accuracy)."""
    run_dir = Path(run_dir)
    path = run_dir / "clip.pt"
    model, tokenizer, log = train_clip(steps or CLIP_STEPS, batch_size or CLIP_BATCH, device, seed, show_progress,
                                       path=path, resume=resume)
    accuracy = evaluate_clip(model, tokenizer, seed)
    plot_curves({"loss": log.history["loss"]}, run_dir / "clip_loss.png",
                title="CLIP contrastive loss (chance = log batch)")
    print(f"CLIP zero-shot accuracy among all {len(shapes.ALL_COMBOS)} captions: {accuracy:.3f} "
          f"(chance {1 / len(shapes.ALL_COMBOS):.3f}); saved {path}")
    return path, accuracy
