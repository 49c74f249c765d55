"""Cross-attention maps per prompt token and per UNet level: where the model puts each word.

In every cross-attention layer of the UNet (the `attn2` of each BasicTransformerBlock, LDM eq. 3 with
K, V from tau_theta(y)) pixel n of an h x w feature map spreads its attention over the L prompt tokens:

    M[b, head, n, l] = softmax_l( Q_n K_l^T / sqrt(d) ),      sum_l M[b, head, n, l] = 1.

Row l reshaped to [h, w] is the map of token l: which pixels read "red", which read "circle". Prompt-to-Prompt
(Hertz et al. 2022, arXiv:2208.01626) edits images by replacing these maps; Attend-and-Excite (Chefer et al.
2023, arXiv:2301.13826) differentiates through them. Both go through `AttentionMaps`, a context manager that
puts a hook on every cross-attention layer:

    with AttentionMaps(unet) as maps:
        unet(z_t, t, context, mask)
    maps.per_level()            # {8: [B, L, 8, 8], 4: [B, L, 4, 4], 2: [B, L, 2, 2]}, mean over heads and layers

The hook sees the probabilities the layer really uses (they are the `attention_probs` of the naive kernel,
whichever kernel the layer was built with), so a recorded map is the module's own attention, not a recomputation.
`LatentDiffusion.generate(return_attention=True)` records its last sampling step this way (keep_last=True).
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch
import torch.nn as nn
from einops import rearrange, reduce

Edit = Callable[[str, torch.Tensor], torch.Tensor]  # (layer name, P [B, H, N, L]) -> P' of the same shape


def cross_attention_layers(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, Attention) of every cross-attention layer of a UNet, in forward order of definition."""
    layers = [(name, m) for name, m in unet.named_modules() if name.endswith("attn2")]
    if not layers:
        raise ValueError("this network has no cross-attention layers (modules named 'attn2') to read maps from.")
    return layers


class AttentionMaps:
    """Record (and optionally replace) the cross-attention probabilities of a UNet while in the `with` block.

    records: list of (layer name, P [B, H, N, L]) in call order, one per layer per UNet forward pass.
    keep_grad: keep P in the autograd graph (Attend-and-Excite's loss is differentiated through it);
    otherwise records are detached. edit(name, P) -> P' replaces what the layer uses (Prompt-to-Prompt);
    the record is the edited map. record=False only edits (no memory grows during long sampling).
    keep_last: keep only each layer's latest P (after a whole sampling loop: its last step's maps, one per
    layer in call order), so memory does not grow with the number of steps.
    An IP-Adapter layer (minildm/adapters/ip_adapter.py) hands the hook to its text term only: L = text tokens.
    """

    def __init__(self, unet: nn.Module, keep_grad: bool = False, edit: Edit | None = None, record: bool = True,
                 keep_last: bool = False):
        self.layers = cross_attention_layers(unet)
        self.keep_grad, self.edit, self.record, self.keep_last = keep_grad, edit, record, keep_last
        self.records: list[tuple[str, torch.Tensor]] = []

    def _hook(self, name: str, module: nn.Module, probs: torch.Tensor) -> torch.Tensor:
        if self.edit is not None:
            probs = self.edit(name, probs)
        if self.record:
            if self.keep_last:  # drop this layer's older map; the list stays in the latest pass's call order
                self.records = [(n, p) for n, p in self.records if n != name]
            self.records.append((name, probs if self.keep_grad else probs.detach()))
        return probs

    def __enter__(self) -> "AttentionMaps":
        for _, m in self.layers:
            if m.probs_hook is not None:
                raise RuntimeError("a cross-attention layer already has a probs_hook: nest AttentionMaps only once.")
        for name, m in self.layers:
            m.probs_hook = partial(self._hook, name)  # the layer calls probs_hook(module, P)
        return self

    def __exit__(self, *exc) -> None:
        for _, m in self.layers:
            m.probs_hook = None

    def clear(self) -> None:
        self.records.clear()

    def per_level(self, rows: slice | torch.Tensor = slice(None)) -> dict[int, torch.Tensor]:
        """{side: maps [B', L, side, side]}: the records of each resolution averaged over heads, layers and
        calls; rows picks batch rows (e.g. the conditional half of a CFG batch). Each pixel's maps sum to 1
        over the L tokens."""
        if not self.records:
            raise ValueError("no attention maps recorded: run the UNet inside the `with AttentionMaps(...)` block.")
        by_side: dict[int, list[torch.Tensor]] = {}
        for _, probs in self.records:
            side = round(probs.shape[2] ** 0.5)
            by_side.setdefault(side, []).append(reduce(probs[rows], "b h n l -> b n l", "mean"))
        return {side: rearrange(torch.stack(ps).mean(0), "b (y x) l -> b l y x", y=side)
                for side, ps in sorted(by_side.items(), reverse=True)}
