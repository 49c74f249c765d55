"""Lesson 06: the prompt model tau_theta(y), a small Transformer over the caption's tokens.

    python lessons/06_prompt_model/lesson.py [--quick]

In LDM the prompt encoder is trained together with the UNet, through the diffusion loss. To get a trained
encoder in seconds we give the library's PromptEncoder a stand-in task instead: read the colour, shape
and position of the caption back from its output at the start token <s>. Half the captions are
paraphrased ("a circle that is red, on the left"), so the words move around and the encoder has to find
them by content: exactly what attention is for. Then we run the trained encoder again, layer by layer,
with YOUR attention and padding_mask, and look inside.

Writes to lessons/06_prompt_model/out/:
    attention_maps.png     softmax(Q K^T / sqrt(d)) of every head and layer for two captions
    start_token.png        where <s> looks in the first layer, head by head: at the colour, shape, position words
    padding_mask.png       the outputs at the real tokens as the padding grows, with and without the mask
    kernels.png            naive vs chunked vs PyTorch's fused attention: time, memory of the scores, float32 error
Uses your attention / padding_mask from exercises.py once filled in, the library's until then.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from einops import rearrange, repeat  # noqa: E402

from lessons.common import QUICK, exercise_functions, out_dir, save_figure  # noqa: E402
from minildm.data import shapes  # noqa: E402
from minildm.modules.attention import chunked_attention, sdpa_attention  # noqa: E402
from minildm.text.encoder import PromptEncoder, TextEncoderConfig  # noqa: E402
from minildm.text.tokenizer import Tokenizer  # noqa: E402

OUT = out_dir(__file__)
STEPS = 50 if QUICK else 600
MAX_LEN = 16
TOKENIZER = Tokenizer.build([shapes.caption(*c, paraphrase=p) for c in shapes.SEEN for p in (False, True)], max_len=MAX_LEN)
ATTRIBUTES = (list(shapes.COLORS), list(shapes.SHAPES), list(shapes.POSITIONS))

FNS = exercise_functions(__file__)  # yours once filled in, the library's until then
attention, padding_mask = FNS["attention"], FNS["padding_mask"]


def train_encoder(steps: int, seed: int = 0) -> tuple:
    """PromptEncoder + three linear read-outs at <s>, trained to name colour, shape and position. Returns (encoder, accuracy)."""
    torch.manual_seed(seed)
    cfg = TextEncoderConfig(vocab_size=TOKENIZER.vocab_size, max_len=MAX_LEN, dim=64, depth=2, heads=4, dim_head=16)
    encoder = PromptEncoder(cfg)
    heads = nn.ModuleList([nn.Linear(64, len(values)) for values in ATTRIBUTES])
    opt = torch.optim.Adam([*encoder.parameters(), *heads.parameters()], lr=2e-3)
    rng = np.random.default_rng(seed)

    def batch(n: int) -> tuple:
        captions = shapes.sample_batch(n, rng, split="train", size=8, paraphrase_prob=0.5)[1]
        labels = torch.tensor([[values.index(a) for values, a in zip(ATTRIBUTES, shapes.parse_caption(c))] for c in captions])
        return TOKENIZER.encode(captions), labels

    for _ in range(steps):
        tokens, labels = batch(64)
        context, _ = encoder(tokens)  # [B, L, 64]
        loss = sum(F.cross_entropy(head(context[:, 0]), labels[:, i]) for i, head in enumerate(heads))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        tokens, labels = batch(512)
        context, _ = encoder(tokens)
        right = torch.stack([head(context[:, 0]).argmax(-1) == labels[:, i] for i, head in enumerate(heads)])
    return encoder.eval(), right.all(dim=0).float().mean().item()


@torch.no_grad()
def encode_with(encoder: PromptEncoder, tokens: torch.Tensor, attention_fn, mask: torch.Tensor | None) -> tuple:
    """The encoder's forward pass written out with a given attention function and mask.

    tokens [B, L] -> (context [B, L, dim], attention probabilities per layer: list of [B, H, L, L]).
    The probabilities come from attention_fn itself: with the identity matrix as values, softmax(...) V = softmax(...).
    """
    x = encoder.token_emb(tokens) + encoder.pos_emb[: tokens.shape[1]]  # h_0 = E[tokens] + P
    maps = []
    for block in encoder.blocks:
        attn = block.attn
        h = block.norm1(x)
        q, k, v = (rearrange(proj(h), "b n (h d) -> b h n d", h=attn.heads) for proj in (attn.to_q, attn.to_k, attn.to_v))
        out = attention_fn(q, k, v, mask)  # softmax(Q K^T / sqrt(d)) V, per head  [B, H, L, dim_head]
        eye = repeat(torch.eye(tokens.shape[1]), "m e -> b h m e", b=tokens.shape[0], h=attn.heads)
        maps.append(attention_fn(q, k, eye, mask))  # [B, H, L, L]
        x = x + attn.to_out(rearrange(out, "b h n d -> b n (h d)"))  # x += SelfAttn(LN x, mask)
        x = x + block.mlp(block.norm2(x))  # x += MLP(LN x)
    return encoder.norm(x), maps


def labels_of(tokens: torch.Tensor) -> list[str]:
    return [TOKENIZER.words[i] for i in tokens.tolist()]


def figure_attention_maps(encoder: PromptEncoder, prompts: list[str]) -> None:
    tokens = TOKENIZER.encode(prompts)
    _, maps = encode_with(encoder, tokens, attention, padding_mask(tokens))
    shown = int(padding_mask(tokens).sum(1).max()) + 2  # every real token and two pads
    heads = maps[0].shape[1]
    fig, axes = plt.subplots(len(prompts) * len(maps), heads, figsize=(3.1 * heads, 3.0 * len(prompts) * len(maps)))
    for p, prompt in enumerate(prompts):
        names = labels_of(tokens[p, :shown])
        for layer, probs in enumerate(maps):
            for h in range(heads):
                ax = axes[p * len(maps) + layer, h]
                ax.imshow(probs[p, h, :shown, :shown].numpy(), vmin=0, vmax=1, cmap="viridis")
                ax.set_xticks(range(shown), names, rotation=90, fontsize=6)
                ax.set_yticks(range(shown), names, fontsize=6)
                ax.set_title(f"layer {layer + 1}, head {h + 1}", fontsize=8)
            axes[p * len(maps) + layer, 0].set_ylabel(f"{prompt!r}\nquery", fontsize=7)
    fig.suptitle("attention probabilities (rows: queries, columns: keys; padded keys get 0)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, OUT / "attention_maps.png")


def figure_start_token(encoder: PromptEncoder, prompts: list[str]) -> None:
    """What the query <s> attends to in the first layer, one bar per head: each head picks its own words."""
    tokens = TOKENIZER.encode(prompts)
    _, maps = encode_with(encoder, tokens, attention, padding_mask(tokens))
    first = maps[0][:, :, 0]  # [B, H, L]: the <s> row of every head of layer 1
    heads = first.shape[1]
    fig, axes = plt.subplots(len(prompts), 1, figsize=(8, 1.8 * len(prompts)))
    for ax, prompt, row, weights in zip(axes, prompts, tokens, first):
        n = int(padding_mask(row[None]).sum())
        names = labels_of(row[:n])
        for h in range(heads):
            ax.bar(np.arange(n) + (h - (heads - 1) / 2) * 0.2, weights[h, :n].numpy(), 0.2, label=f"head {h + 1}")
        ax.set_xticks(range(n), names, fontsize=8)
        for label, name in zip(ax.get_xticklabels(), names):
            if name in shapes.COLORS or name in shapes.SHAPES or name in shapes.POSITIONS:
                label.set_color("tab:red")
        ax.set_ylim(0, 1)
        ax.set_title(repr(prompt), fontsize=8)
    axes[0].legend(fontsize=7, ncol=heads)
    fig.suptitle("layer 1, query <s>: attention of each head (red words: colour, shape, position)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, OUT / "start_token.png")


def figure_padding(encoder: PromptEncoder, prompt: str) -> None:
    """Encode the same prompt padded to several lengths: with the mask the real tokens' outputs never change."""
    full = TOKENIZER.encode([prompt])  # [1, MAX_LEN]
    n = int(padding_mask(full).sum())
    lengths = list(range(n, MAX_LEN + 1))
    base = {}
    diffs = {"with padding_mask": [], "mask=None (pads attended to)": []}
    pad_mass = []
    for length in lengths:
        tokens = full[:, :length]
        for label, mask in (("with padding_mask", padding_mask(tokens)), ("mask=None (pads attended to)", None)):
            context, maps = encode_with(encoder, tokens, attention, mask)
            base.setdefault(label, context[:, :n])
            diffs[label].append((context[:, :n] - base[label]).abs().max().item())
            if mask is None:
                pad_mass.append(maps[-1][0, :, :n, n:].sum(-1).mean().item())
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.3))
    for label, values in diffs.items():
        a.plot(lengths, values, "o-", label=label)
    a.set_xlabel("padded length L")
    a.set_ylabel(f"max |change| of the {n} real outputs")
    a.set_yscale("symlog", linthresh=1e-6)
    a.set_title(f"{prompt!r} ({n} real tokens) padded to L", fontsize=9)
    a.legend(fontsize=8)
    b.plot(lengths, pad_mass, "o-", color="tab:orange")
    b.set_xlabel("padded length L")
    b.set_ylabel("attention on <pad> keys")
    b.set_title("without the mask: share of the last layer's attention spent on pads", fontsize=9)
    fig.tight_layout()
    save_figure(fig, OUT / "padding_mask.png")
    print(f"  padding {n} -> {MAX_LEN} tokens changes the real outputs by {diffs['with padding_mask'][-1]:.1e} with the mask, "
          f"{diffs['mask=None (pads attended to)'][-1]:.2f} without")


