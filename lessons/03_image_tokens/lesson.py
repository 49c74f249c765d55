"""Lesson 03: image tokens. A VQ-VAE turns a 32x32 image into an 8x8 grid of ids from a K-word codebook.

    python lessons/03_image_tokens/lesson.py [--quick]

Parti (and DALL-E, Make-A-Scene, MUSE) generate images as sequences of such tokens; LDM keeps the same
VQ autoencoder but runs diffusion on the continuous latents before quantisation. Here we train a small
VQ-VAE (the library's Encoder and Decoder, your quantize / vq_loss / straight_through in between) for a
few hundred steps, look at its tokens, and then ask how many codes an image needs: we refit codebooks of
K = 2 ... 256 codes to the trained encoder's outputs (k-means) and decode through the same decoder.

Writes to lessons/03_image_tokens/out/:
    tokens.png           images, their token grids, the images rebuilt from the tokens alone, and token surgery
    training.png         L1 reconstruction loss, ||z_e - z_q||^2 and codes in use during training
    codebook_usage.png   how often each code is used on held-out images (dead codes), beside the tiny run's
    codebook_size.png    PSNR against K and bits per image, with reconstructions
    tokens_tiny_run.png  (only when runs/tiny/autoencoder.pt exists) the same token view for the trained tiny model
Uses your quantize / vq_loss / straight_through from exercises.py once filled in, the library's until then.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from einops import rearrange  # noqa: E402

from lessons.common import QUICK, TINY_RUN, exercise_functions, out_dir, save_figure  # noqa: E402
from minildm.autoencoder.vqvae import VQConfig, VQVAE, codebook_stats, nearest_code_indices  # noqa: E402
from minildm.data import shapes  # noqa: E402
from minildm.train.autoencoder import psnr  # noqa: E402
from minildm.viz import make_grid  # noqa: E402

OUT = out_dir(__file__)
STEPS = 15 if QUICK else 600
NUM_CODES = 256  # K of the trained model (the tiny preset's)
SWEEP = (2, 32) if QUICK else (2, 4, 8, 16, 32, 64, 128, 256)  # codebook sizes refitted afterwards
BATCH, LR, BETA = 16, 2e-3, 0.25

FNS = exercise_functions(__file__)  # yours once filled in, the library's until then
quantize, vq_loss, straight_through = FNS["quantize"], FNS["vq_loss"], FNS["straight_through"]


def vq_config(num_codes: int) -> VQConfig:
    """The tiny preset's architecture at half width, with a plain gradient-trained codebook (no EMA, no restarts)."""
    return replace(VQConfig.tiny(), channels=16, num_codes=num_codes, use_ema=False, dead_code_threshold=0, kmeans_iters=0)


def train_vq(num_codes: int, steps: int, seed: int = 0) -> tuple:
    """Train a VQ-VAE with L1 + L_VQ; returns (model, history, seconds)."""
    torch.manual_seed(seed)
    model = VQVAE(vq_config(num_codes))
    codebook = model.quantizer.codebook  # e_k = codebook[k], a gradient-trained nn.Parameter [K, D]
    opt = torch.optim.Adam(model.parameters(), LR, betas=(0.5, 0.9))
    rng = np.random.default_rng(seed)
    history = {"L1": [], "||z_e - z_q||^2": [], "codes used (fraction)": []}
    start = time.perf_counter()
    for step in range(steps):
        x, _ = shapes.sample_batch(BATCH, rng, split="train")
        z_e = model.encode(x)  # [B, D, 8, 8]
        if step == 0:  # start the codes on encoder outputs: codes far from every z_e never win an argmin ("dead")
            with torch.no_grad():
                vectors = rearrange(z_e, "b d h w -> (b h w) d")
                codebook.copy_(vectors[torch.randperm(len(vectors))[:num_codes]])
        z_q, indices = quantize(z_e, codebook)
        loss_vq = vq_loss(z_e, z_q, BETA)
        x_rec = model.decoder(straight_through(z_e, z_q))
        l1 = (x - x_rec).abs().mean()
        opt.zero_grad(set_to_none=True)
        (l1 + loss_vq).backward()
        opt.step()
        if step % 5 == 0 or step == steps - 1:
            history["L1"].append((step, l1.item()))
            history["||z_e - z_q||^2"].append((step, F.mse_loss(z_e, z_q).item()))
            history["codes used (fraction)"].append((step, indices.unique().numel() / num_codes))
    return model.eval(), history, time.perf_counter() - start


def held_out_images(n: int) -> torch.Tensor:
    return shapes.sample_batch(n, np.random.default_rng(123), split="all")[0]  # [n, 3, 32, 32] in [-1, 1]


