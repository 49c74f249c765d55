"""Grade lesson 13:  python lessons/13_lora/grade.py   (-v for details)

Each check builds small layers with known A and B where the common mistakes change the numbers: B not
zero at init, the factor r / alpha instead of alpha / r, a forgotten runtime strength, a base layer that
still trains, a merge that forgets the factor or forgets to mark the layer merged.
REFERENCE holds the library's solutions (minildm/adapters/lora.py) under the exercises' names
(tests/test_lessons_graders.py checks that they pass and the stubs fail, tests/test_lessons_lora.py that wrong
versions fail).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from lessons.grading import Check, main  # noqa: E402
from minildm.adapters.lora import LoRALinear as ReferenceLoRALinear  # noqa: E402

REFERENCE = {"LoRALinear": ReferenceLoRALinear, "merge": ReferenceLoRALinear.merge}

D_IN, D_OUT, RANK, ALPHA = 6, 5, 2, 8.0  # alpha / r = 4: a swapped factor gives 1/4, a forgotten one 1


def _base() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(D_IN, D_OUT)


def _known_AB() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(RANK, D_IN, generator=g), torch.randn(D_OUT, RANK, generator=g)


def _x() -> torch.Tensor:
    return torch.randn(2, 3, D_IN, generator=torch.Generator().manual_seed(2))  # [B, N, d_in]


def _set_AB(layer: nn.Module, A: torch.Tensor, B: torch.Tensor) -> None:
    with torch.no_grad():
        layer.lora_A.weight.copy_(A)
        layer.lora_B.weight.copy_(B)


def check_fresh_adapter_is_identity(cls) -> None:
    base = _base()
    layer = cls(base, RANK, ALPHA)
    x = _x()
    assert torch.equal(layer(x), base(x)), "a fresh adapter changed the output"
    assert torch.count_nonzero(layer.lora_A.weight) > 0, "A is all zeros: then neither A nor B ever gets a gradient"


def check_forward_formula(cls) -> None:
    base = _base()
    layer = cls(base, RANK, ALPHA)
    A, B = _known_AB()
    _set_AB(layer, A, B)
    x = _x()
    expected = base(x) + (ALPHA / RANK) * x @ A.T @ B.T  # W x + b + (alpha / r) B A x
    assert torch.allclose(layer(x), expected, atol=1e-5), "wrong output with alpha / r = 4, strength = 1"
    layer.strength = 0.5
    assert torch.allclose(layer(x), base(x) + 0.5 * (ALPHA / RANK) * x @ A.T @ B.T, atol=1e-5), "strength ignored"
    assert cls(_base(), 3).alpha == 3, "alpha = None must mean alpha = r (factor 1)"
    odd = cls(_base(), 3, 4.0)  # alpha / r = 4 / 3, not a whole number (alpha // r would give 1)
    A3, B3 = torch.randn(3, D_IN, generator=torch.Generator().manual_seed(3)), torch.randn(D_OUT, 3)
    _set_AB(odd, A3, B3)
    assert torch.allclose(odd(x), base(x) + (4.0 / 3) * x @ A3.T @ B3.T, atol=1e-5), "wrong output with alpha / r = 4 / 3"


def check_only_A_and_B_train(cls) -> None:
    layer = cls(_base(), RANK, ALPHA)
    trainable = {name for name, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A.weight", "lora_B.weight"}, f"trainable parameters: {sorted(trainable)}"
    layer(_x()).square().sum().backward()
    assert torch.count_nonzero(layer.lora_B.weight.grad) > 0, "B gets no gradient at init"


def _merge_case():
    layer = ReferenceLoRALinear(_base(), RANK, ALPHA)
    A, B = _known_AB()
    _set_AB(layer, A, B)
    layer.strength = 0.5
    return layer, A, B


def check_merge_equals_unmerged(merge) -> None:
    layer, A, B = _merge_case()
    x = _x()
    y = layer(x)
    W = layer.base.weight.detach().clone()
    merge(layer)
    assert layer.merged, "the layer is not marked merged, so forward would add B A x a second time"
    expected_W = W + 0.5 * (ALPHA / RANK) * B @ A  # W + (alpha / r) * strength * B A
    assert torch.allclose(layer.base.weight, expected_W, atol=1e-5), "merged weight is wrong"
    assert torch.allclose(layer(x), y, atol=1e-5), "merged output differs from the unmerged output"


def check_merge_fractional_ratio(merge) -> None:
    layer = ReferenceLoRALinear(_base(), 3, 4.0)  # alpha / r = 4 / 3
    A, B = torch.randn(3, D_IN, generator=torch.Generator().manual_seed(4)), torch.randn(D_OUT, 3)
    _set_AB(layer, A, B)
    x = _x()
    y = layer(x)
    merge(layer)
    assert torch.allclose(layer(x), y, atol=1e-5), "with alpha / r = 4 / 3 the merged output differs"


def check_merge_touches_only_the_weight(merge) -> None:
    layer, A, B = _merge_case()
    bias = layer.base.bias.detach().clone()
    merge(layer)
    assert torch.equal(layer.base.bias, bias), "the bias changed"
    assert torch.equal(layer.lora_A.weight, A) and torch.equal(layer.lora_B.weight, B), "A or B changed"
    assert layer.base.weight.shape == (D_OUT, D_IN), "Delta W must have the shape of W, [d_out, d_in]"


CHECKS = [
    Check("LoRALinear", check_fresh_adapter_is_identity,
          "a fresh adapter must leave the layer's output exactly unchanged, yet be able to learn: which of A "
          "and B starts at zero, and why not both?"),
    Check("LoRALinear", check_forward_formula,
          "y = W x + b + (alpha / r) * strength * B A x: check the factor in front of B A (alpha over r, times "
          "the runtime strength) and the order in which A and B are applied."),
    Check("LoRALinear", check_only_A_and_B_train,
          "only A and B may learn: the pretrained layer (weight and bias) must be frozen."),
    Check("merge", check_merge_equals_unmerged,
          "after merging, W' x must equal W x + (alpha / r) * strength * B A x: fold the whole factor into W, "
          "and mark the layer merged."),
    Check("merge", check_merge_touches_only_the_weight,
          "merging changes W only: Delta W = (alpha / r) * strength * B A has W's shape [d_out, d_in]; "
          "bias, A and B stay as they are."),
    Check("merge", check_merge_fractional_ratio, "Delta W = (alpha / r) * strength * B A with a true division: "
          "alpha / r need not be a whole number."),
]

if __name__ == "__main__":
    sys.exit(main(CHECKS, __file__))
