"""LoRA: low-rank adaptation of a frozen model (Hu et al. 2021, arXiv:2106.09685).

Fine-tuning a big pretrained UNet on a small dataset means changing millions of weights with a few thousand
examples. LoRA keeps every pretrained weight W frozen and learns only a low-rank change to it:

    W' = W + (alpha / r) * B A        A: [r, d_in], B: [d_out, r], r << min(d_in, d_out)

so a Linear with d_in * d_out weights trains only r * (d_in + d_out) numbers. `inject_lora` wraps the
attention projections (to_q, to_k, to_v, to_out) by default, the layers Stable Diffusion LoRAs adapt; the
rank is the caller's choice (the LoRA stage's recipe uses r = 8, train/lora.py).

Three details that matter:
- A starts Kaiming-uniform (like any nn.Linear; the reference loralib and peft code do this, the paper says
  "random Gaussian") and B starts at zero, so B A = 0 and a fresh adapter leaves the model's outputs exactly
  unchanged; training moves away from the pretrained model smoothly.
- The factor alpha / r: with alpha held fixed while r changes, it roughly cancels the growth of B A with r,
  so a learning rate tuned at one rank works at another (Hu et al.). alpha defaults to r here (factor 1, the
  diffusers default), which does not do that: lesson 13, section 3.
- After training, B A can be folded into W (`merge`): inference then costs exactly as much as the base
  model. The runtime `strength` (sample.py --lora-strength) turns the effect up or down without retraining.

Files: `lora_state_dict` holds only the A/B tensors plus rank, alpha, targets and layer names, so a LoRA
file is small and is applied to a base model with `load_lora`, which refuses a file made for another model.
A concept file of the LoRA stage also carries its new words (adapters/new_words.py) and is put on a loaded
pipeline with `apply_lora` / `apply_lora_file` (bottom of this file).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from minildm.adapters.new_words import add_words
from minildm.checkpoint import check_entries, load_checkpoint, save_checkpoint


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update.

    forward: x [..., d_in] -> y [..., d_out] with
        y = base(x) + (alpha / r) * strength * B(A(dropout(x)))
    lora_A.weight: [r, d_in] (Kaiming-uniform), lora_B.weight: [d_out, r] (zeros).
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None, dropout: float = 0.0):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise ValueError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}.")
        if rank < 1:
            raise ValueError(f"LoRA rank must be a positive integer, got {rank}.")
        self.base = base
        self.base.requires_grad_(False)  # W stays frozen; only A and B learn
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, **factory)  # A: [r, d_in]
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, **factory)  # B: [d_out, r]
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # same init as nn.Linear's weight
        nn.init.zeros_(self.lora_B.weight)  # B = 0  =>  B A = 0: a fresh adapter changes nothing
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self._strength = 1.0

    @property
    def strength(self) -> float:
        """Runtime strength of the adapter (1 = as trained, 0 = base model); set by sample.py --lora-strength."""
        return self._strength

    @strength.setter
    def strength(self, value: float) -> None:
        if self.merged:
            raise ValueError("cannot change the strength of a merged LoRA layer: call unmerge() first, then merge() again.")
        self._strength = float(value)

    @property
    def scaling(self) -> float:
        """The factor in front of B A: (alpha / r) * strength."""
        return self.alpha / self.rank * self.strength

    def delta_weight(self) -> torch.Tensor:
        """Delta W = (alpha / r) * strength * B A, shape [d_out, d_in] (the same shape as base.weight)."""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)  # [d_out, r] @ [r, d_in]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d_in] -> [..., d_out]."""
        y = self.base(x)  # W x + b
        if self.merged:  # W already holds W + Delta W
            return y
        return y + self.scaling * self.lora_B(self.lora_A(self.dropout(x)))  # y = W x + b + (alpha/r) s B A x

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight, W <- W + (alpha / r) * strength * B A; forward skips A and B."""
        if self.merged:
            raise ValueError("this LoRA layer is already merged: merging twice would add B A twice.")
        self.base.weight += self.delta_weight()
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge`: W <- W - (alpha / r) * strength * B A (equal to the original W up to rounding)."""
        if not self.merged:
            raise ValueError("this LoRA layer is not merged, so there is nothing to unmerge.")
        self.base.weight -= self.delta_weight()
        self.merged = False

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}, strength={self.strength:g}, merged={self.merged}"


def _target_of(name: str) -> str:
    """The attribute name a target refers to: 'attn.to_q' -> 'to_q'; 'attn.to_out.0' -> 'to_out' (to_out as a
    Sequential whose first layer is the Linear, as in some other code bases)."""
    parts = name.split(".")
    return parts[-2] if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


