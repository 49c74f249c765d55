"""Attention kernels equal PyTorch's SDPA and the textbook formula; masks and heads behave."""
import functools

import pytest
import torch
import torch.nn.functional as F

from minildm.modules.attention import Attention, attention, chunked_attention, sdpa_attention

# chunk sizes that divide neither N = 37 nor M = 11
KERNELS = {
    "naive": attention,
    "chunked": functools.partial(chunked_attention, q_chunk=8, k_chunk=4),
    "sdpa": sdpa_attention,
}


def qkv(b=2, h=3, n=37, m=11, d=16, e=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, length, dim, generator=g) for length, dim in ((n, d), (m, d), (m, e)))
    return q.to(dtype), k.to(dtype), v.to(dtype)


def reference(q, k, v, mask4d=None):
    """softmax(Q K^T / sqrt(d)) V in float64, softmax over the key axis (last)."""
    q, k, v = q.double(), k.double(), v.double()
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if mask4d is not None:
        scores = scores.masked_fill(~mask4d, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def padding_mask(b=2, m=11):
    mask = torch.ones(b, m, dtype=torch.bool)
    mask[0, 7:] = False  # first sequence has 7 real keys
    mask[1, 3:] = False  # second has 3
    return mask


@pytest.mark.parametrize("name", KERNELS)
@pytest.mark.parametrize("masking", ["none", "padding", "4d"])
def test_kernels_match_sdpa_fp32(name, masking):
    q, k, v = qkv()
    if masking == "none":
        mask, mask4d = None, None
    elif masking == "padding":
        mask = padding_mask()
        mask4d = mask[:, None, None, :]
    else:  # a per-query mask broadcast over heads: query n sees keys m <= n % 11 (never empty)
        n_idx, m_idx = torch.arange(37)[:, None], torch.arange(11)[None, :]
        mask = (m_idx <= n_idx % 11)[None, None].expand(2, 1, 37, 11)
        mask4d = mask
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask4d)
    out = KERNELS[name](q, k, v, mask)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.double(), reference(q, k, v, mask4d), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", KERNELS)
def test_kernels_match_sdpa_bf16(name):
    q, k, v = qkv(dtype=torch.bfloat16)
    mask = padding_mask()
    out = KERNELS[name](q, k, v, mask)
    assert out.dtype == torch.bfloat16
    expected = reference(q, k, v, mask[:, None, None, :])
    torch.testing.assert_close(out.double(), expected, atol=3e-2, rtol=3e-2)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
    torch.testing.assert_close(out.float(), sdpa.float(), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("name", KERNELS)
def test_probabilities_are_softmax_over_keys_with_scale(name):
    """With V = I (one-hot per key) the output IS the probability matrix P [N, M]."""
    n, m, d = 5, 9, 16
    q, k, _ = qkv(b=1, h=2, n=n, m=m, d=d)
    q, k = 3 * q, 3 * k  # sharpen the scores so scale mistakes show clearly
    eye = torch.eye(m).expand(1, 2, m, m)
    probs = KERNELS[name](q, k, eye).double()
    scores = (q @ k.transpose(-1, -2)).double()
    right = torch.softmax(scores / d**0.5, dim=-1)
    torch.testing.assert_close(probs.sum(-1), torch.ones(1, 2, n, dtype=torch.float64))  # rows sum to 1
    torch.testing.assert_close(probs, right, atol=1e-5, rtol=1e-5)
    # the check discriminates: the usual bugs give clearly different matrices
    wrong_axis = torch.softmax(scores / d**0.5, dim=-2)
    wrong_scale = torch.softmax(scores / d, dim=-1)
    no_scale = torch.softmax(scores, dim=-1)
    for wrong in (wrong_axis, wrong_scale, no_scale):
        assert (probs - wrong).abs().max() > 0.05


@pytest.mark.parametrize("name", KERNELS)
def test_masked_keys_get_exactly_zero_weight(name):
    m = 11
    q, k, _ = qkv(m=m)
    mask = padding_mask(m=m)
    eye = torch.eye(m).expand(2, 3, m, m)
    probs = KERNELS[name](q, k, eye, mask)
    assert torch.all(probs[0, :, :, 7:] == 0) and torch.all(probs[1, :, :, 3:] == 0)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 3, 37))


