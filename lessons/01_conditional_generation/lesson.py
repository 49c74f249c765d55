"""Lesson 01: conditional generation. From a class label y to a caption: what a text-conditional model reads.

    python lessons/01_conditional_generation/lesson.py [--quick]

Writes to lessons/01_conditional_generation/out/:
    all_combinations.png   the 90 (colour, shape, position) classes of the shapes data, 10 held out
    captions.png           random training images with their captions
    vocabulary.png         the tokenizer's id -> word table and how often each word occurs
    tokens.png             captions -> token ids (start token, unknown words, padding, truncation)
    class_vs_text.png      training examples per class label vs per word: why text composes
Uses your build_vocab / encode_caption from exercises.py once they are filled in, the library's until then.
"""
from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from lessons.common import QUICK, exercise_functions, out_dir, save_figure  # noqa: E402
from minildm.data import shapes  # noqa: E402
from minildm.text.tokenizer import split_words  # noqa: E402

OUT = out_dir(__file__)
MAX_LEN = 12  # the tiny preset's prompt length (start token included)


FNS = exercise_functions(__file__)  # yours once filled in, the library's until then
build_vocab, encode_caption = FNS["build_vocab"], FNS["encode_caption"]


def figure_all_combinations() -> None:
    """6 colours (rows) x 15 (shape, position) columns, canonical renders; held-out classes framed in red."""
    columns = [(s, p) for s in shapes.SHAPES for p in shapes.POSITIONS]
    fig, axes = plt.subplots(len(shapes.COLORS), len(columns), figsize=(len(columns) * 0.9, len(shapes.COLORS) * 1.0))
    for r, color in enumerate(shapes.COLORS):
        for c, (shape, position) in enumerate(columns):
            ax = axes[r, c]
            ax.imshow(shapes.render(color, shape, position, size=32))
            ax.set_xticks([]), ax.set_yticks([])
            held = (color, shape, position) in shapes.HELD_OUT
            for spine in ax.spines.values():
                spine.set_color("red" if held else "white")
                spine.set_linewidth(3 if held else 0.5)
            if r == 0:
                ax.set_title(f"{shape}\n{position}", fontsize=7)
        axes[r, 0].set_ylabel(color, fontsize=8)
    fig.suptitle("the 90 classes y = (colour, shape, position); red frame = held out of training (10)", fontsize=10)
    save_figure(fig, OUT / "all_combinations.png")