def _lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Qualified name -> LoRALinear for every LoRA layer in `model`."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _require_lora(model: nn.Module) -> dict[str, LoRALinear]:
    layers = _lora_layers(model)
    if not layers:
        raise ValueError("this model has no LoRA layers: call inject_lora or load_lora first.")
    return layers


def inject_lora(
    model: nn.Module,
    targets: Iterable[str] = ("to_q", "to_k", "to_v", "to_out"),
    rank: int = 4,
    alpha: float | None = None,
    dropout: float = 0.0,
    root_filter: Callable[[str], bool] | None = None,
) -> list[str]:
    """Wrap every nn.Linear named one of `targets` in a LoRALinear and freeze everything else.

    A Linear matches when its attribute name is a target (`...attn2.to_q`), or when it sits in an
    nn.Sequential whose name is a target (`...to_out.0`). `root_filter(qualified_name) -> bool`, if given,
    restricts the wrapping further, e.g. `lambda name: ".attn2." in name` for cross-attention only.
    Afterwards only the lora_A / lora_B weights have requires_grad=True.
    Returns the qualified names of the wrapped layers (e.g. "down.0.attn2.to_q").
    """
    targets = tuple(targets)
    if _lora_layers(model):
        raise ValueError("this model already has LoRA layers: load new weights with load_lora, or start from a fresh model.")
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and _target_of(name) in targets
        and (root_filter is None or root_filter(name))
    ]
    if not names:
        raise ValueError(f"inject_lora found no nn.Linear named one of {targets} in the model: check `targets`.")
    model.requires_grad_(False)  # freeze the whole pretrained model ...
    for name in names:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child_name, LoRALinear(getattr(parent, child_name), rank, alpha, dropout))  # ... new A, B train
    return names


def merge_lora(model: nn.Module) -> None:
    """Fold every LoRA update into its base weight (inference at the base model's cost)."""
    for layer in _require_lora(model).values():
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Take every merged LoRA update back out of its base weight."""
    for layer in _require_lora(model).values():
        layer.unmerge()


def set_lora_strength(model: nn.Module, lora_strength: float) -> None:
    """Set the runtime strength of every LoRA layer: W x + (alpha / r) * strength * B A x."""
    for layer in _require_lora(model).values():
        layer.strength = lora_strength


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable LoRA weights (all A and B matrices), in module order; give these to the optimizer."""
    return [p for layer in _require_lora(model).values() for p in (layer.lora_A.weight, layer.lora_B.weight)]


def lora_state_dict(model: nn.Module) -> dict:
    """The adapter alone: {"rank", "alpha", "targets", "names", "weights": {"<name>.lora_A": [r, d_in],
    "<name>.lora_B": [d_out, r]}} with detached CPU tensors and plain Python values."""
    layers = _require_lora(model)
    first = next(iter(layers.values()))
    return {
        "rank": first.rank,
        "alpha": first.alpha,
        "targets": sorted({_target_of(name) for name in layers}),
        "names": list(layers),
        "weights": {
            f"{name}.{part}": getattr(layer, part).weight.detach().cpu().clone()
            for name, layer in layers.items()
            for part in ("lora_A", "lora_B")
        },
    }