@pytest.mark.parametrize("name", KERNELS)
def test_fully_masked_rows_give_zeros_not_nan(name):
    q, k, v = qkv()
    mask = padding_mask()
    mask[1] = False  # the second sequence has no visible key at all
    out = KERNELS[name](q, k, v, mask)
    assert torch.isfinite(out).all()
    assert torch.all(out[1] == 0)
    torch.testing.assert_close(out[0], attention(q, k, v, padding_mask())[0], atol=1e-5, rtol=1e-5)


def test_chunked_chunk_size_does_not_matter():
    q, k, v = qkv(n=20, m=13)
    mask = padding_mask(m=13)
    expected = attention(q, k, v, mask)
    for qc, kc in [(1, 1), (3, 5), (20, 13), (64, 64)]:
        out = chunked_attention(q, k, v, mask, q_chunk=qc, k_chunk=kc)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_bad_masks_and_kernels_raise():
    q, k, v = qkv()
    with pytest.raises(ValueError):
        attention(q, k, v, torch.ones(2, 11))  # float mask
    with pytest.raises(ValueError):
        attention(q, k, v, torch.ones(2, 3, 11, dtype=torch.bool))  # 3-d mask
    with pytest.raises(ValueError):
        Attention(32, kernel="flash")


def test_module_heads_split_matches_per_head_loop():
    """attend() must split the last axis as (h d): head h owns columns h*d:(h+1)*d."""
    torch.manual_seed(0)
    heads, d = 4, 8
    attn = Attention(32, context_dim=20, heads=heads, dim_head=d)
    q, k, v = torch.randn(2, 7, heads * d), torch.randn(2, 5, heads * d), torch.randn(2, 5, heads * d)
    out = attn.attend(q, k, v)
    per_head = []
    for h in range(heads):
        cols = slice(h * d, (h + 1) * d)
        p = torch.softmax(q[..., cols] @ k[..., cols].transpose(-1, -2) / d**0.5, dim=-1)
        per_head.append(p @ v[..., cols])
    torch.testing.assert_close(out, torch.cat(per_head, dim=-1), atol=1e-5, rtol=1e-5)


def test_module_kernels_agree_and_probs_hook_sees_the_probabilities():
    torch.manual_seed(0)
    x, ctx = torch.randn(2, 37, 32), torch.randn(2, 11, 20)
    mask = padding_mask()
    outs = {}
    for kernel in ("naive", "chunked", "sdpa"):
        torch.manual_seed(1)
        attn = Attention(32, context_dim=20, heads=2, dim_head=16, kernel=kernel)
        outs[kernel] = attn(x, ctx, mask)
    torch.testing.assert_close(outs["chunked"], outs["naive"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs["sdpa"], outs["naive"], atol=1e-5, rtol=1e-5)

    seen = []
    attn.probs_hook = lambda module, probs: seen.append((module, probs)) or probs  # look, change nothing
    out = attn(x, ctx, mask)  # the sdpa layer: with a hook it runs the naive kernel
    torch.testing.assert_close(out, outs["naive"], atol=1e-5, rtol=1e-5)
    (module, maps), = seen
    assert module is attn and maps.shape == (2, 2, 37, 11)
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 2, 37))
    assert torch.all(maps[1, :, :, 3:] == 0)
    attn.probs_hook = lambda module, probs: torch.zeros_like(probs)  # a replacement is what the layer uses:
    torch.testing.assert_close(attn(x, ctx, mask), attn.to_out.bias.expand(2, 37, 32))  # P = 0 -> O = 0 -> b_O
    attn.probs_hook = None
    # all-True mask = no mask; self-attention when context is None
    full = torch.ones(2, 11, dtype=torch.bool)
    torch.testing.assert_close(attn(x, ctx, full), attn(x, ctx))
    assert Attention(32)(x).shape == x.shape


