"""Tokenizer and prompt encoder: ids, warnings, padding invariance, checkpoint state."""
import warnings

import pytest
import torch

from minildm.text.encoder import PromptEncoder, TextEncoderConfig
from minildm.text.tokenizer import BOS_ID, PAD_ID, UNK_ID, Tokenizer, split_words

CAPTIONS = ["a red circle on the left", "a blue square in the center", "A green triangle on the TOP."]


def test_build_and_encode_ids():
    tok = Tokenizer.build(CAPTIONS, max_len=8)
    assert tok.words[:3] == ["<pad>", "<unk>", "<s>"]
    assert tok.words[3:] == sorted(set(split_words(" ".join(CAPTIONS))))
    ids = tok.encode(["a red circle", "Blue, SQUARE!"])
    assert ids.dtype == torch.long and ids.shape == (2, 8)
    w = tok.word_to_id
    assert ids[0].tolist() == [BOS_ID, w["a"], w["red"], w["circle"], 0, 0, 0, 0]
    assert ids[1].tolist() == [BOS_ID, w["blue"], w["square"], 0, 0, 0, 0, 0]
    assert tok.decode(ids) == ["a red circle", "blue square"]


def test_min_count_and_split_rule():
    assert split_words("A red-circle, 2x!") == ["a", "red", "circle", "x"]
    tok = Tokenizer.build(CAPTIONS, min_count=2)
    assert tok.words[3:] == ["a", "on", "the"]


def test_empty_prompt_is_start_token_only():
    tok = Tokenizer.build(CAPTIONS, max_len=6)
    assert tok.encode([""]).tolist() == [[BOS_ID, PAD_ID, PAD_ID, PAD_ID, PAD_ID, PAD_ID]]
    assert tok.decode(tok.encode([""])) == [""]


def test_truncation_warns_once_per_call():
    tok = Tokenizer.build(CAPTIONS, max_len=4)
    with pytest.warns(UserWarning, match="truncated") as record:
        ids = tok.encode(["a red circle on the left", "a blue square in the center", "a red"])
    assert sum("truncated" in str(r.message) for r in record) == 1
    assert "2 of 3" in str(record[0].message)
    assert ids[0].tolist() == [BOS_ID] + [tok.word_to_id[x] for x in ("a", "red", "circle")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok.encode(["a red circle"])  # exactly max_len tokens: no warning


def test_unknown_words_counted_and_warned_once():
    tok = Tokenizer.build(CAPTIONS)
    with pytest.warns(UserWarning, match="'purple'") as record:
        ids = tok.encode(["a purple circle", "purple purple"])
    assert len(record) == 2  # the word once, and the prompt that has no known word at all
    assert "no word the model knows" in str(record[1].message) and "unconditional" in str(record[1].message)
    assert ids[0, 2] == UNK_ID and tok.unknown_counts["purple"] == 3
    assert tok.decode(ids)[0] == "a <unk> circle"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # already warned about 'purple': silent now
        tok.encode(["a purple"])
    assert tok.unknown_counts["purple"] == 4


def test_state_round_trip_and_bad_input():
    tok = Tokenizer.build(CAPTIONS, max_len=10)
    state = tok.state()
    assert all(isinstance(w, str) for w in state["words"]) and state["max_len"] == 10
    again = Tokenizer.from_state(state)
    prompts = ["a green square on the left", ""]
    assert torch.equal(again.encode(prompts), tok.encode(prompts))
    with pytest.raises(ValueError):
        tok.encode("a red circle")  # a bare string, not a list
    with pytest.raises(ValueError):
        Tokenizer(["a", "b"])


def small_encoder(tok, seed=0):
    torch.manual_seed(seed)
    cfg = TextEncoderConfig(vocab_size=tok.vocab_size, max_len=tok.max_len, dim=32, depth=2, heads=2, dim_head=16)
    return PromptEncoder(cfg).eval()


def test_encoder_outputs_and_mask():
    tok = Tokenizer.build(CAPTIONS, max_len=8)
    enc = small_encoder(tok)
    ids = tok.encode(["a red circle", ""])
    ctx, mask = enc(ids)
    assert ctx.shape == (2, 8, 32) and mask.dtype == torch.bool
    assert torch.equal(mask, ids != 0)
    assert mask[1].tolist() == [True] + [False] * 7  # empty prompt: only the start token is real
    assert torch.isfinite(ctx).all()
    # final LayerNorm (affine is the identity at init): every position has zero mean over features
    torch.testing.assert_close(ctx.mean(-1), torch.zeros(2, 8), atol=1e-5, rtol=0)


def test_encoder_padding_invariance():
    """Extra <pad> tokens (or different padding contents as keys) do not change the real positions."""
    tok = Tokenizer.build(CAPTIONS, max_len=12)
    enc = small_encoder(tok)
    ids = tok.encode(["a red circle on the left", "blue"])
    short = ids[:, :7]  # the longest prompt has 7 tokens, so this only drops padding
    ctx_long, mask = enc(ids)
    ctx_short, _ = enc(short)
    real = mask[:, :7]
    torch.testing.assert_close(ctx_short[real], ctx_long[:, :7][real], atol=1e-5, rtol=1e-5)
    # and the real positions really depend on the words (the test could fail)
    other, _ = enc(tok.encode(["a blue circle on the left", "red"]))
    assert (other[:, :3] - ctx_long[:, :3]).abs().max() > 1e-3


def test_encoder_rejects_too_long_tokens():
    tok = Tokenizer.build(CAPTIONS, max_len=4)
    enc = small_encoder(tok)
    with pytest.raises(ValueError):
        enc(torch.full((1, 5), BOS_ID))


def test_encoder_trains_jointly():
    """Gradient reaches every parameter of the prompt encoder (it is learned alongside the UNet)."""
    tok = Tokenizer.build(CAPTIONS, max_len=8)
    enc = small_encoder(tok).train()
    ids = tok.encode(CAPTIONS)
    ctx, mask = enc(ids)
    (ctx[mask] ** 3).sum().backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # only the embedding rows of real tokens learn: absent words and <pad> (masked everywhere) get zero gradient
    grad_rows = torch.nonzero(enc.token_emb.weight.grad.abs().sum(-1) > 0).flatten().tolist()
    assert set(grad_rows) == set(ids[mask].tolist())