@torch.no_grad()
def evaluate(model: VQVAE, images: torch.Tensor) -> dict:
    indices = model.quantizer.nearest(model.encode(images))  # [N, 8, 8] token ids
    rebuilt = model.decode_indices(indices)
    counts = torch.bincount(indices.flatten(), minlength=model.cfg.num_codes)
    perplexity, usage = codebook_stats(counts)
    h, w = indices.shape[1:]
    return {"psnr": psnr((rebuilt + 1) / 2, (images + 1) / 2), "usage": usage.item(), "perplexity": perplexity.item(),
            "counts": counts, "bits": h * w * math.log2(model.cfg.num_codes), "rebuilt": rebuilt}


@torch.no_grad()
def figure_tokens(model: VQVAE, images: torch.Tensor, name: str, title: str) -> None:
    """Per row: image | token ids | decode_indices(tokens) | left half of this row's tokens + right half of the next row's."""
    indices = model.quantizer.nearest(model.encode(images))  # [n, h, w]
    rebuilt = model.decode_indices(indices)
    half = indices.shape[2] // 2
    mixed = torch.cat([indices[:, :, :half], indices.roll(-1, dims=0)[:, :, half:]], dim=2)
    spliced = model.decode_indices(mixed)
    n = len(images)
    fig, axes = plt.subplots(n, 4, figsize=(10, 2.5 * n))
    for r in range(n):
        axes[r, 0].imshow(((images[r] + 1) / 2).clamp(0, 1).permute(1, 2, 0).numpy())
        ids = indices[r].numpy()
        axes[r, 1].imshow(ids % 20, cmap="tab20", vmin=0, vmax=19)  # colour = id mod 20
        for (i, j), k in np.ndenumerate(ids):
            axes[r, 1].text(j, i, str(k), ha="center", va="center", fontsize=6)
        axes[r, 2].imshow(((rebuilt[r] + 1) / 2).clamp(0, 1).permute(1, 2, 0).numpy())
        axes[r, 3].imshow(((spliced[r] + 1) / 2).clamp(0, 1).permute(1, 2, 0).numpy())
        for ax in axes[r]:
            ax.set_xticks([]), ax.set_yticks([])
    for ax, label in zip(axes[0], ["image x", f"tokens ({indices.shape[1]}x{indices.shape[2]} ids)", "decode_indices(tokens)",
                                   "left tokens of this row +\nright tokens of the next row"]):
        ax.set_title(label, fontsize=9)
    fig.suptitle(title, fontsize=10)
    save_figure(fig, OUT / name)


