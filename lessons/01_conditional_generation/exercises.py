"""Lesson 01 exercises: turn captions into the integer tokens a text-conditional model reads.

A class-conditional model gets one label y per image; a text-conditional model gets a caption, and the
first thing it does is cut the caption into words and replace each word by its id in a vocabulary.
You write the two halves of a word-level tokenizer:

    build_vocab(captions)                 -> the id -> word table
    encode_caption(caption, words, L)     -> LongTensor [L] of ids

Conventions (the same as minildm/text/tokenizer.py, which is the reference):
    id 0 = "<pad>"  fills the end of short captions (and is masked out later)
    id 1 = "<unk>"  stands for any word that is not in the vocabulary
    id 2 = "<s>"    the start token: every encoded caption begins with it, even the empty caption ""
    ids 3, 4, ...   the vocabulary words in alphabetical order

Grade with:  python lessons/01_conditional_generation/grade.py
"""
from __future__ import annotations

import torch

from minildm.text.tokenizer import split_words  # noqa: F401  ("A red, LEFT." -> ["a", "red", "left"])

SPECIALS = ("<pad>", "<unk>", "<s>")  # their ids are 0, 1, 2


def build_vocab(captions: list[str], min_count: int = 1) -> list[str]:
    """The id -> word table of a word-level tokenizer.

    Input:  captions   list of N strings; words are what `split_words` returns (lower-case letter runs)
            min_count  keep a word only if it occurs at least this many times over all captions
    Output: words      list[str]: words[0:3] == ["<pad>", "<unk>", "<s>"], then every kept word once,
                       in alphabetical order, so that the word words[i] has id i

    Example: build_vocab(["a red circle", "A blue circle."])
             -> ["<pad>", "<unk>", "<s>", "a", "blue", "circle", "red"]
             build_vocab(["a red circle", "A blue circle."], min_count=2) -> ["<pad>", "<unk>", "<s>", "a", "circle"]
    """
    # TODO begin ------------------------------------------------------
    raise NotImplementedError("exercise: build_vocab")
    # TODO end --------------------------------------------------------


def encode_caption(caption: str, words: list[str], max_len: int) -> torch.Tensor:
    """One caption -> a fixed-length row of token ids.

    Input:  caption  a string
            words    the id -> word table made by build_vocab
            max_len  length of the output (the start token counts)
    Output: ids      LongTensor [max_len]: the id of "<s>", then the ids of the caption's words in order
                     (a word missing from `words` gets the id of "<unk>"), cut so the whole row has at most
                     max_len ids, then "<pad>" ids up to max_len

    Example (words from the example above):
             encode_caption("a red square", words, 6) -> tensor([2, 3, 6, 1, 0, 0])
             encode_caption("", words, 4)             -> tensor([2, 0, 0, 0])
    """
    # TODO begin ------------------------------------------------------
    raise NotImplementedError("exercise: encode_caption")
    # TODO end --------------------------------------------------------
