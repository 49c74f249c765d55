"""The one training loop every stage runs, and what it needs: mixed precision, the learning-rate schedule,
weight EMA, Ctrl-C handling, checkpoints that resume.

A stage builds its models, its optimiser and a `loss_fn(step) -> (loss, logs)` that draws step `step`'s batch
from `step_rng` (so a resumed run sees exactly the batches it would have), then calls `fit`:

    run = fit(loss_fn, opt, steps, Checkpoint(path, kind, weights, load), lr=peak, warmup=..., resume=...)

and `fit` does the rest the same way for every stage: the progress bar with the loss EMA, the schedule
(each parameter group at its `lr_scale` times the schedule of its own peak), backward and step (gradient
scaling and clipping), the weight EMA, the checkpoint cadence, Ctrl-C (finish or drop the step, save, stop),
--resume (weights, optimiser, log and step back from the checkpoint), and divergence (a NaN or exploding
loss stops the run with one sentence before anything is saved, train/divergence.py).
"""
from __future__ import annotations

import copy
import math
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from minildm.checkpoint import load_checkpoint, save_checkpoint
from minildm.progress import LossLog, progress
from minildm.train import distributed
from minildm.train.divergence import DivergenceCheck

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


class EMA:
    """Exponential moving average of a model's weights: theta_ema <- d * theta_ema + (1 - d) * theta.

    Sampling from the EMA weights gives smoother, better images than the last raw weights."""

    def __init__(self, model: torch.nn.Module, decay: float = 0.999):
        self.decay = decay
        self.source = model  # the trained model the average follows
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int | None = None) -> None:
        # warm-up: average over the steps seen so far while there are fewer than 1/(1-decay) of them
        d = self.decay if step is None else min(self.decay, (1 + step) / (10 + step))
        # theta_ema <- theta_ema + (1 - d) (theta - theta_ema), all tensors in one call (the per-tensor loop
        # cost ~2% of a tiny-preset LDM step)
        torch._foreach_lerp_(list(self.model.parameters()), [p.detach() for p in model.parameters()], 1 - d)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)


_last_fit_interrupted = False  # whether Ctrl-C stopped the latest `fit` of this process


def stop_requested() -> bool:
    """True when Ctrl-C stopped the latest training loop (`fit`): train.py then ends the command instead of
    starting the next stage on a half-trained one (the IP-Adapter stage checks it after training its CLIP)."""
    return _last_fit_interrupted


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


@dataclass
class Checkpoint:
    """Where a stage's training state goes, and how its weights come out of the models and back in.

    weights() -> the stage's own entries (state_dicts, configs, tokenizer, ...); the loop adds "optimizer",
    "step" and "log". load(saved) puts a saved file's weights back (--resume). path None: nothing is saved.
    keep_optimizer False: a finished file leaves out the optimiser state (small adapter files to share; a run
    stopped early keeps it, so that it resumes exactly)."""
    path: Path | None
    kind: str
    weights: Callable[[], dict]
    load: Callable[[dict], None] | None = None
    every: int = 0  # also save every this many steps (0: at the end and on Ctrl-C only)
    keep_optimizer: bool = True


@dataclass
class Run:
    """What `fit` hands back: the step reached, the loss log, whether Ctrl-C stopped it, and its save()."""
    step: int
    log: LossLog
    interrupted: bool
    save: Callable[..., Path | None]

    @property
    def finished(self) -> bool:
        return not self.interrupted


