"""UNet, SpatialTransformer and timestep embedding: shapes, identities at init, wiring of the prompt."""
import math

import pytest
import torch

from minildm.modules.transformer import BasicTransformerBlock, SpatialTransformer
from minildm.modules.unet import ResBlock, UNet, UNetConfig, timestep_embedding


def tiny_cfg(**overrides):
    cfg = dict(in_channels=4, out_channels=4, model_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1,
               attention_levels=(1,), heads=2, dim_head=8, context_dim=12, norm_groups=4)
    cfg.update(overrides)
    return UNetConfig(**cfg)


def inputs(b=2, c=4, h=8, w=8, length=5, context_dim=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, h, w, generator=g)
    t = torch.randint(0, 1000, (b,), generator=g)
    context = torch.randn(b, length, context_dim, generator=g)
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[0, 3:] = False  # first prompt: 3 real tokens, 2 padding
    return x, t, context, mask


def randomize_zero_inits(model, seed=0):
    """Give the zero-initialised layers (ResBlock.conv2, proj_out, conv_out) small random weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if torch.all(p == 0):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


def make(cfg, seed=0, randomize=True):
    torch.manual_seed(seed)
    model = UNet(cfg)
    return randomize_zero_inits(model, seed) if randomize else model


@pytest.mark.parametrize(
    "overrides, size",
    [
        (dict(), (8, 8)),
        (dict(), (12, 12)),  # 12 -> 6 -> 3
        (dict(channel_mult=(1, 2), attention_levels=(0,), num_res_blocks=2, mid_attention=False), (6, 6)),
        (dict(attention_levels=(0, 1, 2), transformer_depth=2, out_channels=3), (8, 4)),
        (dict(attention_levels=(), mid_attention=False, kernel="chunked"), (8, 8)),
    ],
)
def test_output_shape(overrides, size):
    cfg = tiny_cfg(**overrides)
    x, t, context, mask = inputs(h=size[0], w=size[1])
    out = make(cfg)(x, t, context, mask)
    assert out.shape == (2, cfg.out_channels, *size)
    assert torch.isfinite(out).all()


def test_bad_inputs_raise():
    model = make(tiny_cfg())
    x, t, context, mask = inputs(h=6, w=6)  # 6 is not divisible by 2^2
    with pytest.raises(ValueError):
        model(x, t, context, mask)
    x, t, context, mask = inputs(context_dim=7)
    with pytest.raises(ValueError):
        model(x, t, context, mask)
    with pytest.raises(ValueError):
        tiny_cfg(attention_levels=(3,))
    with pytest.raises(ValueError):
        tiny_cfg(norm_groups=32)  # does not divide 16 channels


def test_fresh_unet_predicts_zero():
    x, t, context, mask = inputs()
    assert torch.equal(make(tiny_cfg(), randomize=False)(x, t, context, mask), torch.zeros_like(x))


def test_fresh_spatial_transformer_is_identity():
    torch.manual_seed(0)
    st = SpatialTransformer(16, context_dim=12, heads=2, dim_head=8, depth=2, norm_groups=4)
    phi = torch.randn(2, 16, 5, 3)
    _, _, context, mask = inputs()
    assert torch.equal(st(phi, context, mask), phi)
    randomize_zero_inits(st)
    assert (st(phi, context, mask) - phi).abs().max() > 1e-3


def test_transformer_block_names():
    """Adapters find cross-attention by name: attn2 takes the context, attn1 is self-attention."""
    block = BasicTransformerBlock(16, context_dim=12, heads=2, dim_head=8)
    assert block.attn2.to_k.in_features == 12 and block.attn1.to_k.in_features == 16
    assert {n for n, _ in block.named_children()} == {"norm1", "attn1", "norm2", "attn2", "norm3", "ff"}
    names = [n for n, _ in make(tiny_cfg(), randomize=False).named_modules() if n.endswith("attn2")]
    assert len(names) == 1 + 2 + 1  # level 1: one down block, two up blocks; plus the middle block


def test_timestep_embedding_reference_values():
    emb = timestep_embedding(torch.tensor([0, 1, 500]), dim=4)  # freqs = 10000^(-i/2) = [1, 0.01]
    expected = torch.tensor([
        [1.0, 1.0, 0.0, 0.0],
        [math.cos(1), math.cos(0.01), math.sin(1), math.sin(0.01)],
        [math.cos(500), math.cos(5), math.sin(500), math.sin(5)],
    ])
    torch.testing.assert_close(emb, expected, atol=1e-5, rtol=1e-5)
    assert timestep_embedding(torch.tensor([3]), dim=5).shape == (1, 5)  # odd dim: zero-padded
    assert timestep_embedding(torch.tensor([3]), dim=5)[0, -1] == 0
    # every timestep gets its own vector: rows are distinct and unit-norm-ish (sqrt(dim/2))
    emb = timestep_embedding(torch.arange(1000), dim=64)
    dist = torch.cdist(emb, emb) + 1e9 * torch.eye(1000)
    assert dist.min() > 0.1
    torch.testing.assert_close(emb.norm(dim=-1), torch.full((1000,), math.sqrt(32)))


def test_gradient_reaches_every_parameter():
    model = make(tiny_cfg(attention_levels=(0, 1, 2)))
    x, t, context, mask = inputs()
    context.requires_grad_(True)
    model(x, t, context, mask).pow(2).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []
    assert context.grad[1].abs().sum() > 0
    assert torch.all(context.grad[0, 3:] == 0)  # padded prompt tokens get no gradient


def test_context_reaches_output_only_through_cross_attention():
    x, t, context, mask = inputs()
    other = torch.randn_like(context)
    wired = make(tiny_cfg())
    assert (wired(x, t, context, mask) - wired(x, t, other, mask)).abs().max() > 1e-4
    blind = make(tiny_cfg(attention_levels=(), mid_attention=False))
    torch.testing.assert_close(blind(x, t, context, mask), blind(x, t, other, mask), atol=0, rtol=0)


def test_context_mask_is_honoured():
    model = make(tiny_cfg(attention_levels=(0, 1, 2)))
    x, t, context, mask = inputs()
    out = model(x, t, context, mask)
    changed = context.clone()
    changed[0, 3:] = 100 * torch.randn(2, 12)  # only padded positions of prompt 0
    torch.testing.assert_close(model(x, t, changed, mask), out, atol=1e-6, rtol=1e-6)
    changed[0, 1] += 1.0  # a real token: must matter
    assert (model(x, t, changed, mask)[0] - out[0]).abs().max() > 1e-4


def test_timestep_matters_and_same_seed_same_output():
    x, t, context, mask = inputs()
    a, b = make(tiny_cfg(), seed=3), make(tiny_cfg(), seed=3)
    torch.testing.assert_close(a(x, t, context, mask), b(x, t, context, mask), atol=0, rtol=0)
    assert (a(x, t, context, mask) - a(x, t + 1, context, mask)).abs().max() > 1e-5


def test_kernels_and_checkpointing_give_same_result():
    x, t, context, mask = inputs()
    ref_model = make(tiny_cfg(attention_levels=(0, 1)))
    ref = ref_model(x, t, context, mask)
    ref.pow(2).mean().backward()
    for overrides in (dict(kernel="chunked"), dict(kernel="sdpa"), dict(use_checkpoint=True)):
        model = make(tiny_cfg(attention_levels=(0, 1), **overrides))
        out = model(x, t, context, mask)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        out.pow(2).mean().backward()
        for (name, p), p_ref in zip(model.named_parameters(), ref_model.parameters()):
            torch.testing.assert_close(p.grad, p_ref.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_flickr8k_report_unet_levels():
    cfg = UNetConfig.flickr8k_report()
    assert [cfg.model_channels * m for m in cfg.channel_mult] == [64, 128, 256, 256]
    torch.manual_seed(0)
    model = UNet(cfg)
    down = [isinstance(b[-1], SpatialTransformer) for b in model.input_blocks if isinstance(b[0], ResBlock)]
    up = [any(isinstance(m, SpatialTransformer) for m in b) for b in model.output_blocks]
    assert down == [True, True, True, True, False, False, False, False]  # 2 layers x (first two levels)
    assert up == [False] * 6 + [True] * 6  # 3 layers x (last two levels)
    x, t, context, _ = inputs(b=1, h=8, w=8, context_dim=cfg.context_dim)
    assert model(x, t, context).shape == x.shape


def test_unet_learns_to_regress_a_target():
    torch.manual_seed(0)
    model = UNet(tiny_cfg())
    x, t, context, mask = inputs(b=4)
    target = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss = (model(x, t, context, mask) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]


def test_channels_last_computes_the_same_function_and_gradients():
    """channels_last is a memory layout only: the same weights give the same output and gradients."""
    x, t, context, mask = inputs()
    dense = make(tiny_cfg(kernel="sdpa"))
    nhwc = UNet(tiny_cfg(kernel="sdpa", channels_last=True))
    nhwc.load_state_dict(dense.state_dict())
    conv = nhwc.input_blocks[0][0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()  # kept by load
    out_dense, out_nhwc = dense(x, t, context, mask), nhwc(x, t, context, mask)
    assert out_nhwc.is_contiguous()  # handed back in the caller's layout
    assert torch.allclose(out_nhwc, out_dense, atol=1e-5)
    out_dense.pow(2).sum().backward()
    out_nhwc.pow(2).sum().backward()
    for (name, a), b in zip(dense.named_parameters(), nhwc.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-4, rtol=1e-4), name
