"""CLIP's byte-level BPE: merges by hand, the \\p{L}/\\p{N} emulation, 77-token framing, and identical ids
to open_clip's SimpleTokenizer and transformers' CLIPTokenizer on generated prompts (no download: the
vocabulary is the one open_clip ships)."""
import importlib.util
import json
import os
import random
import re
import sys
import unicodedata

import pytest
import torch

from minildm.text.bpe import END, START, BPETokenizer, _letter_number_classes, bytes_to_unicode, clean

N_PROMPTS = 1500


def open_clip_tokenizer_module():
    """open_clip/tokenizer.py loaded by file path (importing open_clip itself needs torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.submodule_search_locations is None:
        pytest.skip("open-clip-torch (test-only reference, ships CLIP's bpe_simple_vocab_16e6.txt.gz) is not installed")
    pytest.importorskip("ftfy", reason="open_clip's tokenizer needs ftfy")
    pytest.importorskip("regex", reason="open_clip's tokenizer needs regex")
    path = os.path.join(spec.submodule_search_locations[0], "tokenizer.py")
    module_spec = importlib.util.spec_from_file_location("open_clip_tokenizer", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def oc():
    return open_clip_tokenizer_module()


@pytest.fixture(scope="module")
def ours(oc):
    return BPETokenizer.from_merges_gz(oc.default_bpe())


@pytest.fixture(scope="module")
def tokenizer_folder(ours, tmp_path_factory):
    """A transformers-style tokenizer/ folder (vocab.json + merges.txt) derived from the gz file."""
    folder = tmp_path_factory.mktemp("tokenizer")
    (folder / "vocab.json").write_text(json.dumps(ours.vocab, ensure_ascii=False), encoding="utf-8")
    merges = sorted(ours.ranks, key=ours.ranks.get)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                       encoding="utf-8")
    return folder


WORDS = """a photograph of an astronaut riding horse on mars the quick brown fox jumps over lazy dog tokenizer
oil painting portrait highly detailed 4k trending artstation cinematic lighting unreal engine octane render
red circle left blue square right cat sat mat it's don't they'll we've i'm she'd you're isn't o'clock 'sup
café naïve über façade smörgåsbord ångström señor łódź crème brûlée são paulo dvořák straße ß é
中文 日本語 ひらがな カタカナ 한국어 東京タワー 漢字テスト 你好世界 привет мир γειά κόσμε αθήνα ελλάδα
مرحبا שלום नमस्ते हिन्दी สวัสดี բարեւ გამარჯობა snake_case __init__ x_1
🙂 🚀 👍🏽 👨‍👩‍👧 ❤️ 🎨🖌️ 🐱🐶 🌍""".split() + ["cafe\u0301", "sen\u0303or", "A\u030angstro\u0308m"]  # decomposed: NFC
PUNCT = list(",.!?;:-()[]{}/\\@#$%^*+=~`|<>\"'_") + ["...", "--", "!!", "?!", ":)", "->", "**", "''"]
NUMBERS = ["2024", "3.14", "1,000,000", "42nd", "x2", "7", "0", "1990s", "²", "½", "Ⅻ", "٣", "①", "३"]
SEPARATORS = [" ", " ", " ", "", "  ", "   ", "\t", "\n", " \n\t ", ", "]


def generated_prompts(n: int = N_PROMPTS, seed: int = 0) -> list[str]:
    """Deterministic varied prompts: words in many scripts, punctuation, digits, emoji, odd spacing and
    case; every 25th is over-long (60-150 pieces, beyond 77 tokens). No HTML entities ('&' is absent),
    curly quotes, ligatures, full-width forms or control characters: there open_clip runs ftfy / HTML
    unescaping and SD's tokenizer does not (checked against transformers below)."""
    rng = random.Random(seed)
    prompts = []
    for i in range(n):
        pieces = []
        for _ in range(rng.randint(60, 150) if i % 25 == 0 else rng.randint(1, 12)):
            kind = rng.random()
            piece = rng.choice(WORDS if kind < 0.6 else PUNCT if kind < 0.8 else NUMBERS)
            case = rng.random()
            piece = piece.upper() if case < 0.1 else piece.title() if case < 0.2 else piece
            pieces.append(piece + rng.choice(SEPARATORS))
        prompts.append(rng.choice(["", " ", "  "]) + "".join(pieces))
    return prompts


def test_merges_lowest_rank_first_left_to_right():
    """Hand-checked BPE (Sennrich et al. 2016): the lowest-ranked pair merges first, every occurrence
    left to right, and '</w>' makes a word's last symbol different from the same symbol inside a word."""
    symbols = ["a", "b", "c", "a</w>", "b</w>", "c</w>"]
    merges = [("b", "c</w>"), ("a", "b"), ("a", "a"), ("ab", "c</w>"), ("a", "a</w>")]
    vocab = {t: i for i, t in enumerate(symbols + ["".join(m) for m in merges] + [START, END])}
    tok = BPETokenizer(vocab, merges)
    assert tok.bpe("abc") == ["a", "bc</w>"]  # rank 0 (b, c</w>) beats rank 1 (a, b)
    assert tok.bpe("abca") == ["ab", "c", "a</w>"]  # c is not c</w> here, so (a, b) merges
    assert tok.bpe("aaaa") == ["aa", "aa</w>"]  # (a, a) left to right: aa a a</w>; then (a, a</w>)
    assert tok.bpe("c") == ["c</w>"]
    assert tok.encode("abc ABC") == [vocab["a"], vocab["bc</w>"]] * 2


