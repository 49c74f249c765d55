"""Grade lesson 18: python lessons/18_binding/grade.py  (add -v to see what differed).

Compared with the library: score_scene with minildm/data/scenes.py, excite_loss with
minildm/diffusion/attend_excite.py, swap_maps with minildm/diffusion/prompt_to_prompt.py.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from lessons.grading import Check, main  # noqa: E402
from minildm.data import scenes  # noqa: E402
from minildm.diffusion import attend_excite, prompt_to_prompt  # noqa: E402

REFERENCE = {"score_scene": scenes.score_scene, "excite_loss": attend_excite.excite_loss,
             "swap_maps": prompt_to_prompt.swap_maps}

RC, BS = ("red", "circle"), ("blue", "square")
WANT = {"left": RC, "right": BS}


# ---------------------------------------------------------------- score_scene
def check_score_named_errors(fn):
    cases = [
        ({"left": RC, "right": BS}, "right"),
        ({"left": ("blue", "circle"), "right": ("red", "square")}, "colours swapped"),
        ({"left": RC, "right": ("red", "square")}, "one colour on both"),
        ({"left": ("blue", "circle"), "right": BS}, "one colour on both"),
        ({"left": ("red", "square"), "right": ("blue", "circle")}, "shapes swapped"),
    ]
    for seen, verdict in cases:
        assert fn(WANT, seen) == verdict, f"{seen}: got {fn(WANT, seen)!r}, expected {verdict!r}"


def check_score_positions(fn):
    cases = [
        ({"left": RC}, "object missing"),
        ({}, "object missing"),
        ({"left": RC, "top": BS}, "object missing"),  # the blue square is drawn, but not where asked
        ({"left": BS, "right": RC}, "other"),  # each object at the other's place: not a colour or shape swap
    ]
    for seen, verdict in cases:
        assert fn(WANT, seen) == verdict, f"{seen}: got {fn(WANT, seen)!r}, expected {verdict!r}"


def check_score_other(fn):
    cases = [
        ({"left": RC, "right": ("green", "square")}, "other"),  # a colour from outside the prompt
        ({"left": ("green", "circle"), "right": ("green", "square")}, "other"),  # one colour on both, not the prompt's
        ({"left": ("blue", "circle"), "right": ("red", "triangle")}, "other"),  # colours swapped AND a wrong shape
        ({"left": RC, "right": ("blue", "circle")}, "other"),  # one shape on both
    ]
    for seen, verdict in cases:
        assert fn(WANT, seen) == verdict, f"{seen}: got {fn(WANT, seen)!r}, expected {verdict!r}"


# ---------------------------------------------------------------- excite_loss
def check_excite_values(fn):
    g = torch.Generator().manual_seed(0)
    maps = torch.softmax(torch.randn(3, 2, 8, 8, generator=g) * 3, dim=-1)
    for sigma in (0.0, 0.5):
        mine, ref = fn(maps, sigma), attend_excite.excite_loss(maps, sigma)
        assert torch.allclose(mine, ref, atol=1e-5), f"sigma = {sigma}: {mine.tolist()} vs {ref.tolist()}"


def check_excite_weakest_token(fn):
    maps = torch.zeros(1, 3, 4, 4)
    maps[0, 0, 0, 0], maps[0, 1, 3, 3], maps[0, 2, 1, 2] = 0.9, 0.2, 0.6
    maps[0, 1] += 0.05  # token 1: a low, flat map with one bump
    out = fn(maps, 0.0)
    assert torch.allclose(out, torch.tensor([0.75])), f"got {out.tolist()}, the weakest peak is 0.25"


def check_excite_smoothing(fn):
    peak = torch.zeros(1, 1, 5, 5)
    peak[0, 0, 2, 2] = 1.0
    out, ref = fn(peak, 0.5), attend_excite.excite_loss(peak, 0.5)
    assert torch.allclose(out, ref, atol=1e-5), f"a lone peak after smoothing: {out.tolist()} vs {ref.tolist()}"


# ---------------------------------------------------------------- swap_maps
def probs(rows: int) -> torch.Tensor:
    return torch.softmax(torch.randn(rows, 2, 4, 6, generator=torch.Generator().manual_seed(rows)), dim=-1)


def check_swap_guided(fn):
    n = 3
    p = probs(4 * n)
    before = p.clone()
    out = fn(p, n)
    assert torch.equal(p, before), "probs was modified in place: return a new tensor"
    ref = prompt_to_prompt.swap_maps(p, n)
    assert torch.equal(out[3 * n:], p[2 * n:3 * n]), "the edited prompts' conditional maps must be the sources' ones"
    assert torch.equal(out, ref), "only the conditional edit rows change; the unconditional half stays"


def check_swap_unguided(fn):
    n = 2
    p = probs(2 * n)
    out = fn(p, n)
    assert torch.equal(out, prompt_to_prompt.swap_maps(p, n)), "without guidance the batch is [sources; edits]"


CHECKS = [
    Check("score_scene", check_score_named_errors,
          "compare position by position: swapped means each object carries the OTHER object's colour (or shape)."),
    Check("score_scene", check_score_positions,
          "an object counts only at the position the prompt named; a missing position comes first."),
    Check("score_scene", check_score_other,
          "a named error needs everything else right; one colour on both must be one of the prompt's colours."),
    Check("excite_loss", check_excite_values, "smooth each map, take its peak, then look at the weakest token."),
    Check("excite_loss", check_excite_weakest_token,
          "the loss is set by the token whose PEAK is lowest (max over pixels, then max of 1 - peak over tokens)."),
    Check("excite_loss", check_excite_smoothing, "read the peak of the smoothed map, not of the raw one."),
    Check("swap_maps", check_swap_guided,
          "under guidance the rows are [uncond src, uncond edit, cond src, cond edit]: copy cond src onto cond edit."),
    Check("swap_maps", check_swap_unguided, "with 2n rows there is no unconditional half."),
]

if __name__ == "__main__":
    sys.exit(main(CHECKS, __file__))
