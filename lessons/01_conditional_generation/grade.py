"""Grader of lesson 01: python lessons/01_conditional_generation/grade.py  (add -v for details).

Your functions are compared with minildm's Tokenizer (minildm/text/tokenizer.py) on captions where the
usual mistakes show: messy case and punctuation, repeated words, rare words, unknown words, the empty
caption and captions longer than max_len. REFERENCE holds the library's solutions in the exercises'
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
from minildm.text.tokenizer import Tokenizer  # noqa: E402

SHAPES_CAPTIONS = [shapes.caption(*combo, paraphrase=p) for combo in shapes.SEEN for p in (False, True)]
MESSY = ["A red circle, on the LEFT.", "a  Blue square in the center!", "the the red red red triangle", "x-ray 2 circles"]
WORDS = Tokenizer.build(SHAPES_CAPTIONS).words


def _library_ids(caption: str, words: list[str], max_len: int) -> torch.Tensor:
    with warnings.catch_warnings():  # the library warns about unknown words and truncation; not needed here
        warnings.simplefilter("ignore")
        return Tokenizer(words, max_len).encode([caption])[0]


def _build_vocab(captions: list[str], min_count: int = 1) -> list[str]:
    return Tokenizer.build(captions, min_count=min_count).words


REFERENCE = {"build_vocab": _build_vocab, "encode_caption": _library_ids}


def _same_vocab(fn, captions: list[str], min_count: int = 1) -> None:
    expected = Tokenizer.build(captions, min_count=min_count).words
    got = fn(captions, min_count=min_count)
    assert list(got) == expected, f"min_count={min_count}: expected {expected}, got {list(got)}"


def check_vocab_shapes(fn) -> None:
    _same_vocab(fn, SHAPES_CAPTIONS)


def check_vocab_messy(fn) -> None:
    _same_vocab(fn, MESSY)


def check_vocab_min_count(fn) -> None:
    _same_vocab(fn, MESSY, min_count=2)  # "a" occurs exactly twice: kept (at least min_count)
    _same_vocab(fn, MESSY, min_count=100)  # nothing is that frequent: only the special tokens remain


def _same_ids(fn, caption: str, max_len: int, words: list[str] = WORDS) -> None:
    expected = _library_ids(caption, words, max_len)
    got = fn(caption, list(words), max_len)
    assert torch.is_tensor(got), f"expected a torch.LongTensor, got {type(got).__name__}"
    assert got.dtype == torch.long, f"expected dtype torch.long, got {got.dtype}"
    assert got.shape == expected.shape, \
        f"{caption!r}, max_len={max_len}: expected shape {tuple(expected.shape)}, got {tuple(got.shape)}"
    assert torch.equal(got, expected), f"{caption!r}, max_len={max_len}: expected {expected.tolist()}, got {got.tolist()}"


def check_encode_plain(fn) -> None:
    _same_ids(fn, "a red circle on the left", 10)
    _same_ids(fn, "a triangle that is cyan, in the center", 12)


def check_encode_unknown(fn) -> None:
    _same_ids(fn, "a pink circle on the moon", 10)
    _same_ids(fn, "a red-circle: 2 on the top-left", 12)  # words are runs of letters: "-", ":" and "2" split them


def check_encode_empty_and_exact(fn) -> None:
    _same_ids(fn, "", 6)  # the unconditional prompt: just the start token
    _same_ids(fn, "a red circle on the left", 7)  # 6 words + <s> fill max_len exactly


def check_encode_truncate(fn) -> None:
    _same_ids(fn, "a triangle that is cyan, in the center", 5)


CHECKS = [
    Check("build_vocab", check_vocab_shapes,
          "the table is the three special tokens first (<pad>, <unk>, <s>: ids 0, 1, 2), then the words sorted alphabetically"),
    Check("build_vocab", check_vocab_messy,
          "words are what split_words returns (lower-case, punctuation dropped), and each word appears once in the table"),
    Check("build_vocab", check_vocab_min_count,
          "a word is kept when its count over all captions is at least min_count; the special tokens are always kept"),
    Check("encode_caption", check_encode_plain,
          "a row is <s>, then one id per word (its index in `words`), then <pad> ids; return a LongTensor [max_len]"),
    Check("encode_caption", check_encode_unknown,
          "a word that is not in the table still takes a position: it becomes the <unk> id, not <pad> and not "
          "skipped; words are what split_words finds (runs of letters: digits, hyphens and punctuation separate them)"),
    Check("encode_caption", check_encode_empty_and_exact,
          "the start token is always there, even for the empty caption, and it counts towards max_len"),
    Check("encode_caption", check_encode_truncate,
          "a long caption is cut so the whole row, start token included, has exactly max_len ids"),
]

if __name__ == "__main__":
    sys.exit(main(CHECKS, __file__))
