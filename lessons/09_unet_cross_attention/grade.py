"""Grade lesson 09: python lessons/09_unet_cross_attention/grade.py  (add -v to see what differed).

timestep_embedding is compared with minildm/modules/unet.py; cross_attention with the UNet's own
cross-attention layer (an `Attention` from minildm/modules/attention.py, as attn2 in every
BasicTransformerBlock) loaded with the same weights, up to its output layer to_out.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from lessons.grading import Check, main  # noqa: E402
from minildm.modules.attention import Attention  # noqa: E402
from minildm.modules.unet import timestep_embedding  # noqa: E402


def reference_cross_attention(x, context, w_q, w_k, w_v, heads, mask=None):
    """The library's Attention layer with weights W_Q, W_K, W_V (nn.Linear stores them transposed)."""
    inner = w_q.shape[1]
    layer = Attention(x.shape[-1], context.shape[-1], heads=heads, dim_head=inner // heads)
    with torch.no_grad():
        for linear, w in ((layer.to_q, w_q), (layer.to_k, w_k), (layer.to_v, w_v)):
            linear.weight.copy_(w.T)
    kept = []

    def keep(module, probs):  # the layer's probs_hook sees the probabilities [B, heads, N, M] it uses
        kept.append(probs)
        return probs  # unchanged

    layer.probs_hook = keep
    with torch.no_grad():
        out = layer.attend(layer.to_q(x), layer.to_k(context), layer.to_v(context), mask)  # before to_out
    return out, kept[0]


REFERENCE = {"timestep_embedding": timestep_embedding, "cross_attention": reference_cross_attention}


def close(mine, ref, what: str, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    mine = torch.as_tensor(mine)
    assert mine.shape == ref.shape, f"{what}: shape {tuple(mine.shape)}, expected {tuple(ref.shape)}"
    err = (mine.double() - ref.double()).abs().max().item()
    assert torch.allclose(mine.double(), ref.double(), rtol=rtol, atol=atol), f"{what}: max abs error {err:.3g}"


# ---------------------------------------------------------------- timestep_embedding
def check_embedding_values(fn):
    t = torch.tensor([0, 1, 17, 500, 999])
    close(fn(t, 64), timestep_embedding(t, 64), "embedding of t = 0, 1, 17, 500, 999 (dim 64)", atol=1e-3)


def check_embedding_period(fn):
    t = torch.tensor([3, 40, 250])
    close(fn(t, 8, max_period=100.0), timestep_embedding(t, 8, max_period=100.0), "dim 8, max_period 100", atol=1e-4)


def check_embedding_type(fn):
    emb = fn(torch.tensor([5, 6]), 16)
    assert emb.dtype == torch.float32 and emb.shape == (2, 16), f"dtype {emb.dtype}, shape {tuple(emb.shape)}"


# ---------------------------------------------------------------- cross_attention
def weights(c: int, c_ctx: int, inner: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(c, inner, generator=g) / c**0.5, torch.randn(c_ctx, inner, generator=g) / c_ctx**0.5,
            torch.randn(c_ctx, inner, generator=g) / c_ctx**0.5)


def compare(fn, x, context, heads, mask, seed, what):
    w_q, w_k, w_v = weights(x.shape[-1], context.shape[-1], 16, seed)
    out, probs = fn(x, context, w_q, w_k, w_v, heads, mask)
    ref_out, ref_probs = reference_cross_attention(x, context, w_q, w_k, w_v, heads, mask)
    close(probs, ref_probs, f"{what}: attention weights")
    close(out, ref_out, f"{what}: output")


def check_attention_basic(fn):
    g = torch.Generator().manual_seed(0)
    x, context = 2 * torch.randn(2, 6, 8, generator=g), 2 * torch.randn(2, 5, 12, generator=g)
    compare(fn, x, context, heads=2, mask=None, seed=1, what="B=2, N=6 pixels, M=5 tokens, 2 heads")


def check_attention_heads(fn):
    g = torch.Generator().manual_seed(2)
    x, context = 2 * torch.randn(3, 4, 8, generator=g), 2 * torch.randn(3, 7, 8, generator=g)
    compare(fn, x, context, heads=4, mask=None, seed=3, what="4 heads of d = 4")


def check_attention_mask(fn):
    g = torch.Generator().manual_seed(4)
    x, context = 2 * torch.randn(2, 6, 8, generator=g), 2 * torch.randn(2, 5, 12, generator=g)
    mask = torch.tensor([[True, True, True, False, False], [True, False, False, False, False]])
    compare(fn, x, context, heads=2, mask=mask, seed=5, what="padded prompts")


CHECKS = [
    Check("timestep_embedding", check_embedding_values,
          "frequencies fall geometrically from 1 to about 1 / max_period (an exponent of -i / half); the "
          "layout is all the cosines, then all the sines."),
    Check("timestep_embedding", check_embedding_period, "use the max_period you are given."),
    Check("timestep_embedding", check_embedding_type, "return float32 [B, dim]."),
    Check("cross_attention", check_attention_basic,
          "queries come from the image tokens, keys and values from the prompt; scale the scores by "
          "1 / sqrt(d) and normalise over the prompt tokens (each query's weights sum to 1)."),
    Check("cross_attention", check_attention_heads,
          "split the inner width into heads of d = inner / heads, attend per head (scale with that d), then "
          "merge the heads back in order."),
    Check("cross_attention", check_attention_mask,
          "padding tokens (mask False) must get exactly zero weight: mask the scores before the softmax."),
]

if __name__ == "__main__":
    sys.exit(main(CHECKS, __file__))