def fit(loss_fn: Callable[[int], tuple[torch.Tensor, dict]], opt: torch.optim.Optimizer, steps: int,
        ckpt: Checkpoint, *, lr: float | None = None, warmup: int = 0, resume: bool = False, desc: str = "",
        show_progress: bool = True, device: torch.device | str = "cpu", scaler: torch.amp.GradScaler | None = None,
        max_norm: float | None = None, ema: EMA | None = None, after_step: Callable[[int], dict] | None = None,
        on_step: Callable[[int], None] | None = None, check: Callable[[int, torch.Tensor], None] | None = None,
        finish: Callable[[int], dict] | None = None, log_every: int = 1, postfix: tuple[str, ...] = ()) -> Run:
    """Train for `steps` steps of `loss_fn(step) -> (loss, {name: float})`; -> Run.

    Each step: loss_fn -> check(step, loss) -> lr of every group -> zero_grad -> backward (scaled) -> [clip the
    gradients of all the optimiser's parameters to max_norm] -> step -> after_step(step) (a second update, e.g.
    the discriminator's; its logs join the step's) -> ema.update -> log -> on_step(step + 1) (previews) ->
    save every ckpt.every steps.
    lr: the peak of the schedule (linear warm-up over `warmup` steps, then cosine to 0 at `steps`); a group with
    its own "peak_lr" uses that, and one with "lr_scale" s trains at s times it; None leaves the rates alone.
    check: the place for a stage's own test on the loss of every step (raise to stop the run); every stage
    already stops on a loss that is not finite or explodes (train/divergence.py), before the step.
    finish(step): called after the last step; its entries join the last save (e.g. the autoencoder's scale factor).
    """
    global _last_fit_interrupted
    _last_fit_interrupted = False
    log, step = LossLog(), 0
    if resume and ckpt.path is not None and ckpt.path.is_file():
        saved = load_checkpoint(ckpt.path, ckpt.kind)
        if ckpt.load is not None:
            ckpt.load(saved)
        opt.load_state_dict(saved["optimizer"])
        log.load(saved["log"])
        step = saved["step"]
    scaler = scaler or torch.amp.GradScaler("cuda", enabled=False)  # disabled: backward and step pass through
    clip_params = [p for group in opt.param_groups for p in group["params"]] if max_norm is not None else None

    def save(**extra) -> Path | None:
        """The one place a stage's checkpoint is written: weights + optimiser + step + log (+ extra entries)."""
        entries = ckpt.weights()  # on every rank: it may check that the replicas agree
        if ckpt.path is None or not distributed.is_main():
            return ckpt.path
        if ckpt.keep_optimizer or step < steps:
            entries["optimizer"] = opt.state_dict()
        return save_checkpoint(ckpt.path, ckpt.kind, {**entries, "step": step, "log": log.state(), **extra})

    interrupted = False
    diverged = DivergenceCheck(desc or ckpt.kind, ckpt.path)
    bar = progress(steps, step, desc, show_progress and distributed.is_main())
    # enable_grad: a training loop trains even when its caller sampled under torch.no_grad() (e.g. a benchmark
    # that measures a model, then trains an adapter on it)
    with GracefulInterrupt() as interrupt, torch.enable_grad():
        while step < steps and not distributed.any_rank(interrupt.requested, device):
            try:
                loss, logs = loss_fn(step)
            except KeyboardInterrupt:  # Ctrl-C without our handler (not the main thread): drop this step
                interrupt.requested = True
                continue
            diverged(step, loss)  # a NaN or exploding loss stops the run before it reaches the weights
            if check is not None:
                check(step, loss)
            if lr is not None:
                for group in opt.param_groups:
                    peak = group.get("peak_lr", lr)
                    group["lr"] = group.get("lr_scale", 1.0) * learning_rate(step, steps, peak, warmup)
            opt.zero_grad(set_to_none=True)
            scaled_step(scaler, loss, opt, clip_params, max_norm)
            if after_step is not None:
                logs = {**logs, **after_step(step)}
            if ema is not None:
                ema.update(ema.source, step)
            step += 1
            if step % log_every == 0 or step == steps:
                log.add(step, **logs)
                # refresh=False: the bar redraws at its own pace (progress.py), not on every step (a forced redraw
                # cost ~1-3 ms a step, ~1-2% of a tiny-preset LDM step)
                bar.set_postfix(log.postfix(*postfix), refresh=False)
            bar.update(1)
            if on_step is not None:
                on_step(step)
            if ckpt.every and step % ckpt.every == 0 and step < steps:  # the last step's save follows the loop
                save()
        interrupted = interrupt.requested
    bar.close()
    _last_fit_interrupted = interrupted
    save(**(finish(step) if finish is not None else {}))
    if interrupted:
        tqdm.write(f"{desc}: stopped at step {step}; the checkpoint is saved" +
                   ("; --resume continues." if ckpt.path is not None else "."))
    return Run(step, log, interrupted, save)
