"""Grade lesson 04:  python lessons/04_clip/grade.py  (add -v for details).

Each check feeds your clip_loss inputs where a common mistake shows and compares with minildm.clip.clip_loss.
"""
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for `lessons` and `minildm`

import torch  # noqa: E402

from lessons.grading import Check, main  # noqa: E402
from minildm.clip import clip_loss as reference  # noqa: E402

REFERENCE = {"clip_loss": reference}  # the library's solution (tests/test_lessons_graders.py checks it passes)

TEMPERATURE_S = math.log(1 / 0.07)  # CLIP's initial s: logits are cosines times 1/0.07 ~ 14.3


def embeddings(batch=6, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, dim, generator=g), torch.randn(batch, dim, generator=g)


def close(a, b, tol=1e-5):
    assert torch.is_tensor(a) and a.ndim == 0, f"expected a 0-d tensor, got {a!r}"
    assert abs(a.item() - float(b)) < tol, f"got {a.item():.6f}, expected {float(b):.6f}"


def check_chance_level(fn):
    """Identical embeddings: every logit is equal, each softmax is uniform, the loss is log B."""
    for batch in (2, 5, 16):
        same = torch.ones(batch, 4)
        close(fn(same, same.clone(), TEMPERATURE_S), math.log(batch))


def check_symmetric(fn):
    """Swapping the roles of images and captions transposes the logits: the average of both directions stays."""
    images, texts = embeddings()
    close(fn(images, texts, 1.0), fn(texts, images, 1.0).item())
    close(fn(images, texts, 1.0), reference(images, texts, 1.0))


def check_temperature(fn):
    """s is a log scale: logits = exp(s) * cosine."""
    images, texts = embeddings(seed=1)
    for s in (0.0, 1.0, TEMPERATURE_S):
        close(fn(images, texts, s), reference(images, texts, s))
    close(fn(images, texts, torch.tensor(2.0)), reference(images, texts, 2.0))


def check_cosine(fn):
    """Only directions count: rescaling an embedding leaves the loss unchanged."""
    images, texts = embeddings(seed=2)
    scales = torch.tensor([[0.1], [1.0], [7.0], [0.5], [3.0], [20.0]])
    close(fn(images * scales, texts / scales, TEMPERATURE_S), reference(images, texts, TEMPERATURE_S))


def check_reference_and_gradients(fn):
    """Generic inputs against the library, and gradients reach both encoders' outputs."""
    images, texts = embeddings(batch=9, dim=5, seed=3)
    images.requires_grad_(True)
    texts.requires_grad_(True)
    loss = fn(images, texts, TEMPERATURE_S)
    close(loss, reference(images.detach(), texts.detach(), TEMPERATURE_S))
    loss.backward()
    assert images.grad is not None and texts.grad is not None, "no gradient reached the embeddings"
    ref_i, ref_t = images.detach().clone().requires_grad_(True), texts.detach().clone().requires_grad_(True)
    reference(ref_i, ref_t, TEMPERATURE_S).backward()
    assert torch.allclose(images.grad, ref_i.grad, atol=1e-5) and torch.allclose(texts.grad, ref_t.grad, atol=1e-5)


def check_temperature_gradient(fn):
    """CLIP learns s: with a tensor logit_scale the loss must pass a gradient on to it (no float(), no .item())."""
    images, texts = embeddings(batch=7, dim=6, seed=4)
    s = torch.tensor(1.5, requires_grad=True)
    fn(images, texts, s).backward()
    s_ref = torch.tensor(1.5, requires_grad=True)
    reference(images, texts, s_ref).backward()
    assert s.grad is not None, "no gradient reached logit_scale"
    assert torch.allclose(s.grad, s_ref.grad, atol=1e-5), f"d loss / d s = {s.grad.item():.5f}, expected {s_ref.grad.item():.5f}"


CHECKS = [
    Check("clip_loss", check_chance_level,
          "when all logits are equal every softmax is uniform: the loss must be log(batch), a mean over pairs"),
    Check("clip_loss", check_symmetric,
          "CLIP's loss has two cross-entropies, one per direction (images pick captions, captions pick images), "
          "averaged; each runs its softmax over a different axis of the logits"),
    Check("clip_loss", check_temperature,
          "logit_scale is s = log(1/temperature): the cosines are multiplied by exp(s), not by s"),
    Check("clip_loss", check_cosine, "the logits are cosine similarities: normalise each embedding to unit length"),
    Check("clip_loss", check_reference_and_gradients,
          "compare with the formula in the docstring; keep everything differentiable (no .detach(), .item(), numpy)"),
    Check("clip_loss", check_temperature_gradient,
          "the temperature is learnt: compute exp(s) with torch on the tensor you are given, so the gradient reaches s"),
]

if __name__ == "__main__":
    sys.exit(main(CHECKS, __file__))
