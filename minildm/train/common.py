"""What every training stage shares: device choice, mixed precision, a progress bar with a loss EMA,
weight EMA, Ctrl-C handling, and per-step random streams that make resumed runs see the same data."""
from __future__ import annotations

import copy
import math
import signal
from collections import defaultdict

import numpy as np
import torch
from tqdm.auto import tqdm


def pick_device(name: str = "auto") -> torch.device:
    """'auto' takes CUDA, then Apple's MPS, then the CPU; anything else is passed to torch.device."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device '{name}': use auto, cpu, cuda, cuda:N or mps.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but this machine has no CUDA GPU: use --device cpu.")
    return device


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_precision(name: str, device: torch.device) -> str:
    """'auto' -> bf16 on a CUDA GPU that has it (Ampere and newer, e.g. the RTX 3090), fp16 on older GPUs,
    fp32 elsewhere. Mixed precision runs only on CUDA: on the CPU and MPS every choice trains in fp32."""
    if name not in PRECISIONS:
        raise ValueError(f"unknown precision '{name}': use one of {', '.join(PRECISIONS)}.")
    if name != "auto":
        return name
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def autocast(device: torch.device, precision: str):
    """Mixed precision: matmuls and convolutions in bf16/fp16, reductions and norms in fp32 (torch.autocast).

    The weights, gradients and optimiser state stay fp32. A no-op unless the device is CUDA."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast("cuda", dtype=dtype, enabled=device.type == "cuda" and dtype is not None)


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """fp16 gradients underflow: scale the loss by s before backward, unscale before the step, and lower s
    whenever a gradient overflows (that step is skipped). bf16 has fp32's exponent range and needs no scaling;
    a disabled scaler passes the loss and the step through unchanged."""
    return torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and precision == "fp16")


def scaled_step(scaler: torch.amp.GradScaler, loss: torch.Tensor, opt: torch.optim.Optimizer,
                clip_params=None, max_norm: float | None = None, before_step=None) -> None:
    """backward(s * loss) -> [before_step()] -> unscale -> [clip ||g|| to max_norm] -> step (skipped on overflow)."""
    scaler.scale(loss).backward()
    if before_step is not None:
        before_step()  # e.g. averaging a module's gradients over the ranks of a distributed run
    if max_norm is not None:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(clip_params, max_norm)
    scaler.step(opt)
    scaler.update()


def adamw(params, lr: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW, fused into one kernel over all parameters where this torch has it (CPU since torch 2.4, CUDA):
    a small UNet has hundreds of parameter tensors, and the per-tensor loop costs ~15% of a CPU step."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except RuntimeError:  # an older torch or a device without the fused kernel
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def learning_rate(step: int, total: int, peak: float, warmup: int = 0) -> float:
    """Linear warm-up to `peak` over `warmup` steps, then cosine decay to 0 at step `total`.

    lr(s) = peak * (s + 1) / warmup                                     for s < warmup
    lr(s) = peak * 1/2 (1 + cos(pi (s - warmup) / (total - warmup)))   after
    Decaying to 0 lets a short run settle into a minimum instead of bouncing at the peak rate.
    """
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(step - warmup, total - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


def step_rng(seed: int, step: int, stream: int = 0) -> np.random.Generator:
    """The random stream of one training step: a resumed run draws exactly the batches it would have.

    `stream` separates independent uses of the same (seed, step): 0 training batches, 1 fixed preview
    images, 2 held-back evaluation images, 3 scale-factor estimation."""
    return np.random.default_rng((stream, seed, step))


class EMA:
    """Exponential moving average of a model's weights: theta_ema <- d * theta_ema + (1 - d) * theta.

    Sampling from the EMA weights gives smoother, better images than the last raw weights."""

    def __init__(self, model: torch.nn.Module, decay: float = 0.999):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int | None = None) -> None:
        # warm-up: average over the steps seen so far while there are fewer than 1/(1-decay) of them
        d = self.decay if step is None else min(self.decay, (1 + step) / (10 + step))
        for p_ema, p in zip(self.model.parameters(), model.parameters()):
            p_ema.lerp_(p.detach(), 1 - d)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)


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


class GracefulInterrupt:
    """Turn the first Ctrl-C into a flag so the loop can finish its step, save, and exit cleanly.

    A second Ctrl-C interrupts at once, as usual."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write("\nCtrl-C: finishing this step, saving a checkpoint, then stopping (Ctrl-C again to abort).")

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread (e.g. inside some test runners): plain KeyboardInterrupt
            self._previous = None
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False
