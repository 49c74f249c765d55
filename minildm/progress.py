"""A run's bookkeeping below train/: the random stream of each step, the loss log and the progress bar.

The models' own small trainers (the CLIP judge, the feature net) and the evaluation tools use these as much
as the training stages do, so they sit here, not in train/.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
from tqdm.auto import tqdm


def step_rng(seed: int, step: int, stream: int = 0) -> np.random.Generator:
    """The random stream of one training step: a resumed run draws exactly the batches it would have.

    `stream` separates independent uses of the same (seed, step): 0 training batches, 1 fixed preview
    images, 2 held-back evaluation images, 3 scale-factor estimation."""
    return np.random.default_rng((stream, seed, step))


class LossLog:
    """Keeps every logged value (for plots) and an EMA of each (for the progress bar)."""

    def __init__(self, smoothing: float = 0.98):
        self.smoothing = smoothing
        self.history: dict[str, list[tuple[int, float]]] = defaultdict(list)
        self.ema: dict[str, float] = {}

    def add(self, step: int, **values: float) -> None:
        for k, v in values.items():
            v = float(v)
            self.history[k].append((step, v))
            self.ema[k] = v if k not in self.ema else self.smoothing * self.ema[k] + (1 - self.smoothing) * v

    def postfix(self, *keys: str) -> dict[str, str]:
        keys = keys or tuple(self.ema)
        return {k: f"{self.ema[k]:.4g}" for k in keys if k in self.ema}

    def state(self) -> dict:
        return {k: [list(p) for p in v] for k, v in self.history.items()}

    def load(self, state: dict) -> None:
        for k, v in state.items():
            self.history[k] = [(int(s), float(x)) for s, x in v]
            if v:
                self.ema[k] = float(v[-1][1])


def progress(total: int, initial: int, desc: str, enabled: bool = True):
    """A tqdm bar over training steps (it shows it/s and the ETA; we add the loss EMA as postfix)."""
    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, disable=not enabled,
                smoothing=0.05, mininterval=0.5)
