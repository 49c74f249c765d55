"""Grader of lesson 06: python lessons/06_prompt_model/grade.py  (add -v for details).

attention is compared with minildm/modules/attention.py with query, key and value sizes that all differ
(N != M, d != e), scores large enough for the 1/sqrt(d) to matter, padding masks of different lengths, and
a fully masked row. padding_mask is compared with the mask PromptEncoder returns for tokens of real
captions, the empty caption and unknown words. REFERENCE holds the library's solutions in the exercises'
signatures (lesson.py falls back to them; tests/test_lessons_graders.py checks that they pass).
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from lessons.grading import Check, main  # noqa: E402
from minildm.data import shapes  # noqa: E402
from minildm.modules.attention import attention as library_attention  # noqa: E402
from minildm.text.encoder import PromptEncoder, TextEncoderConfig  # noqa: E402
from minildm.text.tokenizer import PAD_ID, Tokenizer  # noqa: E402

REFERENCE = {
    "attention": library_attention,
    "padding_mask": lambda tokens: tokens != PAD_ID,  # as PromptEncoder.forward computes it
}

B, H, N, M, D, E = 2, 3, 4, 6, 8, 5
TOKENIZER = Tokenizer.build([shapes.caption(*c, paraphrase=p) for c in shapes.ALL_COMBOS for p in (False, True)], max_len=12)


def _qkv(seed: int) -> tuple:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, D, generator=g) * 1.5  # large scores: the 1/sqrt(d) makes a visible difference
    k = torch.randn(B, H, M, D, generator=g) * 1.5
    v = torch.randn(B, H, M, E, generator=g)
    return q, k, v


def _same(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert torch.is_tensor(got), f"{what}: expected a tensor, got {type(got).__name__}"
    assert got.shape == expected.shape, f"{what}: expected shape {tuple(expected.shape)}, got {tuple(got.shape)}"
    assert not torch.isnan(got).any(), f"{what}: the output contains NaN"
    err = (got - expected).abs().max().item()
    assert torch.allclose(got, expected, atol=1e-5), f"{what}: max abs difference {err:.3g} from the library"


def check_attention_no_mask(fn) -> None:
    q, k, v = _qkv(0)
    _same(fn(q, k, v), library_attention(q, k, v), "no mask")


def check_attention_padding(fn) -> None:
    q, k, v = _qkv(1)
    mask = torch.tensor([[True, True, True, False, False, False], [True, True, True, True, True, False]])  # [B, M]
    _same(fn(q, k, v, mask), library_attention(q, k, v, mask), "key padding mask [B, M]")
    k_junk, v_junk = k.clone(), v.clone()
    k_junk[~mask[:, None, :].expand(B, H, M)] = 50.0  # whatever sits in a padded position must not matter
    v_junk[~mask[:, None, :].expand(B, H, M)] = 1e3
    _same(fn(q, k_junk, v_junk, mask), library_attention(q, k, v, mask), "junk in the padded keys and values")


def check_attention_fully_masked(fn) -> None:
    q, k, v = _qkv(2)
    mask = torch.tensor([[False] * M, [True, False, True, False, True, False]])
    out = fn(q, k, v, mask)
    _same(out, library_attention(q, k, v, mask), "first batch element has no visible key")
    assert torch.all(out[0] == 0), "a query with no visible key should output zeros"


def _encoder_mask(tokens: torch.Tensor) -> torch.Tensor:
    """The key-padding mask the library's PromptEncoder builds for these tokens."""
    cfg = TextEncoderConfig(vocab_size=TOKENIZER.vocab_size, max_len=tokens.shape[1], dim=8, depth=1, heads=1, dim_head=8)
    with torch.no_grad():
        return PromptEncoder(cfg)(tokens)[1]


def _same_mask(fn, prompts: list[str]) -> None:
    with warnings.catch_warnings():  # unknown words are part of the test
        warnings.simplefilter("ignore")
        tokens = TOKENIZER.encode(prompts)
    got = fn(tokens.clone())
    expected = _encoder_mask(tokens)
    assert torch.is_tensor(got) and got.dtype == torch.bool, f"expected a bool tensor, got {getattr(got, 'dtype', type(got))}"
    assert got.shape == expected.shape, f"expected shape {tuple(expected.shape)}, got {tuple(got.shape)}"
    assert torch.equal(got, expected), f"tokens {tokens.tolist()}: expected {expected.int().tolist()}, got {got.int().tolist()}"


def check_mask_captions(fn) -> None:
    _same_mask(fn, ["a red circle on the left", "a circle that is red, on the left", "a blue square in the center"])


def check_mask_start_and_unknown(fn) -> None:
    _same_mask(fn, ["", "a pink circle on the moon", "a small red circle that is on the left of a big blue square"])


CHECKS = [
    Check("attention", check_attention_no_mask,
          "softmax(Q K^T / sqrt(d)) V with d the size of a query/key vector; the weights of one query sum to 1 over the keys"),
    Check("attention", check_attention_padding,
          "True in the mask means 'may be attended to'; a masked key must get weight exactly 0 (score -inf before the softmax), "
          "and the [B, M] mask applies to the key axis of every head and query"),
    Check("attention", check_attention_fully_masked,
          "softmax of a row that is all -inf is 0/0 = NaN: give such rows zero weights (and so a zero output)"),
    Check("padding_mask", check_mask_captions,
          "the mask is a bool tensor that is True for real tokens (the library's convention, the opposite of PyTorch's "
          "key_padding_mask)"),
    Check("padding_mask", check_mask_start_and_unknown,
          "only <pad> is padding: the start token <s> (so the empty prompt keeps one key) and <unk> are real tokens"),
]

if __name__ == "__main__":
    sys.exit(main(CHECKS, __file__))
