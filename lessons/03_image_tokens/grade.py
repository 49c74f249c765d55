"""Grader of lesson 03: python lessons/03_image_tokens/grade.py  (add -v for details).

Your functions are compared with minildm's VectorQuantizer (minildm/autoencoder/vqvae.py): token ids on a
codebook whose vectors have very different lengths, latents whose channel count differs from h and w, and
the gradients that reach the encoder output, the codebook and the decoder input. REFERENCE holds the
library's solutions in the exercises' signatures (the library computes them inside VectorQuantizer.forward;
lesson.py falls back to them and tests/test_lessons_graders.py checks that they pass).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from einops import rearrange  # noqa: E402

from lessons.grading import Check, main  # noqa: E402
from minildm.autoencoder.vqvae import VectorQuantizer, nearest_code_indices  # noqa: E402

B, D, H, W, K = 2, 3, 4, 5, 7


def _quantize(z: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b, _, h, w = z.shape
    indices = nearest_code_indices(rearrange(z, "b d h w -> (b h w) d"), codebook, chunk_size=4096)
    indices = rearrange(indices, "(b h w) -> b h w", b=b, h=h, w=w)
    return rearrange(F.embedding(indices, codebook), "b h w d -> b d h w"), indices  # as VectorQuantizer.lookup


REFERENCE = {
    "quantize": _quantize,
    "vq_loss": lambda z_e, z_q, beta=0.25: F.mse_loss(z_q, z_e.detach()) + beta * F.mse_loss(z_e, z_q.detach()),
    "straight_through": lambda z_e, z_q: z_e + (z_q - z_e).detach(),  # both as in VectorQuantizer.forward
}


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """z [B, D, H, W] and a codebook [K, D] whose rows have lengths from 0.2 to 3 (a dot product is not a distance)."""
    g = torch.Generator().manual_seed(seed)
    codebook = F.normalize(torch.randn(K, D, generator=g), dim=1) * torch.linspace(0.2, 3.0, K)[:, None]
    z = torch.randn(B, D, H, W, generator=g) * 1.5
    return z, codebook


def _library(z_e: torch.Tensor, codebook: torch.Tensor, beta: float = 0.25):
    """The library quantiser with this codebook: (quantizer, z_e leaf, z_q_st, loss, info)."""
    vq = VectorQuantizer(K, D, beta=beta).eval()
    with torch.no_grad():
        vq.codebook.copy_(codebook)
    z_e = z_e.clone().requires_grad_(True)
    z_q_st, loss, info = vq(z_e)
    return vq, z_e, z_q_st, loss, info


def check_quantize_indices(fn) -> None:
    z, codebook = _inputs()
    out = fn(z, codebook)
    assert isinstance(out, tuple) and len(out) == 2, "return the pair (z_q, indices)"
    _, indices = out
    expected = _library(z, codebook)[4]["indices"]
    assert indices.shape == expected.shape, f"indices: expected shape {tuple(expected.shape)}, got {tuple(indices.shape)}"
    assert indices.dtype == torch.long, f"indices: expected dtype torch.long, got {indices.dtype}"
    assert torch.equal(indices, expected), f"{int((indices != expected).sum())} of {expected.numel()} token ids differ"


def check_quantize_values(fn) -> None:
    z, codebook = _inputs(1)
    z_q, _ = fn(z, codebook)
    vq, _, z_q_st, _, info = _library(z, codebook)
    expected = vq.lookup(info["indices"]).detach()
    assert z_q.shape == expected.shape, f"z_q: expected shape {tuple(expected.shape)} (like z), got {tuple(z_q.shape)}"
    assert torch.allclose(z_q, expected, atol=1e-6), "z_q is not the codebook vectors of the nearest codes, in z's layout"


def check_quantize_gradient_reaches_codebook(fn) -> None:
    z, codebook = _inputs(2)
    codebook = codebook.clone().requires_grad_(True)
    weights = torch.randn(B, D, H, W, generator=torch.Generator().manual_seed(3))
    z_q, _ = fn(z, codebook)
    assert z_q.requires_grad, "z_q has no gradient path to the codebook"
    (z_q * weights).sum().backward()
    vq, _, _, _, info = _library(z, codebook.detach())
    (vq.lookup(info["indices"]) * weights).sum().backward()
    assert codebook.grad is not None and torch.allclose(codebook.grad, vq.codebook.grad, atol=1e-5), \
        "the gradient of z_q w.r.t. the codebook differs from the library's"


def _vq_grads(fn, beta: float, seed: int) -> None:
    z, codebook = _inputs(seed)
    vq, z_ref, _, loss_ref, info = _library(z, codebook, beta)
    loss_ref.backward()
    z_e = z.clone().requires_grad_(True)
    cb = codebook.clone().requires_grad_(True)
    z_q = rearrange(F.embedding(info["indices"], cb), "b h w d -> b d h w")
    loss = fn(z_e, z_q, beta)
    assert torch.is_tensor(loss) and loss.dim() == 0, "return a 0-dim tensor"
    assert torch.allclose(loss, loss_ref, rtol=1e-5), f"beta={beta}: expected loss {loss_ref.item():.6f}, got {loss.item():.6f}"
    loss.backward()
    assert z_e.grad is not None and torch.allclose(z_e.grad, z_ref.grad, atol=1e-7, rtol=1e-4), \
        f"beta={beta}: the gradient reaching the encoder output z_e is wrong"
    assert cb.grad is not None and torch.allclose(cb.grad, vq.codebook.grad, atol=1e-7, rtol=1e-4), \
        f"beta={beta}: the gradient reaching the codebook (through z_q) is wrong"


def check_vq_value(fn) -> None:
    z, codebook = _inputs(4)
    _, _, _, loss_ref, info = _library(z, codebook, 0.25)
    z_q = rearrange(F.embedding(info["indices"], codebook), "b h w d -> b d h w")
    loss = fn(z, z_q, 0.25)
    assert torch.is_tensor(loss) and loss.dim() == 0, "return a 0-dim tensor"
    assert torch.allclose(loss, loss_ref, rtol=1e-5), f"expected {loss_ref.item():.6f}, got {loss.item():.6f}"


def check_vq_gradients(fn) -> None:
    _vq_grads(fn, 0.25, 5)


def check_vq_beta(fn) -> None:
    _vq_grads(fn, 0.6, 6)


def check_st_value(fn) -> None:
    z, codebook = _inputs(7)
    _, _, z_q_st, _, info = _library(z, codebook)
    z_q = rearrange(F.embedding(info["indices"], codebook), "b h w d -> b d h w")
    out = fn(z, z_q)
    assert out.shape == z.shape, f"expected shape {tuple(z.shape)}, got {tuple(out.shape)}"
    assert torch.allclose(out, z_q_st.detach(), atol=1e-6), "the forward value must be the quantised latents z_q"


def check_st_gradients(fn) -> None:
    z, codebook = _inputs(8)
    z_e = z.clone().requires_grad_(True)
    cb = codebook.clone().requires_grad_(True)
    indices = _library(z, codebook)[4]["indices"]
    z_q = rearrange(F.embedding(indices, cb), "b h w d -> b d h w")
    upstream = torch.randn(B, D, H, W, generator=torch.Generator().manual_seed(9))
    (fn(z_e, z_q) * upstream).sum().backward()
    assert z_e.grad is not None and torch.allclose(z_e.grad, upstream), "d out / d z_e must be the identity"
    assert cb.grad is None or cb.grad.abs().max() == 0, "no gradient may reach the codebook through the straight-through path"


CHECKS = [
    Check("quantize", check_quantize_indices,
          "nearest means the smallest squared Euclidean distance; keep each latent vector's D channels together "
          "(the channel axis is dim 1) when you list the vectors"),
    Check("quantize", check_quantize_values,
          "z_q holds codebook rows, arranged back into z's layout [B, D, h, w]"),
    Check("quantize", check_quantize_gradient_reaches_codebook,
          "build z_q by indexing the codebook tensor itself (no detach, no no_grad), so the codebook term can move the codes"),
    Check("vq_loss", check_vq_value,
          "both terms are means of squared differences (F.mse_loss); beta multiplies only one of them"),
    Check("vq_loss", check_vq_gradients,
          "beta belongs to the commitment term, the one whose gradient reaches the encoder output z_e; the codebook "
          "term's gradient reaches only z_q. Stop-gradients decide which is which"),
    Check("vq_loss", check_vq_beta,
          "use the beta you are given, on the commitment term"),
    Check("straight_through", check_st_value,
          "in the forward pass the output equals z_q"),
    Check("straight_through", check_st_gradients,
          "in the backward pass the output must look like z_e itself: hide from autograd the part that turns z_e into z_q"),
]

if __name__ == "__main__":
    sys.exit(main(CHECKS, __file__))
