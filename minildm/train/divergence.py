"""Stop a training that diverged, with one sentence, before it saves anything.

A learning rate far too high sends the weights to inf / NaN within a few steps; saved, they would replace a
good checkpoint, the next stage would train on NaN latents and sampling would draw blank images. So every
step's loss is checked: not finite, or 10^4 times its first value (a loss of 1e28 is finite and as lost),
raises DivergenceError naming the stage, the step and what to try. Nothing is saved after that, so the last
checkpoint written before it stays (checkpoint.save_checkpoint refuses non-finite weights as a last guard).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch


class DivergenceError(ValueError):
    """A training diverged (the message names the stage, the step and what to try)."""


class DivergenceCheck:
    """check(step, loss): raises DivergenceError once the loss is not finite or > factor x the first loss."""

    def __init__(self, stage: str, checkpoint: str | Path | None = None, factor: float = 1e4,
                 hint: str = "a lower learning rate (--lr-scale 0.3)"):
        self.stage, self.checkpoint, self.factor, self.hint = stage, checkpoint, factor, hint
        self.first: float | None = None

    def __call__(self, step: int, loss: torch.Tensor | float) -> None:
        value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        if math.isfinite(value) and self.first is None:
            self.first = max(abs(value), 1e-8)
        if math.isfinite(value) and abs(value) <= self.factor * self.first:
            return
        why = f"the loss became {value:.3g}" + (f", over {self.factor:.0e} x its first value {self.first:.3g}"
                                                 if math.isfinite(value) else "")
        path = Path(self.checkpoint) if self.checkpoint else None
        if path is not None and path.is_file():
            what = (f"{path.name} keeps the last checkpoint saved before it: try {self.hint} with --resume (from "
                    "that checkpoint) or --overwrite (from scratch).")
        else:
            what = f"nothing of this stage was saved: try {self.hint}."
        raise DivergenceError(f"the {self.stage} training diverged at step {step} ({why}); {what}")