def figure_training(history: dict) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(12, 3))
    for ax, (key, points) in zip(axes, history.items()):
        ax.plot(*zip(*points), lw=1)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step")
    axes[0].set_yscale("log"), axes[1].set_yscale("log")
    fig.suptitle(f"training the K = {NUM_CODES} VQ-VAE (codes used = distinct ids in a batch of {BATCH} images / K)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, OUT / "training.png")


def figure_usage(results: dict) -> None:
    """Sorted code counts on held-out images for each model in `results` ({title: evaluate(...)})."""
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.2), squeeze=False)
    for ax, (title, r) in zip(axes[0], results.items()):
        counts = r["counts"].sort(descending=True).values.numpy()
        ax.bar(range(len(counts)), counts, width=1.0)
        ax.set_yscale("symlog")
        ax.set_title(f"{title}\n{int((counts > 0).sum())} of {len(counts)} codes used, perplexity {r['perplexity']:.1f}", fontsize=9)
        ax.set_xlabel("codes, most used first")
    axes[0, 0].set_ylabel("latent pixels assigned")
    fig.suptitle("codebook usage on held-out images (dead codes = the empty tail)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, OUT / "codebook_usage.png")


@torch.no_grad()
def kmeans(vectors: torch.Tensor, k: int, iters: int = 15, seed: int = 0) -> torch.Tensor:
    """Lloyd's k-means: vectors [N, D] -> k centres [k, D], started from k random vectors."""
    g = torch.Generator().manual_seed(seed)
    centres = vectors[torch.randperm(len(vectors), generator=g)[:k]].clone()
    for _ in range(iters):
        assign = nearest_code_indices(vectors, centres, chunk_size=4096)
        sums = torch.zeros_like(centres).index_add_(0, assign, vectors)
        counts = torch.bincount(assign, minlength=k)[:, None]
        centres = torch.where(counts > 0, sums / counts.clamp(min=1), centres)
    return centres


@torch.no_grad()
def codebook_sweep(model: VQVAE, train_images: torch.Tensor, images: torch.Tensor) -> dict:
    """PSNR of the same encoder and decoder with a k-means codebook of K codes fitted to training latents."""
    vectors = rearrange(model.encode(train_images), "b d h w -> (b h w) d")
    z_e = model.encode(images)
    results = {}
    for k in SWEEP:
        z_q, indices = quantize(z_e, kmeans(vectors, k))
        h, w = indices.shape[1:]
        results[k] = {"psnr": psnr((model.decoder(z_q) + 1) / 2, (images + 1) / 2), "bits": h * w * math.log2(k),
                      "rebuilt": model.decoder(z_q)}
    results["continuous"] = {"psnr": psnr((model.decoder(z_e) + 1) / 2, (images + 1) / 2), "rebuilt": model.decoder(z_e)}
    return results


def figure_codebook_size(sweep: dict, trained: dict, images: torch.Tensor) -> None:
    ks = [k for k in sweep if k != "continuous"]
    fig = plt.figure(figsize=(13, 4.4))
    ax = fig.add_subplot(1, 2, 1)
    ax.plot(ks, [sweep[k]["psnr"] for k in ks], "o-", label="k-means codebook of K codes")
    ax.axhline(sweep["continuous"]["psnr"], color="gray", ls="--", label="no quantisation (decoder on z_e)")
    ax.plot([NUM_CODES], [trained["psnr"]], "r*", ms=12, label=f"the trained codebook (K = {NUM_CODES})")
    for k in ks:
        ax.annotate(f"{sweep[k]['bits']:.0f} b", (k, sweep[k]["psnr"]), textcoords="offset points", xytext=(0, -13),
                    fontsize=7, ha="center")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("codebook size K (labels: bits per image = 64 log2 K)")
    ax.set_ylabel("PSNR on held-out shapes (dB)")
    ax.set_title("same encoder and decoder, only the codebook changes", fontsize=9)
    ax.legend(fontsize=8)
    rows = [k for k in ks if k in (2, 8, 32, 128, 256)]
    grid = torch.cat([images[:8]] + [sweep[k]["rebuilt"][:8] for k in rows] + [sweep["continuous"]["rebuilt"][:8]])
    ax2 = fig.add_subplot(1, 2, 2)
    ax2.imshow(make_grid(((grid + 1) / 2).clamp(0, 1), nrow=8, upscale=2))
    ax2.set_yticks([(i + 0.5) * 66 for i in range(len(rows) + 2)],
                   ["original"] + [f"K = {k}" for k in rows] + ["no quantisation"], fontsize=8)
    ax2.set_xticks([])
    ax2.set_title("held-out shapes rebuilt", fontsize=9)
    save_figure(fig, OUT / "codebook_size.png")


def main() -> None:
    print(f"lesson 03 (quick={QUICK})")
    images = held_out_images(64 if QUICK else 256)
    model, history, seconds = train_vq(NUM_CODES, STEPS)
    trained = evaluate(model, images)
    print(f"  trained a K = {NUM_CODES} VQ-VAE for {STEPS} steps in {seconds:.0f} s: PSNR {trained['psnr']:.1f} dB from "
          f"tokens | {trained['usage']:.0%} of codes used | perplexity {trained['perplexity']:.1f}")
    figure_training(history)
    figure_tokens(model, images[:4], "tokens.png", f"a 32x32 image is {8 * 8} tokens from a codebook of K = {NUM_CODES}")
    with torch.no_grad():
        sentence = model.quantizer.nearest(model.encode(images[:1]))[0].flatten().tolist()
    print(f"  the first image as a token sentence (raster order, what Parti's decoder would predict): {sentence}")
    print(f"  {len(sentence)} tokens x {math.log2(NUM_CODES):.0f} bits = {len(sentence) * math.log2(NUM_CODES):.0f} bits, "
          f"against 32 x 32 x 3 x 8 = {32 * 32 * 3 * 8} bits of pixels")
    usage = {f"ours: gradient-trained codebook, {STEPS} steps": trained}
    tiny = None
    if not QUICK and (TINY_RUN / "autoencoder.pt").is_file():
        from minildm.pipeline import load_autoencoder

        tiny = load_autoencoder(TINY_RUN)
        usage[f"{TINY_RUN.name} run: EMA codebook, k-means init, restarts"] = evaluate(tiny, images)
    figure_usage(usage)
    train_images = shapes.sample_batch(128, np.random.default_rng(7), split="train")[0]
    sweep = codebook_sweep(model, train_images, images)
    print("  K:    " + " ".join(f"{k:>6}" for k in SWEEP) + "  no quantisation")
    print("  PSNR: " + " ".join(f"{sweep[k]['psnr']:6.1f}" for k in SWEEP) + f"  {sweep['continuous']['psnr']:6.1f}")
    figure_codebook_size(sweep, trained, images)
    if tiny is not None:
        figure_tokens(tiny, images[:4], "tokens_tiny_run.png",
                      f"the trained tiny autoencoder ({TINY_RUN}): K = {tiny.cfg.num_codes}, EMA codebook with restarts")


if __name__ == "__main__":
    main()
