"""Word-level tokenizer: the first half of LDM's prompt model tau_theta(y).

Text -> words: lower-case, then every maximal run of letters a-z is a word; everything else (digits,
punctuation, accents, spaces) only separates words. "A red-circle, 2x!" -> ["a", "red", "circle", "x"].
This is deliberately simple: our captions are short English phrases, and the vocabulary is built from the
training captions and saved inside checkpoints (a learner can print it and read every id).

Ids: <pad> = 0, <unk> = 1, <s> = 2 (start token), then the vocabulary in alphabetical order.
Every encoded prompt starts with <s>, so even the empty prompt "" (the unconditional prompt of
classifier-free guidance) is one real token: [<s>, <pad>, <pad>, ...]. The padding mask is tokens != 0.
"""
from __future__ import annotations

import re
import warnings
from collections import Counter

import torch

PAD, UNK, BOS = "<pad>", "<unk>", "<s>"
PAD_ID, UNK_ID, BOS_ID = 0, 1, 2
SPECIALS = (PAD, UNK, BOS)


def split_words(text: str) -> list[str]:
    """'A red circle, on the LEFT.' -> ['a', 'red', 'circle', 'on', 'the', 'left']."""
    return re.findall(r"[a-z]+", text.lower())


class Tokenizer:
    """Maps prompts to fixed-length id tensors [B, max_len] (max_len counts the start token)."""

    def __init__(self, words: list[str], max_len: int = 16):
        """words: the whole id -> word table, starting with the three special tokens."""
        if tuple(words[:3]) != SPECIALS:
            raise ValueError(f"The word list must start with {SPECIALS}; build one with Tokenizer.build(captions).")
        if max_len < 1:
            raise ValueError(f"max_len must be at least 1 (room for the start token), got {max_len}.")
        self.words = list(words)
        self.max_len = max_len
        self.word_to_id = {w: i for i, w in enumerate(self.words)}
        self.unknown_counts: Counter = Counter()  # out-of-vocabulary words seen by encode()

    @classmethod
    def build(cls, captions: list[str], max_len: int = 16, min_count: int = 1) -> "Tokenizer":
        """Vocabulary = words appearing at least `min_count` times in `captions`, sorted alphabetically."""
        counts = Counter(w for caption in captions for w in split_words(caption))
        vocab = sorted(w for w, c in counts.items() if c >= min_count)
        return cls(list(SPECIALS) + vocab, max_len)

    @property
    def vocab_size(self) -> int:
        return len(self.words)

    def encode(self, texts: list[str]) -> torch.Tensor:
        """list of B prompts -> LongTensor [B, max_len]: <s> w_1 ... w_k <pad> ... <pad>.

        Prompts longer than max_len - 1 words are truncated (one warning per call); unknown words become
        <unk>, are counted in `self.unknown_counts`, and each new one is warned about once.
        """
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise ValueError("Tokenizer.encode expects a list of strings, e.g. encode(['a red circle']).")
        tokens = torch.full((len(texts), self.max_len), PAD_ID, dtype=torch.long)
        truncated = 0
        for row, text in enumerate(texts):
            words = split_words(text)
            for w in words:
                if w not in self.word_to_id:
                    if w not in self.unknown_counts:
                        warnings.warn(f"Unknown word {w!r} is not in the tokenizer vocabulary; encoded as <unk>.")
                    self.unknown_counts[w] += 1
            if text.strip() and not any(w in self.word_to_id for w in words):
                warnings.warn(f"The prompt {text!r} has no word the model knows (it reads English words such as "
                              f"{', '.join(self.words[len(SPECIALS):][:4])}): it draws the unconditional image, "
                              "as the empty prompt would.")
            ids = [BOS_ID] + [self.word_to_id.get(w, UNK_ID) for w in words]
            if len(ids) > self.max_len:
                truncated += 1
                ids = ids[: self.max_len]
            tokens[row, : len(ids)] = torch.tensor(ids)
        if truncated:
            warnings.warn(
                f"{truncated} of {len(texts)} prompts are longer than max_len={self.max_len} tokens "
                f"(start token included) and were truncated."
            )
        return tokens

    def decode(self, ids: torch.Tensor) -> list[str]:
        """LongTensor [B, L] -> B strings; <s> and <pad> are dropped, unknown words show as <unk>."""
        if ids.ndim != 2:
            raise ValueError(f"Tokenizer.decode expects ids of shape [B, L], got {tuple(ids.shape)}; use ids[None].")
        return [
            " ".join(self.words[i] for i in row.tolist() if i not in (PAD_ID, BOS_ID))
            for row in ids
        ]

    def state(self) -> dict:
        """Plain python values for checkpoints: {'words': [...], 'max_len': int}."""
        return {"words": list(self.words), "max_len": self.max_len}

    @classmethod
    def from_state(cls, state: dict) -> "Tokenizer":
        return cls(state["words"], state["max_len"])
