"""Classifier-free guidance: the combination rule, one batched forward pass, prompt dropping."""
import pytest
import torch

from minildm.diffusion.guidance import cfg_model_fn, drop_tokens, guided_eps


def test_guided_eps_special_cases_and_other_parametrisations():
    gen = torch.Generator().manual_seed(0)
    eps_u, eps_c = torch.randn(2, 3, 4, 4, generator=gen), torch.randn(2, 3, 4, 4, generator=gen)
    assert torch.allclose(guided_eps(eps_u, eps_c, 1.0), eps_c)  # s = 1: the conditional model
    assert torch.allclose(guided_eps(eps_u, eps_c, 0.0), eps_u)  # s = 0: the unconditional model
    w = 2.5
    assert torch.allclose(guided_eps(eps_u, eps_c, w + 1), (w + 1) * eps_c - w * eps_u, atol=1e-6)  # seed eq. 6
    assert torch.allclose(guided_eps(eps_u, eps_c, w), w * eps_c + (1 - w) * eps_u, atol=1e-6)  # IP-Adapter
    assert torch.allclose(guided_eps(eps_u, eps_c, 3.0), eps_c + 2.0 * (eps_c - eps_u), atol=1e-6)  # pushed past eps_c
    with pytest.raises(ValueError):
        guided_eps(eps_u, eps_c, -0.5)


class FakeUNet(torch.nn.Module):
    """eps = x * (1 + t / 100) + mean of the real context tokens' first C features; records every call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, context, context_mask):
        self.calls.append((x.shape[0], context.clone(), context_mask.clone() if context_mask is not None else None))
        mask = torch.ones(context.shape[:2], dtype=torch.bool) if context_mask is None else context_mask
        pooled = (context * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # [B, d]
        return x * (1 + t.view(-1, 1, 1, 1) / 100) + pooled[:, : x.shape[1], None, None]


def _prompts(B=3, L_c=5, L_u=2, d=8):
    gen = torch.Generator().manual_seed(1)
    context_c = torch.randn(B, L_c, d, generator=gen)
    mask_c = torch.ones(B, L_c, dtype=torch.bool)
    mask_c[0, 3:] = False  # a padded caption
    context_u = torch.randn(1, L_u, d, generator=gen)  # the empty prompt, encoded once
    mask_u = torch.tensor([[True, False]])
    x = torch.randn(B, 4, 2, 2, generator=gen)
    t = torch.tensor([10, 500, 999])
    return context_c, mask_c, context_u, mask_u, x, t


def test_cfg_runs_the_unet_once_on_a_batch_of_2B_and_matches_separate_calls():
    context_c, mask_c, context_u, mask_u, x, t = _prompts()
    reference = FakeUNet()
    eps_c = reference(x, t, context_c, mask_c)
    eps_u = reference(x, t, context_u.expand(3, -1, -1), mask_u.expand(3, -1))
    unet = FakeUNet()
    eps = cfg_model_fn(unet, context_c, mask_c, context_u, mask_u, guidance_scale=4.0)(x, t)
    assert len(unet.calls) == 1 and unet.calls[0][0] == 2 * x.shape[0]
    # the batch is [uncond, cond]: the first half saw the empty prompt (padded from 2 to 5 tokens, masked)
    batch_context, batch_mask = unet.calls[0][1], unet.calls[0][2]
    assert torch.equal(batch_context[:3, :2], context_u.expand(3, -1, -1)) and not batch_mask[:3, 1:].any()
    assert torch.equal(batch_context[3:], context_c)
    assert torch.allclose(eps, eps_u + 4.0 * (eps_c - eps_u), atol=1e-5)


def test_cfg_scale_one_and_zero_skip_the_other_half():
    context_c, mask_c, context_u, mask_u, x, t = _prompts()
    reference = FakeUNet()
    for scale, expected in [(1.0, reference(x, t, context_c, mask_c)),
                            (0.0, reference(x, t, context_u.expand(3, -1, -1), mask_u.expand(3, -1)))]:
        unet = FakeUNet()
        eps = cfg_model_fn(unet, context_c, mask_c, context_u, mask_u, scale)(x, t)
        assert len(unet.calls) == 1 and unet.calls[0][0] == x.shape[0]
        assert torch.allclose(eps, expected, atol=1e-6)


def test_cfg_accepts_missing_masks_and_rejects_bad_inputs():
    context_c, _, context_u, _, x, t = _prompts(L_u=5)
    unet = FakeUNet()
    eps = cfg_model_fn(unet, context_c, None, context_u, None, 2.0)(x, t)
    reference = FakeUNet()
    eps_c, eps_u = reference(x, t, context_c, None), reference(x, t, context_u.expand(3, -1, -1), None)
    assert torch.allclose(eps, 2 * eps_c - eps_u, atol=1e-5)
    with pytest.raises(ValueError):
        cfg_model_fn(unet, context_c, None, context_u, None, -1.0)
    with pytest.raises(ValueError):
        cfg_model_fn(unet, context_c[:2], None, context_u, None, 2.0)(x, t)  # 2 prompts for 3 samples


EMPTY = torch.tensor([[1]])  # tokenizer.encode([""]): just the start token <s> = 1


def _captions(B):
    tokens = torch.randint(2, 50, (B, 6), generator=torch.Generator().manual_seed(2))
    tokens[:, 0] = 1
    tokens[::2, 4:] = 0  # some padding
    return tokens


def test_drop_tokens_extremes():
    tokens = _captions(8)
    original = tokens.clone()
    assert torch.equal(drop_tokens(tokens, EMPTY, p=0.0), tokens)
    dropped = drop_tokens(tokens, EMPTY, p=1.0)
    assert torch.equal(dropped, torch.tensor([[1, 0, 0, 0, 0, 0]]).expand(8, 6))
    assert torch.equal(tokens, original)  # the input is not modified
    # an empty prompt padded to a longer fixed length is trimmed back to L
    assert torch.equal(drop_tokens(tokens, torch.tensor([[1, 0, 0, 0, 0, 0, 0, 0]]), p=1.0), dropped)


def test_drop_tokens_rate_and_rows():
    tokens = _captions(20_000)
    out = drop_tokens(tokens, EMPTY, p=0.1, generator=torch.Generator().manual_seed(3))
    is_empty = (out == torch.tensor([1, 0, 0, 0, 0, 0])).all(dim=1)
    kept = (out == tokens).all(dim=1)
    assert (is_empty | kept).all()  # every row is either untouched or exactly the empty prompt
    assert is_empty.float().mean().item() == pytest.approx(0.1, abs=0.01)
    again = drop_tokens(tokens, EMPTY, p=0.1, generator=torch.Generator().manual_seed(3))
    assert torch.equal(out, again)


def test_drop_tokens_rejects_bad_inputs():
    tokens = _captions(4)
    with pytest.raises(ValueError):
        drop_tokens(tokens, EMPTY, p=1.5)
    with pytest.raises(ValueError):
        drop_tokens(tokens, torch.arange(1, 9)[None], p=0.5)  # an "empty" prompt longer than the captions
