"""LoRA: identity at init, merge == unmerged, only A/B train, alpha/r scaling, save/load and refusal."""
import copy

import pytest
import torch
from torch import nn

from minildm.adapters.lora import (
    LoRALinear,
    inject_lora,
    load_lora,
    load_lora_file,
    lora_parameters,
    lora_state_dict,
    merge_lora,
    save_lora,
    set_lora_strength,
    unmerge_lora,
)
from minildm.checkpoint import CheckpointError, save_checkpoint
from minildm.modules.attention import Attention

DIM, CTX = 32, 16


class Block(nn.Module):
    """Self-attention, cross-attention and a feed-forward layer, like one UNet transformer block."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads=2, dim_head=dim // 2)
        self.attn2 = Attention(dim, CTX, heads=2, dim_head=dim // 2)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x, context):
        x = x + self.attn1(self.norm(x))
        x = x + self.attn2(x, context)
        return x + self.ff(x)


class TinyModel(nn.Module):
    def __init__(self, dim: int = DIM, depth: int = 2):
        super().__init__()
        self.proj_in = nn.Linear(DIM, dim)
        self.blocks = nn.ModuleList([Block(dim) for _ in range(depth)])

    def forward(self, x, context):
        x = self.proj_in(x)
        for block in self.blocks:
            x = block(x, context)
        return x


def make_model(dim: int = DIM, depth: int = 2) -> TinyModel:
    torch.manual_seed(0)
    return TinyModel(dim, depth).eval()


def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 5, DIM, generator=g), torch.randn(2, 3, CTX, generator=g)


def perturb_B(model: nn.Module, seed: int = 2) -> None:
    """Give every B a non-zero value, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_B.weight.copy_(0.1 * torch.randn(module.lora_B.weight.shape, generator=g))


def test_fresh_adapter_leaves_outputs_exactly_unchanged():
    model = make_model()
    x, ctx = inputs()
    y0 = model(x, ctx)
    names = inject_lora(model, rank=4)
    assert len(names) == 2 * 2 * 4  # 2 blocks x (attn1, attn2) x (to_q, to_k, to_v, to_out)
    assert "blocks.0.attn2.to_out" in names and "blocks.1.attn1.to_q" in names
    assert all(isinstance(model.get_submodule(n), LoRALinear) for n in names)
    layer = model.get_submodule("blocks.0.attn1.to_q")
    assert torch.count_nonzero(layer.lora_A.weight) > 0 and torch.count_nonzero(layer.lora_B.weight) == 0
    assert torch.equal(model(x, ctx), y0)


def test_scale_is_alpha_over_rank():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = LoRALinear(base, rank=2, alpha=8.0)  # alpha / r = 4 (a swap would give 1/4)
    A = torch.arange(12.0).reshape(2, 6) / 10
    B = torch.arange(10.0).reshape(5, 2) / 10
    with torch.no_grad():
        layer.lora_A.weight.copy_(A)
        layer.lora_B.weight.copy_(B)
    x = torch.randn(3, 6)
    expected = base(x) + 4.0 * x @ A.T @ B.T  # W x + b + (alpha / r) B A x
    assert torch.allclose(layer(x), expected, atol=1e-5)
    assert LoRALinear(nn.Linear(6, 5), rank=3).alpha == 3.0  # alpha defaults to the rank: factor 1
    layer.strength = 0.5  # runtime multiplier on top of alpha / r
    assert torch.allclose(layer(x), base(x) + 2.0 * x @ A.T @ B.T, atol=1e-5)
    layer.strength = 0.0
    assert torch.equal(layer(x), base(x))


