"""Lesson 13's grader fails realistic wrong versions of LoRALinear and merge, each on the check that names the
mistake (tests/test_lessons_graders.py: the library's LoRA passes, the untouched stubs fail)."""
import math

import pytest
import torch
from torch import nn

from lesson_helpers import failed, stubs
from lessons.grading import is_stub
from minildm.adapters.lora import LoRALinear


def test_untouched_stubs_are_stubs():
    """lesson.py runs the library's LoRA until both TODOs of the class are filled in."""
    exercises = stubs("13_lora")
    assert is_stub(exercises.merge) and is_stub(exercises.LoRALinear.forward) and is_stub(exercises.LoRALinear)


class BNotZero(LoRALinear):
    """B initialised like A: a fresh adapter already changes the model."""

    def __init__(self, base, rank, alpha=None):
        super().__init__(base, rank, alpha)
        nn.init.kaiming_uniform_(self.lora_B.weight, a=math.sqrt(5))


class BothZero(LoRALinear):
    """A and B both zero: the output is unchanged, but no gradient ever reaches A or B."""

    def __init__(self, base, rank, alpha=None):
        super().__init__(base, rank, alpha)
        nn.init.zeros_(self.lora_A.weight)


class RankOverAlpha(LoRALinear):
    """The factor upside down: r / alpha instead of alpha / r."""

    def forward(self, x):
        return self.base(x) + self.rank / self.alpha * self.strength * self.lora_B(self.lora_A(x))


class NoRuntimeStrength(LoRALinear):
    """--lora-strength ignored: always (alpha / r) B A x."""

    def forward(self, x):
        return self.base(x) + self.alpha / self.rank * self.lora_B(self.lora_A(x))


class BaseNotFrozen(LoRALinear):
    """The pretrained layer still trains: full fine-tuning in disguise."""

    def __init__(self, base, rank, alpha=None):
        super().__init__(base, rank, alpha)
        self.base.requires_grad_(True)


def merge_without_factor(layer):
    with torch.no_grad():
        layer.base.weight += layer.lora_B.weight @ layer.lora_A.weight  # forgets (alpha / r) * strength
    layer.merged = True


def merge_without_runtime_strength(layer):
    with torch.no_grad():
        layer.base.weight += layer.alpha / layer.rank * layer.lora_B.weight @ layer.lora_A.weight  # forgets strength
    layer.merged = True


def merge_without_flag(layer):
    with torch.no_grad():
        layer.base.weight += layer.delta_weight()  # right weight, but forward still adds B A x on top


def merge_into_bias_too(layer):
    with torch.no_grad():
        layer.base.weight += layer.delta_weight()
        layer.base.bias += layer.delta_weight().sum(1)
    layer.merged = True


@pytest.mark.parametrize("wrong, failing", [
    ({"LoRALinear": BNotZero}, {"LoRALinear #1"}),
    ({"LoRALinear": BothZero}, {"LoRALinear #1", "LoRALinear #3"}),
    ({"LoRALinear": RankOverAlpha}, {"LoRALinear #2"}),
    ({"LoRALinear": NoRuntimeStrength}, {"LoRALinear #2"}),
    ({"LoRALinear": BaseNotFrozen}, {"LoRALinear #3"}),
    ({"merge": merge_without_factor}, {"merge #1", "merge #3"}),
    ({"merge": merge_without_runtime_strength}, {"merge #1"}),
    ({"merge": merge_without_flag}, {"merge #1", "merge #3"}),
    ({"merge": merge_into_bias_too}, {"merge #1", "merge #2", "merge #3"}),
])
def test_wrong_versions_fail_their_check(wrong, failing):
    assert failed("13_lora", **wrong) == failing
