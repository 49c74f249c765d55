"""CLIP's byte-level BPE tokenizer: how Stable Diffusion v1 turns a prompt into 77 token ids.

Byte-pair encoding (Sennrich, Haddow & Birch 2016, "Neural Machine Translation of Rare Words with
Subword Units", arXiv:1508.07909) learns a list of merges from a corpus: start from single symbols and
repeatedly glue the most frequent adjacent pair into a new symbol. CLIP (Radford et al. 2021, "Learning
Transferable Visual Models From Natural Language Supervision", arXiv:2103.00020) uses a byte-level BPE
with 49408 tokens: 256 bytes, the same 256 bytes marking a word's end, 48894 merges, and two specials.

Encoding one prompt:
1. Clean: Unicode NFC normalisation, whitespace runs -> one space (Python's str.split), lower-case.
2. Pre-tokenize with CLIP's pattern  <|startoftext|> | <|endoftext|> | 's|'t|'re|'ve|'m|'ll|'d |
   \\p{L}+ (a run of letters) | \\p{N} (ONE digit: "2024" is four pieces) | [^\\s\\p{L}\\p{N}]+ (a run of
   anything else: punctuation, emoji, combining marks). Spaces only separate pieces.
3. Bytes -> symbols: each UTF-8 byte of a piece becomes one printable character (`bytes_to_unicode`),
   so any text, emoji included, is spelled with 256 base symbols and nothing is ever "unknown".
   The last symbol gets the end-of-word marker '</w>' ("cat" -> c, a, t</w>): "cat</w>" the word and
   "cat" the prefix of "category" are different tokens.
4. Merge: repeatedly merge the adjacent pair with the LOWEST merge rank (learnt earliest), every
   occurrence left to right, until no adjacent pair is in the merge list. Each final symbol is a token.
Ids: <|startoftext|> = 49406, the tokens, <|endoftext|> = 49407; longer than 77 -> cut to 77 with the
end token kept last; shorter -> padded with <|endoftext|> (49407), SD v1's convention (the text encoder
sees all 77 positions; its causal mask keeps the padding from changing the real tokens' states).

What we do NOT run: OpenAI's and open_clip's tokenizers first pass text through ftfy.fix_text (repairs
mojibake, straightens curly quotes, expands ligatures, folds full-width letters) and html.unescape.
We run neither, like transformers' CLIPTokenizer as diffusers' SD pipelines use it: "&amp;", "“x”",
"ﬁ" or "ＡＢＣ" are tokenized as written. On text without such characters the ids equal open_clip's
(up to padding: open_clip pads with 0), except that "<|endoftext|>" typed in a prompt is the special
token here (as in OpenAI's CLIP and transformers) and characters there. Known differences from
transformers: we lower-case with Python's str.lower, which writes a word-final capital sigma as 'ς'
(transformers: 'σ'), and treat the control characters U+001C..U+001F as whitespace (str.split). The pattern's \\p{L} / \\p{N} need the third-party `regex` package; we rebuild them for Python's `re`
(`_letter_number_classes`), so they follow the Unicode version of this Python's `unicodedata`.
"""
from __future__ import annotations

import gzip
import json
import os
import re
import sys
import unicodedata
from functools import lru_cache
from pathlib import Path

import torch

START, END = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"
CONTEXT_LENGTH = 77  # CLIP's text context, and SD v1's


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """byte -> printable character. The 188 printable bytes ('!'..'~', '¡'..'¬', '®'..'ÿ') map to
    themselves; the other 68 (space, control bytes, ...) to chr(256), chr(257), ... in byte order,
    so BPE symbols never contain whitespace or control characters. The dict's order (printable bytes
    first) is the order of CLIP's first 256 token ids: 'a' is id 320, not 97."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + n) for n, b in enumerate(others)})
    return table


@lru_cache(maxsize=1)
def _letter_number_classes() -> tuple[str, str]:
    """(L, N): `re` class bodies for Unicode's \\p{L} (letters) and \\p{N} (numbers).

    Python's `re` has no \\p{..}. Its \\w is "str.isalnum() or '_'", and isalnum is exactly categories
    L* and N*; str.isalpha() is exactly L*. So \\p{N} = numeric and not alphabetic (Nd digits 0-9 ٣ ३,
    Nl like Ⅻ, No like ² ½ ①), written out as ranges, and \\p{L} = [^\\W_ N]: a word character that is
    neither '_' nor a number."""
    numbers = [cp for cp in range(sys.maxunicode + 1) if chr(cp).isnumeric() and not chr(cp).isalpha()]
    ranges: list[list[int]] = []
    for cp in numbers:
        if ranges and ranges[-1][1] == cp - 1:
            ranges[-1][1] = cp
        else:
            ranges.append([cp, cp])
    n_class = "".join(re.escape(chr(a)) if a == b else f"{re.escape(chr(a))}-{re.escape(chr(b))}" for a, b in ranges)
    return rf"^\W_{n_class}", n_class  # used as [^\W_N] and [N]


@lru_cache(maxsize=1)
def clip_pattern() -> re.Pattern:
    """CLIP's pre-tokenizer pattern (see the module docstring), with \\p{L} / \\p{N} emulated for `re`."""
    letters, numbers = _letter_number_classes()
    other = r"(?:[^\s\w]|_)+"  # [^\s\p{L}\p{N}]+ : not whitespace, not a letter or number ('_' included)
    return re.compile(
        rf"{re.escape(START)}|{re.escape(END)}|'s|'t|'re|'ve|'m|'ll|'d|[{letters}]+|[{numbers}]|{other}"
    )