def test_merge_equals_unmerged_and_unmerge_restores_weights():
    model = make_model()
    x, ctx = inputs()
    inject_lora(model, rank=4, alpha=8)
    perturb_B(model)
    set_lora_strength(model, 0.7)
    y = model(x, ctx)
    originals = {n: m.base.weight.clone() for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    merge_lora(model)
    layer = model.get_submodule("blocks.1.attn2.to_v")
    assert layer.merged and not torch.allclose(layer.base.weight, originals["blocks.1.attn2.to_v"])
    assert torch.allclose(model(x, ctx), y, atol=1e-5)
    with pytest.raises(ValueError, match="unmerge"):
        set_lora_strength(model, 1.0)  # would make unmerge subtract a different B A than merge added
    with pytest.raises(ValueError, match="already merged"):
        merge_lora(model)
    unmerge_lora(model)
    for name, weight in originals.items():
        assert torch.allclose(model.get_submodule(name).base.weight, weight, atol=1e-6)
    assert torch.allclose(model(x, ctx), y, atol=1e-5)


def test_only_lora_parameters_receive_gradients():
    model = make_model()
    x, ctx = inputs()
    inject_lora(model, rank=4)
    model(x, ctx).square().mean().backward()
    trainable = {id(p) for p in lora_parameters(model)}
    for name, p in model.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            assert id(p) in trainable and p.requires_grad and p.grad is not None, name
        else:
            assert not p.requires_grad and p.grad is None, name
    # B = 0 at init, so dL/dA = 0 but dL/dB != 0 (the update starts moving through B)
    layer = model.get_submodule("blocks.0.attn2.to_k")
    assert torch.count_nonzero(layer.lora_B.weight.grad) > 0
    assert torch.count_nonzero(layer.lora_A.weight.grad) == 0


def test_trainable_fraction_is_small_and_equals_r_times_din_plus_dout():
    model = make_model(dim=128)
    total = sum(p.numel() for p in model.parameters())
    names = inject_lora(model, rank=4)
    bases = [model.get_submodule(n).base for n in names]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == sum(4 * (b.in_features + b.out_features) for b in bases)  # r (d_in + d_out) per layer
    assert trainable / total < 0.05  # about 3% at rank 4, width 128


def test_state_dict_round_trip_gives_identical_outputs(tmp_path):
    model = make_model()
    x, ctx = inputs()
    inject_lora(model, rank=4, alpha=8)
    perturb_B(model)
    y = model(x, ctx)
    state = lora_state_dict(model)
    assert state["rank"] == 4 and state["alpha"] == 8.0
    assert state["targets"] == ["to_k", "to_out", "to_q", "to_v"] and len(state["names"]) == 16
    assert set(state["weights"]) == {f"{n}.{part}" for n in state["names"] for part in ("lora_A", "lora_B")}
    assert state["weights"]["blocks.0.attn2.to_k.lora_A"].shape == (4, CTX)

    fresh = make_model()  # same base weights, no LoRA yet: load_lora injects
    assert load_lora(fresh, state) == state["names"]
    assert torch.equal(fresh(x, ctx), y)

    preinjected = make_model()  # LoRA already there with another alpha: the file's alpha wins
    inject_lora(preinjected, rank=4, alpha=1)
    load_lora(preinjected, state)
    assert torch.equal(preinjected(x, ctx), y)

    path = save_lora(model, tmp_path / "style.lora.pt")
    from_file = make_model()
    load_lora_file(from_file, path)
    assert torch.equal(from_file(x, ctx), y)

    save_checkpoint(tmp_path / "other.pt", "ldm", {"step": 3})
    with pytest.raises(CheckpointError):
        load_lora_file(make_model(), tmp_path / "other.pt")


def test_state_for_another_model_is_refused():
    model = make_model()
    inject_lora(model, rank=4)
    state = lora_state_dict(model)

    wider = make_model(dim=48)  # same names, other shapes
    with pytest.raises(ValueError, match=r"'blocks\.0\.attn1\.to_q'.*made for another model"):
        load_lora(wider, state)
    assert not any(isinstance(m, LoRALinear) for m in wider.modules())  # refused before changing the model

    shallower = make_model(depth=1)  # the file has blocks.1.*, this model does not
    with pytest.raises(ValueError, match=r"'blocks\.1\.attn1\.to_q'.*made for another model"):
        load_lora(shallower, state)
    loaded = load_lora(shallower, state, strict=False)
    assert loaded == [n for n in state["names"] if n.startswith("blocks.0.")]
    with pytest.raises(ValueError, match="made for another model"):
        load_lora(make_model(dim=48, depth=1), state, strict=False)  # shapes are never skipped silently

    other_rank = make_model()
    inject_lora(other_rank, rank=8)
    with pytest.raises(ValueError, match="made for another model"):
        load_lora(other_rank, state)

    with pytest.raises(ValueError, match="not a LoRA state"):
        load_lora(make_model(), make_model().state_dict())


def test_inject_targets_root_filter_and_sequential_to_out():
    model = make_model()
    names = inject_lora(model, rank=2, root_filter=lambda name: ".attn2." in name)
    assert sorted(names) == sorted(f"blocks.{i}.attn2.{t}" for i in range(2) for t in ("to_q", "to_k", "to_v", "to_out"))
    assert isinstance(model.get_submodule("blocks.0.attn1.to_q"), nn.Linear)
    with pytest.raises(ValueError, match="already has LoRA"):
        inject_lora(model)
    with pytest.raises(ValueError, match="found no nn.Linear"):
        inject_lora(make_model(), targets=("to_qkv",))

    seq = nn.Module()  # to_out as Sequential(Linear, Dropout), the layout of some other code bases
    seq.to_q = nn.Linear(4, 4, bias=False)
    seq.to_out = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.0))
    assert inject_lora(seq, targets=("to_q", "to_out")) == ["to_q", "to_out.0"]
    assert lora_state_dict(seq)["targets"] == ["to_out", "to_q"]