def figure_captions(n: int) -> list[str]:
    """Random training images with their captions (a third of them in the paraphrased form)."""
    images, captions = shapes.sample_batch(n, np.random.default_rng(1), split="train", paraphrase_prob=0.33)
    cols = 4
    fig, axes = plt.subplots(n // cols, cols, figsize=(cols * 2.3, n // cols * 2.4))
    for ax, image, text in zip(axes.flat, images, captions):
        ax.imshow(((image + 1) / 2).permute(1, 2, 0).numpy())
        ax.set_title(text.replace(" on the", "\non the").replace(" in the", "\nin the"), fontsize=8)
        ax.axis("off")
    fig.suptitle("training pairs (x, caption)", fontsize=10)
    save_figure(fig, OUT / "captions.png")
    return captions


def figure_vocabulary(words: list[str], captions: list[str]) -> None:
    counts = Counter(w for c in captions for w in split_words(c))
    fig, ax = plt.subplots(figsize=(5.5, 0.28 * len(words) + 0.8))
    ax.axis("off")
    rows = [[str(i), w, str(counts.get(w, "-"))] for i, w in enumerate(words)]
    table = ax.table(cellText=rows, colLabels=["id", "word", f"count in {len(captions)} training captions"],
                     loc="center", cellLoc="center")
    table.scale(1, 1.15)
    for i in range(3):  # the special tokens
        for j in range(3):
            table[i + 1, j].set_facecolor("#dde8ff")
    ax.set_title(f"vocabulary: {len(words)} ids = 3 special tokens + {len(words) - 3} words", fontsize=10)
    save_figure(fig, OUT / "vocabulary.png")


def figure_tokens(words: list[str], examples: list[str]) -> torch.Tensor:
    """Captions (rows) -> token ids (columns); colours: <s> blue, <unk> orange, <pad> grey."""
    ids = torch.stack([encode_caption(c, words, MAX_LEN) for c in examples])  # [B, MAX_LEN]
    colors = {0: "#e6e6e6", 1: "#ffc880", 2: "#a8c8ff"}
    fig, ax = plt.subplots(figsize=(MAX_LEN * 0.95 + 3.2, len(examples) * 0.55 + 0.8))
    for r, row in enumerate(ids.tolist()):
        for c, i in enumerate(row):
            ax.add_patch(plt.Rectangle((c, r), 1, 1, facecolor=colors.get(i, "white"), edgecolor="gray", lw=0.5))
            ax.text(c + 0.5, r + 0.5, f"{words[i] if 0 <= i < len(words) else '?'}\n{i}", ha="center", va="center", fontsize=7)
    ax.set_xlim(0, MAX_LEN), ax.set_ylim(len(examples), 0)
    ax.set_yticks([r + 0.5 for r in range(len(examples))], [repr(c) for c in examples], fontsize=8)
    ax.set_xticks([c + 0.5 for c in range(MAX_LEN)], range(MAX_LEN), fontsize=7)
    ax.set_xlabel("position in the token row (max_len = %d, start token included)" % MAX_LEN)
    ax.set_title("encode_caption: <s> blue, <unk> orange, <pad> grey (mask = ids != 0)", fontsize=10)
    save_figure(fig, OUT / "tokens.png")
    return ids


def figure_class_vs_text(words: list[str], n: int) -> None:
    """Training examples that update each class embedding vs each word embedding.

    A class-conditional model has one embedding per class: the 10 held-out classes get no examples at all,
    so their embeddings stay at their random initial values. A text model has one embedding per word: every
    word of a held-out caption is seen thousands of times in other combinations."""
    _, captions = shapes.sample_batch(n, np.random.default_rng(2), split="train")
    class_ids = {combo: i for i, combo in enumerate(shapes.ALL_COMBOS)}
    per_class = np.bincount([class_ids[shapes.parse_caption(c)] for c in captions], minlength=len(shapes.ALL_COMBOS))
    ids = torch.stack([encode_caption(c, words, MAX_LEN) for c in captions])
    per_word = np.bincount(ids.flatten().numpy(), minlength=len(words))
    held = [class_ids[c] for c in shapes.HELD_OUT]
    held_words = {w for combo in shapes.HELD_OUT for w in combo}

    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 3.6), gridspec_kw={"width_ratios": [2.2, 1]})
    a.bar(range(len(per_class)), per_class, color=["red" if i in held else "tab:blue" for i in range(len(per_class))])
    a.plot(held, np.zeros(len(held)), "rx", ms=8, mew=2)  # the empty bars of the held-out classes
    a.set_xlabel("class id y (colour-major order)")
    a.set_ylabel(f"examples in {n} draws")
    a.set_title(f"class-conditional: ~{n // len(shapes.SEEN)} examples per class, 0 for the 10 held-out (red)", fontsize=9)
    b.bar(range(3, len(words)), per_word[3:], color=["red" if w in held_words else "tab:green" for w in words[3:]])
    b.set_xticks(range(3, len(words)), words[3:], rotation=90, fontsize=7)
    b.set_title("text-conditional: examples per word id (red = words of held-out\n"
                "captions: all well trained; 'that', 'is' only occur in paraphrases)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, OUT / "class_vs_text.png")
    print(f"  class-conditional: held-out classes got {per_class[held].sum()} examples; "
          f"text: the rarest word of a held-out caption got {min(per_word[words.index(w)] for w in held_words)}")


def main() -> None:
    print(f"lesson 01 (quick={QUICK})")
    figure_all_combinations()
    train_captions = [shapes.caption(*combo, paraphrase=p) for combo in shapes.SEEN for p in (False, True)]
    words = build_vocab(train_captions)
    print(f"  vocabulary of {len(words)} ids: {words}")
    figure_captions(8 if QUICK else 16)
    figure_vocabulary(words, train_captions)
    examples = ["a red circle on the left", "a circle that is red, on the left", "a blue triangle in the center",
                "a pink circle on the moon", "", "a small red circle that is on the left of a big blue square"]
    ids = figure_tokens(words, examples)
    for text, row in zip(examples, ids):
        print(f"  {text!r:<68} -> {row.tolist()}")
    figure_class_vs_text(words, 2000 if QUICK else 8000)


if __name__ == "__main__":
    main()