def _linear_at(model: nn.Module, name: str) -> nn.Linear | None:
    """The nn.Linear at qualified `name` (the base of a LoRALinear), or None if there is none."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return None
    module = module.base if isinstance(module, LoRALinear) else module
    return module if isinstance(module, nn.Linear) else None


def load_lora(model: nn.Module, state: dict, strict: bool = True) -> list[str]:
    """Apply a LoRA state (from `lora_state_dict` or a LoRA file) to `model`; returns the loaded layer names.

    A model without LoRA layers gets them injected first (at exactly the file's layers, rank and alpha).
    strict=True: the file's layers and the model's LoRA layers must be the same set. strict=False: layers
    present on only one side are skipped. A layer whose shapes do not fit is refused either way. Every
    check runs before the model is changed, so a refused file leaves the model as it was.
    """
    check_entries(state, ("rank", "alpha", "targets", "names", "weights"), "a LoRA state",
                  "the dict made by lora_state_dict (or a 'lora' checkpoint)")
    weights, existing = state["weights"], _lora_layers(model)
    if any(layer.merged for layer in existing.values()):
        raise ValueError("this model's LoRA layers are merged: call unmerge_lora before loading new LoRA weights.")
    usable = []
    for name in state["names"]:
        lora_A, lora_B = weights[f"{name}.lora_A"], weights[f"{name}.lora_B"]  # [r, d_in], [d_out, r]
        base = _linear_at(model, name)
        if base is None or (existing and name not in existing):
            if strict:
                raise ValueError(f"LoRA layer '{name}' of the file is not a LoRA-able nn.Linear of this model "
                                 "(or not one of its LoRA layers): the file was made for another model.")
            continue
        rank = existing[name].rank if existing else state["rank"]
        want_A, want_B = (rank, base.in_features), (base.out_features, rank)
        if tuple(lora_A.shape) != want_A or tuple(lora_B.shape) != want_B:
            raise ValueError(f"LoRA layer '{name}' has A {list(lora_A.shape)} and B {list(lora_B.shape)} in the file "
                             f"but needs A {list(want_A)} and B {list(want_B)}: the file was made for another model.")
        usable.append(name)
    missing = [name for name in existing if name not in usable]
    if strict and missing:
        raise ValueError(f"this model's LoRA layer '{missing[0]}' is not in the file: the file was made for another model.")
    if not usable:
        raise ValueError("no layer of this LoRA file exists in the model: the file was made for another model.")
    if not existing:
        keep = set(usable)
        inject_lora(model, state["targets"], state["rank"], state["alpha"], root_filter=lambda name: name in keep)
    with torch.no_grad():
        for name in usable:
            layer = model.get_submodule(name)
            layer.alpha = float(state["alpha"])
            layer.lora_A.weight.copy_(weights[f"{name}.lora_A"])
            layer.lora_B.weight.copy_(weights[f"{name}.lora_B"])
    return usable


def save_lora(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the adapter of `model` as a 'lora' checkpoint (a few hundred KB, not the whole model)."""
    return save_checkpoint(path, "lora", lora_state_dict(model))


def load_lora_file(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> list[str]:
    """Read a 'lora' checkpoint written by `save_lora` and apply it to `model` with `load_lora`."""
    return load_lora(model, load_checkpoint(path, "lora"), strict=strict)


# ----------------------------------------------------------------------------------------------------------
# A LoRA file on a loaded pipeline: LoRA weights + new words + what it was made for
# ----------------------------------------------------------------------------------------------------------
def base_fingerprint(pipe) -> float:
    """sum |theta| over the base weights of prompt encoder and UNet (float64): tells base models apart."""
    return sum(p.detach().double().abs().sum().item()
               for module in (pipe.text_encoder, pipe.unet) for name, p in module.named_parameters()
               if "lora_" not in name and "new_rows" not in name)


def adapter_state(pipe, fingerprint: float, base_words: list[str]) -> dict:
    """Everything a base run needs to use the adapter: lora_state_dict(unet) + new words and their rows."""
    return {**lora_state_dict(pipe.unet), "new_words": pipe.tokenizer.words[len(base_words):],
            "word_rows": pipe.text_encoder.token_emb.new_rows.detach().cpu().clone(),
            "base_words": list(base_words), "base_fingerprint": fingerprint}


def apply_lora(pipe, state: dict, lora_strength: float = 1.0):
    """Put an adapter (`adapter_state` or a LoRA file's contents) on a freshly loaded base pipe, in place.

    Refuses (ValueError, model unchanged) a file made for another vocabulary, architecture or base weights.
    lora_strength multiplies the LoRA update (0 = base UNet); the new words are always there.
    """
    new_words = list(state.get("new_words", []))
    if "base_words" in state and list(state["base_words"]) != pipe.tokenizer.words:
        raise ValueError("this LoRA file was made for a model with another vocabulary: use it with the base run "
                         "it was trained on (train.py --stage lora --base RUN).")
    if "base_fingerprint" in state:
        here, there = base_fingerprint(pipe), float(state["base_fingerprint"])
        if abs(here - there) > 1e-5 * abs(there):
            raise ValueError("this LoRA file was made for other base weights (same architecture, different "
                             "training): use it with the base run it was trained on.")
    if new_words and tuple(state["word_rows"].shape) != (len(new_words), pipe.text_encoder.cfg.dim):
        raise ValueError(f"the file's word rows have shape {list(state['word_rows'].shape)} but this prompt "
                         f"encoder needs [{len(new_words)}, {pipe.text_encoder.cfg.dim}]: the file was made "
                         "for another model.")
    load_lora(pipe.unet, state)  # checks every layer's shape before it changes anything
    if new_words:
        add_words(pipe, new_words, state["word_rows"])
    set_lora_strength(pipe.unet, lora_strength)
    return pipe.eval().requires_grad_(False)


def apply_lora_file(pipe, path: str | Path, lora_strength: float = 1.0):
    """Read a LoRA file written by `train_lora` (kind 'lora') and `apply_lora` it to `pipe`."""
    return apply_lora(pipe, load_checkpoint(path, "lora"), lora_strength)
