"""bench/attribute_gaps.py's gap: the mean, over pairs of combinations that differ in one attribute only, of
mean((z_a - z_b)^2); and why it matters: a model blind to the word predicts (z_a + z_b) / 2 and pays gap / 4."""
from pathlib import Path

import torch

from lessons.grading import load_module

gaps = load_module(Path(__file__).resolve().parents[1] / "bench" / "attribute_gaps.py").gaps


def test_gap_counts_only_pairs_that_differ_in_the_one_attribute():
    values = {("red", "circle", "left"): torch.zeros(4), ("red", "square", "left"): torch.full((4,), 2.0),
              ("blue", "circle", "left"): torch.ones(4), ("blue", "square", "right"): torch.full((4,), 5.0)}
    assert gaps(values, 1) == 4.0  # only red circle / red square left: (0 - 2)^2; blue differs in position too
    assert gaps(values, 0) == 1.0  # red / blue circle left
    assert gaps(values, 1, "circle", "square") == 4.0
    values[("blue", "square", "left")] = torch.full((4,), 4.0)
    assert gaps(values, 1) == (4.0 + 9.0) / 2  # the mean over both shape pairs, not the sum


def test_a_word_blind_model_pays_a_quarter_of_the_gap():
    z_a, z_b = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))
    blind = (z_a + z_b) / 2
    gap = gaps({("red", "circle", "left"): z_a, ("red", "square", "left"): z_b}, 1)
    torch.testing.assert_close((blind - z_a).pow(2).mean(), torch.tensor(gap / 4))