@pytest.mark.parametrize("masking", [False, True])
def test_kernel_gradients_match_naive(masking):
    """Training through the chunked kernel: its gradients w.r.t. q, k, v equal the naive kernel's (the
    in-place exponentiation of its inference path must never run under autograd)."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 37, 8, generator=g, requires_grad=True) for _ in range(3))
    mask = torch.rand(2, 37, generator=g) > 0.3 if masking else None
    if masking:
        mask[0] = False  # a row with every key masked: zero output, zero gradient
    grads = {}
    for name, fn in KERNELS.items():
        out = fn(q, k, v, mask)
        grads[name] = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(), (q, k, v))
    for name in ("chunked", "sdpa"):
        for g_ref, g_kernel in zip(grads["naive"], grads[name]):
            torch.testing.assert_close(g_kernel, g_ref, atol=2e-5, rtol=1e-4)


# ---------------------------------------------------------------- generate(return_attention=True)
def random_pipeline():
    """A micro pipeline with random weights (no training), attention at two levels."""
    from dataclasses import replace

    from minildm.autoencoder.vqvae import VQVAE
    from minildm.config import micro
    from minildm.diffusion.schedule import NoiseSchedule
    from minildm.modules.unet import UNet
    from minildm.pipeline import LatentDiffusion
    from minildm.text.encoder import PromptEncoder, TextEncoderConfig
    from minildm.text.tokenizer import Tokenizer

    torch.manual_seed(0)
    p = micro()
    tokenizer = Tokenizer.build(["a red circle on the left", "a blue square on the right"], max_len=8)
    text = PromptEncoder(TextEncoderConfig(**{**p.text.__dict__, "vocab_size": tokenizer.vocab_size, "max_len": 8}))
    unet = UNet(replace(p.unet, attention_levels=(0, 1)))
    for w in unet.parameters():  # zero-initialised layers would make every step's input the same
        if w.ndim > 1 and not w.any():
            torch.nn.init.normal_(w, std=0.2)
    pipe = LatentDiffusion(VQVAE(p.vq), tokenizer, text, unet, NoiseSchedule(1000), 32, "v")
    return pipe.eval().requires_grad_(False)


def test_generate_returns_the_last_steps_maps_recomputed_from_each_layers_inputs():
    """extras["attention"] [N, L, h, w] = softmax(Q K^T / sqrt(d)) of every attn2 layer at the finest level, from
    the inputs it saw in the last UNet call, conditional half of the CFG batch, mean over layers and heads."""
    from einops import rearrange

    from minildm.modules.attention import attention_probs

    pipe = random_pipeline()
    prompts = ["a red circle on the left", "a blue square on the right"]
    layers = {name: m for name, m in pipe.unet.named_modules() if name.endswith("attn2")}
    last = {}  # name -> (x, context, mask) of the layer's latest call
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: last.update({name: args}))
             for name, m in layers.items()]
    try:
        images, extras = pipe.generate(prompts, steps=3, guidance_scale=3.0, seed=0, return_attention=True)
    finally:
        for hook in hooks:
            hook.remove()
    assert all(m.probs_hook is None for m in layers.values())  # recording ends with generate
    assert torch.equal(images, pipe.generate(prompts, steps=3, guidance_scale=3.0, seed=0))  # recording changes nothing

    probs = {}
    for name, (x, context, mask) in last.items():
        m = layers[name]
        split = lambda v: rearrange(v, "b n (h d) -> b h n d", h=m.heads)  # noqa: E731
        probs[name] = attention_probs(split(m.to_q(x)), split(m.to_k(context)), mask)  # [2N, H, h*w, L]
    finest = max(p.shape[2] for p in probs.values())
    side = round(finest**0.5)
    expected = torch.stack([p[-2:] for p in probs.values() if p.shape[2] == finest]).mean(dim=(0, 2))
    expected = rearrange(expected, "b (y x) l -> b l y x", y=side)
    maps = extras["attention"]
    assert maps.shape == (2, pipe.tokenizer.max_len, side, side) == (2, 8, 8, 8)
    assert torch.equal(maps, expected)  # exactly: the same numbers as before the capture moved to AttentionMaps
    assert torch.allclose(maps.sum(1), torch.ones(()), atol=1e-5)
    assert not torch.allclose(maps[0], maps[1])  # each prompt its own maps
    with pytest.raises(ValueError, match="return_attention needs guidance_scale > 0"):
        pipe.generate(prompts, steps=2, guidance_scale=0.0, return_attention=True)
