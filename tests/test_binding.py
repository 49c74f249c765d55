"""Cross-attention maps, Attend-and-Excite and Prompt-to-Prompt on a small random pipeline (no training)."""
from dataclasses import replace

import pytest
import torch
import torch.nn as nn

from minildm.autoencoder.vqvae import VQVAE
from minildm.config import micro
from minildm.data import scenes
from minildm.diffusion.attend_excite import attend_and_excite, excite_loss, gaussian_smooth, text_maps
from minildm.diffusion.prompt_to_prompt import word_swap
from minildm.diffusion.schedule import NoiseSchedule
from minildm.modules.attention import attention_probs
from minildm.modules.attention_maps import AttentionMaps, cross_attention_layers
from minildm.modules.unet import UNet
from minildm.pipeline import LatentDiffusion
from minildm.text.encoder import PromptEncoder, TextEncoderConfig
from minildm.text.tokenizer import Tokenizer

PROMPT = "a red circle on the left and a blue square on the right"


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    p = micro()
    tokenizer = Tokenizer.build([scenes.caption(s) for s in scenes.SPLITS["all"]], max_len=16)
    text = PromptEncoder(TextEncoderConfig(**{**p.text.__dict__, "vocab_size": tokenizer.vocab_size, "max_len": 16}))
    unet = UNet(replace(p.unet, attention_levels=(0, 1)))
    for w in unet.parameters():  # zero-initialised layers (output conv, proj_out) would hide the prompt
        if w.ndim > 1 and not w.any():
            nn.init.normal_(w, std=0.2)
    pipe = LatentDiffusion(VQVAE(p.vq), tokenizer, text, unet, NoiseSchedule(1000), 32, "v").eval()
    pipe.decode = lambda z: z  # compare latents: an untrained codebook would round small differences away
    return pipe.requires_grad_(False)


def unet_inputs(pipe, prompts):
    context, mask = pipe.encode_prompts(prompts)
    z = torch.randn(len(prompts), *pipe.latent_shape(), generator=torch.Generator().manual_seed(1))
    return z, torch.full((len(prompts),), 500), context, mask


def test_maps_sum_to_one_over_tokens_and_are_the_modules_own_attention(pipe):
    prompts = [PROMPT, "a green triangle on the top and a cyan circle on the bottom"]
    z, t, context, mask = unet_inputs(pipe, prompts)
    layers = cross_attention_layers(pipe.unet)
    seen = {}  # each layer's input x and output
    hooks = [m.register_forward_hook(lambda mod, args, output, name=name: seen.update({name: (args[0], output)}))
             for name, m in layers]
    try:
        with AttentionMaps(pipe.unet) as maps:
            out = pipe.unet(z, t, context, mask)
    finally:
        for hook in hooks:
            hook.remove()
    assert [name for name, _ in maps.records] == [name for name, _ in layers]  # one record per layer, in order
    split = lambda v: v.reshape(*v.shape[:2], m.heads, m.dim_head).transpose(1, 2)  # noqa: E731
    for (_, probs), (name, m) in zip(maps.records, layers):
        x, output = seen[name]
        v = split(m.to_v(context))
        used = m.to_out((probs @ v).transpose(1, 2).flatten(2))  # to_out(P V): the output the layer gave
        assert torch.allclose(used, output, atol=1e-6)  # what the module used
        # recomputed from the layer's own projections: softmax(Q K^T / sqrt(d)) of its input
        assert torch.allclose(probs, attention_probs(split(m.to_q(x)), split(m.to_k(context)), mask), atol=1e-6)
        assert torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-5)
        assert (probs[..., ~mask[0]][:1] == 0).all()  # padding gets no attention
    with AttentionMaps(pipe.unet) as again:
        assert torch.equal(pipe.unet(z, t, context, mask), out)  # recording changes nothing
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(again.records, maps.records))
    levels = maps.per_level()
    assert sorted(levels) == [4, 8] and levels[8].shape == (2, 16, 8, 8)  # micro: levels 0, 1 and the middle
    for side, a in levels.items():
        assert torch.allclose(a.sum(1), torch.ones(()), atol=1e-5)


def test_keep_last_keeps_each_layers_latest_map_in_call_order(pipe):
    """What generate(return_attention=True) records over a sampling loop: one map per layer, the last call's."""
    z, t, context, mask = unet_inputs(pipe, [PROMPT])
    z2 = torch.randn(z.shape, generator=torch.Generator().manual_seed(2))
    with AttentionMaps(pipe.unet) as first:
        pipe.unet(z, t, context, mask)
    with AttentionMaps(pipe.unet) as last:
        pipe.unet(z, t, context, mask)
        pipe.unet(z2, t - 300, context, mask)
    with AttentionMaps(pipe.unet, keep_last=True) as kept:
        pipe.unet(z, t, context, mask)
        pipe.unet(z2, t - 300, context, mask)
    assert len(last.records) == 2 * len(first.records) and len(kept.records) == len(first.records)
    assert [n for n, _ in kept.records] == [n for n, _ in first.records]
    latest = last.records[len(first.records):]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(kept.records, latest))
    assert not torch.equal(kept.records[0][1], first.records[0][1])