def clean(text: str) -> str:
    """NFC, whitespace runs -> one space, strip, lower-case (the cleanup without ftfy / HTML unescaping)."""
    return " ".join(unicodedata.normalize("NFC", text).split()).lower()


class BPETokenizer:
    """Prompts -> LongTensor [B, 77]:  49406, BPE ids ..., 49407, 49407 (padding) ...

    vocab: token string -> id (49408 entries for CLIP); merges: symbol pairs in rank order.
    """

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]]):
        for special in (START, END):
            if special not in vocab:
                raise ValueError(f"The BPE vocabulary has no {special} token; is it a CLIP vocabulary?")
        missing = [a + b for a, b in merges if a + b not in vocab]
        if missing:
            raise ValueError(f"{len(missing)} merges make tokens missing from the vocabulary (e.g. {missing[0]!r}): "
                             "vocab.json and merges.txt do not belong together.")
        self.vocab = vocab
        self.id_to_token = {i: t for t, i in vocab.items()}
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}  # lower rank = merged earlier
        self.start_id, self.end_id = vocab[START], vocab[END]
        self.pad_id = self.end_id  # SD v1 pads with <|endoftext|>
        self.byte_to_char = bytes_to_unicode()
        self.char_to_byte = {c: b for b, c in self.byte_to_char.items()}
        self.pattern = clip_pattern()
        self.cache: dict[str, list[str]] = {}

    @classmethod
    def from_folder(cls, path: str | os.PathLike) -> "BPETokenizer":
        """A transformers / diffusers tokenizer folder (e.g. SD's `tokenizer/`): vocab.json + merges.txt."""
        path = Path(path)
        for name in ("vocab.json", "merges.txt"):
            if not (path / name).is_file():
                raise FileNotFoundError(
                    f"{path} has no {name}: give the tokenizer/ folder of a Stable Diffusion download "
                    "(vocab.json and merges.txt), or use from_merges_gz with open_clip's bpe_simple_vocab_16e6.txt.gz."
                )
        vocab = json.loads((path / "vocab.json").read_text(encoding="utf-8"))
        lines = (path / "merges.txt").read_text(encoding="utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines if line.strip() and not line.startswith("#version")]
        return cls(vocab, merges)

    @classmethod
    def from_merges_gz(cls, path: str | os.PathLike) -> "BPETokenizer":
        """OpenAI CLIP's / open_clip's `bpe_simple_vocab_16e6.txt.gz` (merges only); the vocabulary is built
        as CLIP builds it: 256 byte symbols, the same with '</w>', one token per merge, the two specials."""
        lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")
        merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]  # line 0 is a version header
        base = list(bytes_to_unicode().values())
        tokens = base + [c + END_OF_WORD for c in base] + ["".join(m) for m in merges] + [START, END]
        return cls({t: i for i, t in enumerate(tokens)}, merges)

    def bpe(self, piece: str) -> list[str]:
        """One pre-token (already in byte symbols) -> its BPE tokens, e.g. 'tokenizer' -> ['token', 'izer</w>']."""
        if piece in self.cache:
            return self.cache[piece]
        symbols = list(piece[:-1]) + [piece[-1] + END_OF_WORD]
        while len(symbols) > 1:
            pair = min(zip(symbols, symbols[1:]), key=lambda p: self.ranks.get(p, float("inf")))
            if pair not in self.ranks:
                break  # no adjacent pair was ever merged: done
            merged, i = [], 0
            while i < len(symbols):  # merge every occurrence of `pair`, left to right
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        self.cache[piece] = symbols
        return symbols

    def encode(self, text: str) -> list[int]:
        """text -> BPE ids, without start / end tokens and without truncation."""
        ids = []
        for piece in self.pattern.findall(clean(text)):
            if piece in (START, END):  # written out in the prompt: the special token itself (as CLIP does)
                ids.append(self.vocab[piece])
                continue
            symbols = "".join(self.byte_to_char[b] for b in piece.encode("utf-8"))
            ids.extend(self.vocab[token] for token in self.bpe(symbols))
        return ids

    def decode(self, ids: list[int]) -> str:
        """ids -> text (specials kept as written, '</w>' -> a space); shows a learner what each id is."""
        text = "".join(self.id_to_token[int(i)] for i in ids)
        specials = re.split(f"({re.escape(START)}|{re.escape(END)})", text)
        return "".join(
            part if part in (START, END) else
            bytes(self.char_to_byte[c] for c in part).decode("utf-8", errors="replace").replace(END_OF_WORD, " ")
            for part in specials
        ).strip()

    def __call__(self, texts: list[str] | str, max_length: int = CONTEXT_LENGTH) -> torch.Tensor:
        """B prompts (or one) -> LongTensor [B, max_length]: start, ids, end, then end-token padding.
        Over-long prompts keep their first max_length - 2 ids and the end token."""
        if max_length < 2:
            raise ValueError(f"max_length must leave room for the start and end tokens, got {max_length}.")
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = torch.full((len(texts), max_length), self.pad_id, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.start_id, *self.encode(text)[: max_length - 2], self.end_id]
            out[row, : len(ids)] = torch.tensor(ids)
        return out
