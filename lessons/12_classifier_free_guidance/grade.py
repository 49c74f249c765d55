"""Grade lesson 12: python lessons/12_classifier_free_guidance/grade.py  (add -v to see what differed).

Compared with minildm/diffusion/guidance.py: drop_prompt against drop_tokens (same random draw, so the
same rows are dropped), guided_eps against guided_eps.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from lessons.grading import Check, main  # noqa: E402
from minildm.diffusion import guidance  # noqa: E402

REFERENCE = {"drop_prompt": guidance.drop_tokens, "guided_eps": guidance.guided_eps}

L = 8
EMPTY = torch.tensor([[2, 0, 0, 0, 0, 0, 0, 0]])  # <s> then padding


def captions(batch: int, seed: int) -> torch.Tensor:
    """Random encoded captions [batch, L]: <s>, 3..6 words (ids 3..30), padding."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(batch, L, dtype=torch.long)
    tokens[:, 0] = 2
    lengths = torch.randint(3, 7, (batch,), generator=g)
    for i, n in enumerate(lengths.tolist()):
        tokens[i, 1:1 + n] = torch.randint(3, 31, (n,), generator=g)
    return tokens


# ---------------------------------------------------------------- drop_prompt
def check_drop_replay(fn):
    tokens = captions(16, seed=0)
    for p, seed in ((0.3, 1), (0.6, 2)):
        mine = fn(tokens, EMPTY, p, torch.Generator().manual_seed(seed))
        ref = guidance.drop_tokens(tokens, EMPTY, p, torch.Generator().manual_seed(seed))
        assert torch.equal(torch.as_tensor(mine), ref), f"p = {p}: rows dropped {(mine == EMPTY).all(1).tolist()}, " \
                                                        f"expected {(ref == EMPTY).all(1).tolist()}"


def check_drop_extremes(fn):
    tokens = captions(12, seed=3)
    before = tokens.clone()
    kept = fn(tokens, EMPTY, 0.0, torch.Generator().manual_seed(4))
    dropped = fn(tokens, EMPTY, 1.0, torch.Generator().manual_seed(5))
    assert torch.equal(tokens, before), "tokens were modified in place"
    assert torch.equal(kept, tokens), "p = 0 must keep every caption"
    assert torch.equal(dropped, EMPTY.expand(12, L)), "p = 1 must turn every caption into the empty prompt (<s> first)"


def check_drop_rate(fn):
    tokens = captions(4000, seed=6)
    out = fn(tokens, EMPTY, 0.1, torch.Generator().manual_seed(7))
    is_empty, is_kept = (out == EMPTY).all(dim=1), (out == tokens).all(dim=1)
    assert (is_empty | is_kept).all(), "every row must be its caption or the whole empty prompt"
    assert 0.08 <= is_empty.float().mean() <= 0.12, f"p = 0.1 dropped {is_empty.float().mean():.3f} of the captions"


# ---------------------------------------------------------------- guided_eps
def check_guided_values(fn):
    g = torch.Generator().manual_seed(8)
    eps_u, eps_c = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    for s in (1.5, 3.0, 7.5):
        mine, ref = fn(eps_u, eps_c, s), guidance.guided_eps(eps_u, eps_c, s)
        assert torch.allclose(mine, ref, atol=1e-5), f"s = {s}: max abs error {(mine - ref).abs().max():.3g}"


def check_guided_ends(fn):
    g = torch.Generator().manual_seed(9)
    eps_u, eps_c = torch.randn(2, 5, generator=g), torch.randn(2, 5, generator=g)
    assert torch.allclose(fn(eps_u, eps_c, 1.0), eps_c, atol=1e-6), "s = 1 must give the conditional eps_c"
    assert torch.allclose(fn(eps_u, eps_c, 0.0), eps_u, atol=1e-6), "s = 0 must give the unconditional eps_u"


CHECKS = [
    Check("drop_prompt", check_drop_replay,
          "one uniform draw per caption; drop where the draw is below p; a dropped row becomes the whole empty "
          "prompt."),
    Check("drop_prompt", check_drop_extremes,
          "p = 0 keeps all, p = 1 drops all; the empty prompt still starts with <s>; return a new tensor."),
    Check("drop_prompt", check_drop_rate, "about a fraction p of the captions should be dropped, whole rows at a time."),
    Check("guided_eps", check_guided_values,
          "start from the unconditional estimate and move s times the difference towards (and past) the "
          "conditional one."),
    Check("guided_eps", check_guided_ends, "in this convention s = 1 is the plain conditional model (not s = 0)."),
]

if __name__ == "__main__":
    sys.exit(main(CHECKS, __file__))