def test_maps_keep_their_gradient_only_when_asked(pipe):
    z, t, context, mask = unet_inputs(pipe, [PROMPT])
    z.requires_grad_(True)
    with torch.enable_grad():
        with AttentionMaps(pipe.unet, keep_grad=True) as maps:
            pipe.unet(z, t, context, mask)
        assert maps.per_level()[8].requires_grad
        with AttentionMaps(pipe.unet) as maps:
            pipe.unet(z, t, context, mask)
        assert not maps.per_level()[8].requires_grad


def test_excite_loss_is_the_weakest_tokens_missing_peak():
    maps = torch.zeros(1, 2, 4, 4)
    maps[0, 0, 1, 1], maps[0, 1, 2, 3] = 0.9, 0.3
    assert torch.allclose(excite_loss(maps, sigma=0), torch.tensor([0.7]))
    const = torch.full((1, 1, 4, 4), 0.25)
    assert torch.allclose(gaussian_smooth(const), const)  # the kernel sums to 1
    peak = torch.zeros(1, 1, 5, 5)
    peak[0, 0, 2, 2] = 1.0
    g = torch.exp(torch.tensor(-1 / (2 * 0.5**2)))
    assert torch.allclose(gaussian_smooth(peak)[0, 0, 2, 2], 1 / (1 + 2 * g) ** 2)  # centre weight of a 3x3 Gaussian


def test_excite_step_on_a_toy_problem_with_a_known_answer():
    """Two tokens with logits (z, -z) at two pixels: A_0 = sigmoid(2 z), A_1 = sigmoid(-2 z). With z = (a, b),
    a > b > 0, token 1 is the weakest, its peak is at the pixel of b, and dL/db = -d sigmoid(-2b)/db =
    2 sigmoid(2b) sigmoid(-2b): the step moves b alone, downwards, and lowers L."""
    z = torch.tensor([[1.5, 0.4]], requires_grad=True)
    logits = torch.stack([z, -z], dim=1)  # [1, 2 tokens, 2 pixels]
    maps = torch.softmax(logits, dim=1).reshape(1, 2, 1, 2)
    loss = excite_loss(maps, sigma=0)
    grad, = torch.autograd.grad(loss.sum(), z)
    b = torch.tensor(0.4)
    assert torch.allclose(loss, 1 - torch.sigmoid(-2 * b))
    assert torch.allclose(grad, torch.stack([torch.tensor(0.0), 2 * torch.sigmoid(2 * b) * torch.sigmoid(-2 * b)])[None])
    z2 = z.detach() - 0.5 * grad
    maps2 = torch.softmax(torch.stack([z2, -z2], dim=1), dim=1).reshape(1, 2, 1, 2)
    assert excite_loss(maps2, sigma=0) < loss


def test_text_maps_drop_the_start_token_and_padding():
    maps = torch.softmax(torch.randn(2, 6, 3, 3), dim=1)
    a = text_maps(maps, torch.tensor([4, 6]))
    assert torch.allclose(a.sum(1), torch.ones(())) and (a[:, 0] == 0).all() and (a[0, 4:] == 0).all()


def test_attend_and_excite_with_zero_step_is_plain_sampling_and_moves_otherwise(pipe):
    prompts = [PROMPT]
    plain = pipe.generate(prompts, steps=4, guidance_scale=3.0, seed=3)
    same = attend_and_excite(pipe, prompts, [["circle", "square"]], steps=4, seed=3, alpha=0.0)
    assert torch.allclose(plain, same, atol=1e-6)
    moved = attend_and_excite(pipe, prompts, [["circle", "square"]], steps=4, seed=3, alpha=50.0)
    assert not torch.allclose(plain, moved, atol=1e-3)
    with pytest.raises(ValueError, match="not all words"):
        attend_and_excite(pipe, prompts, [["diamond"]], steps=2)


def test_word_swap_with_the_same_prompt_reproduces_the_source_exactly(pipe):
    prompts = [PROMPT, "a green triangle on the top and a cyan circle on the bottom"]
    src, edit = word_swap(pipe, prompts, prompts, steps=5, seed=4)
    assert torch.equal(src, edit)
    assert torch.allclose(src, pipe.generate(prompts, steps=5, guidance_scale=3.0, seed=4), atol=1e-5)
    swapped = [p.replace("red", "green") for p in prompts[:1]]
    src1, edit1 = word_swap(pipe, prompts[:1], swapped, steps=5, seed=4)
    _, no_inject = word_swap(pipe, prompts[:1], swapped, steps=5, seed=4, inject_fraction=0.0)
    assert torch.allclose(src1, src[:1], atol=1e-5) and not torch.allclose(edit1, src1, atol=1e-3)
    assert not torch.allclose(edit1, no_inject, atol=1e-4)  # the injected maps changed the edit
    with pytest.raises(ValueError, match="number of words"):
        word_swap(pipe, prompts[:1], ["a red circle on the left"], steps=2)