def test_bytes_to_unicode_is_a_printable_bijection():
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    assert all(c.isprintable() and not c.isspace() for c in table.values())
    assert table[ord("a")] == "a" and table[ord(" ")] == "Ġ"  # space -> chr(256 + 32) = 'Ġ'
    assert list(table.values())[:3] == ["!", '"', "#"]  # printable bytes first: the ids' order


def test_letter_and_number_classes_equal_unicode_categories():
    """\\p{L} / \\p{N} rebuilt for Python's re match exactly Unicode general categories L* / N*."""
    letters, numbers = _letter_number_classes()
    everything = "".join(map(chr, range(sys.maxunicode + 1)))
    found_l = set(re.findall(f"[{letters}]", everything))
    found_n = set(re.findall(f"[{numbers}]", everything))
    want_l = {c for c in everything if unicodedata.category(c)[0] == "L"}
    want_n = {c for c in everything if unicodedata.category(c)[0] == "N"}
    assert found_l == want_l and found_n == want_n
    assert {"é", "中", "ß", "ǅ", "ー"} <= found_l and {"7", "٣", "²", "Ⅻ", "①"} <= found_n


def test_clean_nfc_whitespace_lowercase():
    assert clean("  Cafe\u0301\t\n  AU  lait ") == "café au lait"  # e + combining acute -> é (NFC)


def test_framing_padding_and_truncation(ours):
    empty = ours("")  # SD's unconditional prompt
    assert empty.shape == (1, 77) and empty[0, :2].tolist() == [49406, 49407] and (empty[0, 2:] == 49407).all()
    short = ours(["a cat", "a dog on a mat"])
    assert short.dtype == torch.long and short.shape == (2, 77)
    assert short[0, :4].tolist() == [49406, 320, 2368, 49407] and (short[0, 4:] == 49407).all()
    long_prompt = " ".join(["cat"] * 200)
    ids = ours(long_prompt)[0]
    assert ids.shape == (77,) and ids[0] == 49406 and ids[-1] == 49407
    assert ids[1:76].tolist() == ours.encode(long_prompt)[:75] == [2368] * 75
    assert ours(long_prompt, max_length=10)[0].tolist() == [49406] + [2368] * 8 + [49407]
    assert ours.decode(ours.encode("a Photograph, 2024!")) == "a photograph , 2 0 2 4 !"
    assert ours.encode("x <|endoftext|>") == [343, 49407]  # written out: the special token, as CLIP does


def test_folder_and_gz_give_the_same_tokenizer(ours, tokenizer_folder):
    folder = BPETokenizer.from_folder(tokenizer_folder)
    assert folder.vocab == ours.vocab and len(ours.vocab) == 49408 and folder.ranks == ours.ranks
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        BPETokenizer.from_folder(tokenizer_folder.parent)
    with pytest.raises(ValueError, match="do not belong together"):
        BPETokenizer({START: 0, END: 1, "a": 2, "b": 3}, [("a", "b")])  # 'ab' is not in the vocabulary


def test_same_ids_as_open_clip(oc, ours):
    """Identical ids to open_clip's SimpleTokenizer on N_PROMPTS generated prompts (open_clip pads with
    0 where SD pads with 49407, so its padding is mapped before comparing the [B, 77] tensors)."""
    ref = oc.SimpleTokenizer()
    prompts = generated_prompts()
    mismatches = [p for p in prompts if ours.encode(p) != ref.encode(p)]
    assert not mismatches, f"{len(mismatches)} of {len(prompts)} differ, e.g. {mismatches[0]!r}"
    theirs = ref(prompts)
    after_end = torch.cumsum(theirs == ref.eot_token_id, dim=1) - (theirs == ref.eot_token_id).long() > 0
    theirs[after_end] = 49407
    assert torch.equal(ours(prompts), theirs)
    assert sum(len(ours.encode(p)) > 75 for p in prompts) >= N_PROMPTS // 25  # truncation was exercised


TRANSFORMERS_ONLY = [
    "fish &amp; chips", "&lt;b&gt;bold&lt;/b&gt; &quot;x&quot;", "“curly” ‘quotes’ don’t", "ﬁne ﬂour",
    "ＡＢＣ１２３ full width", "Ã© mojibake", "a\u00a0non-breaking space", "ellipsis… em—dash",
    "&#39;entity&#39;", "café &copy 2024",
]


def test_same_ids_as_transformers_clip_tokenizer(ours, tokenizer_folder, oc):
    """transformers' CLIPTokenizer (what diffusers' SD pipelines use; no ftfy) on the generated prompts and
    on text where open_clip's ftfy / HTML unescaping changes the ids (there SD's ids are transformers')."""
    transformers = pytest.importorskip("transformers", reason="transformers is a test-only reference")
    hf = transformers.CLIPTokenizer.from_pretrained(str(tokenizer_folder))
    prompts = generated_prompts(300, seed=1) + TRANSFORMERS_ONLY
    theirs = hf(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    mine = ours(prompts)
    differ = [p for p, a, b in zip(prompts, mine, theirs) if not torch.equal(a, b)]
    assert not differ, f"{len(differ)} differ, e.g. {differ[0]!r}"
    ref = oc.SimpleTokenizer()
    assert ours.encode("fish &amp; chips") != ref.encode("fish &amp; chips")  # open_clip unescapes to '&'


def test_documented_difference_from_transformers_final_sigma(ours, tokenizer_folder):
    """Python's str.lower (OpenAI CLIP, open_clip, us) writes a word-final capital sigma as 'ς';
    the tokenizers library lower-cases letter by letter ('σ'). Pinned so a change is noticed."""
    assert clean("ΟΔΟΣ") == "οδος"