def time_kernel(fn, *args, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - start)
    return best


@torch.no_grad()
def figure_kernels() -> None:
    """Self-attention over N positions (as in a UNet layer with N = h * w latent pixels), 4 heads of 32."""
    sizes = [64, 256, 1024] if QUICK else [64, 256, 1024, 2048, 4096]
    chunk = 256
    kernels = {"naive (your attention)": attention,
               f"chunked ({chunk}x{chunk} blocks)": lambda q, k, v: chunked_attention(q, k, v, q_chunk=chunk, k_chunk=chunk),
               "sdpa (PyTorch fused)": sdpa_attention}
    times = {name: [] for name in kernels}
    errors = {name: [] for name in kernels}
    for n in sizes:
        g = torch.Generator().manual_seed(n)
        q, k, v = (torch.randn(1, 4, n, 32, generator=g) for _ in range(3))
        reference = F.scaled_dot_product_attention(q.double(), k.double(), v.double())  # float64: the exact answer
        for name, fn in kernels.items():
            times[name].append(time_kernel(fn, q, k, v))
            errors[name].append((fn(q, k, v).double() - reference).abs().max().item())
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.4))
    for name in kernels:
        axes[0].plot(sizes, times[name], "o-", label=name)
        axes[2].plot(sizes, errors[name], "o-", label=name)
    axes[1].plot(sizes, [4 * n * n * 4 / 2**20 for n in sizes], "o-", label="naive: all B*H*N*N scores")
    axes[1].plot(sizes, [4 * min(n, chunk) ** 2 * 4 / 2**20 for n in sizes], "o-", label="chunked: one block of scores")
    axes[0].set_title("time (best of 3, seconds)", fontsize=9)
    axes[1].set_title("memory of the float32 score matrix (MiB)", fontsize=9)
    axes[2].set_title("max |error| against the same attention in float64", fontsize=9)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length N (= M)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, OUT / "kernels.png")
    for i, n in enumerate(sizes):
        print(f"  N = {n:>4}: " + " | ".join(f"{name.split(' ')[0]} {times[name][i] * 1e3:7.1f} ms" for name in kernels))


def main() -> None:
    print(f"lesson 06 (quick={QUICK})")
    encoder, accuracy = train_encoder(STEPS)
    tokens = TOKENIZER.encode(["a circle that is red, on the left", "a blue square in the center"])
    mine_context, _ = encode_with(encoder, tokens, attention, padding_mask(tokens))
    library_context, _ = encoder(tokens)
    print(f"  trained the prompt encoder for {STEPS} steps: colour, shape and position all read correctly from <s> "
          f"for {accuracy:.0%} of captions")
    print(f"  encoder written out with your attention + padding_mask vs PromptEncoder.forward: max difference "
          f"{(mine_context - library_context).abs().max().item():.1e}")
    figure_attention_maps(encoder, ["a red circle on the left", "a triangle that is cyan, in the center"])
    figure_start_token(encoder, ["a red circle on the left", "a circle that is red, on the left",
                                 "a yellow triangle in the center", "a square that is purple, on the top"])
    figure_padding(encoder, "a red circle on the left")
    figure_kernels()


if __name__ == "__main__":
    main()
