"""Lesson 02: a text-conditional GAN on shapes, trained for a few hundred steps with the hinge loss.

    python lessons/02_gans/lesson.py [--quick]

The architecture follows the slide's figure (Reed et al. 2016): a text encoding phi(t) is fed to BOTH the
generator (concatenated with the noise z) and the discriminator (projected, then depth-concatenated with
its 4x4 feature maps). D also sees real images with the wrong caption as "fake" (Reed et al.'s matching-
aware discriminator), so it must check that the image matches the text, not only that it looks real.
A second run hides the text from D to show the classic failure: G then has no reason to obey the prompt.

Writes to lessons/02_gans/out/:
    samples_per_prompt.png    rows = prompts (two held out of training), columns = noise samples z
    training_progress.png     the same prompts and z at a few points during training
    losses.png                L_D, L_G and D's mean scores on real / fake images over training
    blind_discriminator.png   samples when D never sees the text: G ignores the prompt
    failure_modes.png         prompt accuracy (describe) and diversity / coverage of both runs
Uses your hinge_d_loss / hinge_g_loss from exercises.py once they are filled in, the library's until then.
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
from torch.nn.utils.parametrizations import spectral_norm  # noqa: E402

from lessons.common import QUICK, exercise_functions, out_dir, save_figure  # noqa: E402
from minildm.data import shapes  # noqa: E402
from minildm.data.describe import attribute_accuracy, describe, prompt_accuracy  # noqa: E402
from minildm.text.tokenizer import Tokenizer  # noqa: E402
from minildm.viz import make_grid  # noqa: E402

OUT = out_dir(__file__)
SIZE = 16  # 16x16 images: small enough for a GAN to learn on a CPU in a minute; describe() still reads them
Z_DIM, TEXT_DIM, WIDTH = 32, 32, 32
BATCH, LR = 32, 1e-3
STEPS = 80 if QUICK else 1200  # text-conditional run
BLIND_STEPS = 30 if QUICK else 600  # run whose discriminator never sees the text
PROMPTS = [shapes.caption(*c) for c in [("red", "circle", "left"), ("green", "square", "top"), ("blue", "triangle", "center"),
                                        ("yellow", "circle", "bottom"), ("purple", "triangle", "right"), ("cyan", "square", "left"),
                                        shapes.HELD_OUT[0], shapes.HELD_OUT[1]]]  # the last two are never trained on

FNS = exercise_functions(__file__)  # yours once filled in, the library's until then
hinge_d_loss, hinge_g_loss = FNS["hinge_d_loss"], FNS["hinge_g_loss"]
TOKENIZER = Tokenizer.build([shapes.caption(*c) for c in shapes.SEEN], max_len=8)


class TextEmbedding(nn.Module):
    """phi(t): the mean of learned word embeddings over the caption's real tokens.  tokens [B, L] -> [B, TEXT_DIM].

    A bag of words ignores word order, which is enough here (every attribute has its own words); the
    real models use a sentence encoder (Reed et al.: a char-CNN-RNN; LDM: a Transformer, lesson 06)."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(TOKENIZER.vocab_size, TEXT_DIM)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        real = (tokens != 0).float()[..., None]  # [B, L, 1], 1 = real token
        return (self.embedding(tokens) * real).sum(1) / real.sum(1)


class Generator(nn.Module):
    """G(z, phi(t)): [B, Z_DIM] noise + caption tokens -> images [B, 3, 16, 16] in [-1, 1]."""

    def __init__(self):
        super().__init__()
        self.text = TextEmbedding()
        self.fc = nn.Linear(Z_DIM + TEXT_DIM, 2 * WIDTH * 4 * 4)

        def up(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU())

        self.net = nn.Sequential(nn.BatchNorm2d(2 * WIDTH), nn.ReLU(), up(2 * WIDTH, WIDTH), up(WIDTH, WIDTH // 2),
                                 nn.Conv2d(WIDTH // 2, 3, 3, padding=1), nn.Tanh())

    def forward(self, z: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        h = self.fc(torch.cat([z, self.text(tokens)], dim=1))  # [z, phi(t)] -> 4x4 feature maps
        return self.net(h.view(-1, 2 * WIDTH, 4, 4))


class Discriminator(nn.Module):
    """D(x, phi(t)): images [B, 3, 16, 16] + tokens -> scores [B]. With see_text=False, D judges realism only."""

    def __init__(self, see_text: bool = True):
        super().__init__()
        self.see_text = see_text
        self.text = TextEmbedding() if see_text else None
        self.features = nn.Sequential(  # spectral norm keeps D smooth: the usual partner of the hinge loss
            spectral_norm(nn.Conv2d(3, WIDTH, 4, 2, 1)), nn.LeakyReLU(0.2),  # 16 -> 8
            spectral_norm(nn.Conv2d(WIDTH, 2 * WIDTH, 4, 2, 1)), nn.LeakyReLU(0.2))  # 8 -> 4
        joined = 2 * WIDTH + (TEXT_DIM if see_text else 0)
        self.join = nn.Sequential(spectral_norm(nn.Conv2d(joined, 2 * WIDTH, 1)), nn.LeakyReLU(0.2))
        self.score = spectral_norm(nn.Linear(2 * WIDTH * 4 * 4, 1))

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        h = self.features(x)  # [B, 2W, 4, 4]
        if self.see_text:  # depth concatenation: phi(t) copied to every 4x4 position
            t = self.text(tokens)[:, :, None, None].expand(-1, -1, *h.shape[2:])
            h = torch.cat([h, t], dim=1)
        return self.score(self.join(h).flatten(1)).squeeze(1)


@torch.no_grad()
def generate(g: Generator, prompts: list[str], z: torch.Tensor) -> torch.Tensor:
    """len(prompts) == len(z) -> images [N, 3, 16, 16] in [0, 1]."""
    g.eval()
    images = (g(z, TOKENIZER.encode(prompts)) + 1) / 2
    g.train()
    return images.clamp(0, 1)


def train_gan(steps: int, see_text: bool, seed: int = 0) -> tuple:
    """Alternate: a D step with G fixed, then a G step with D fixed. Returns (G, history, snapshots, seconds)."""
    torch.manual_seed(seed)
    g, d = Generator(), Discriminator(see_text)
    opt_g = torch.optim.Adam(g.parameters(), LR, betas=(0.0, 0.9))
    opt_d = torch.optim.Adam(d.parameters(), LR, betas=(0.0, 0.9))
    rng = np.random.default_rng(seed)
    fixed_z = torch.randn(len(PROMPTS), Z_DIM, generator=torch.Generator().manual_seed(1))
    history, snapshots = {"L_D": [], "L_G": [], "D(real)": [], "D(fake)": []}, []
    start = time.perf_counter()
    for step in range(steps):
        x, captions = shapes.sample_batch(BATCH, rng, split="train", size=SIZE)
        tokens = TOKENIZER.encode(captions)
        fake = g(torch.randn(BATCH, Z_DIM), tokens)

        # discriminator step (G fixed: fake is detached)
        logits_real = d(x, tokens)
        logits_fake = d(fake.detach(), tokens)
        if see_text:  # real image + wrong caption must also score as fake
            logits_fake = torch.cat([logits_fake, d(x, tokens.roll(1, dims=0))])
        loss_d = hinge_d_loss(logits_real, logits_fake)
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()

        # generator step (D fixed: only G's optimiser steps)
        loss_g = hinge_g_loss(d(fake, tokens))
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()

        if step % 10 == 0 or step == steps - 1:
            for key, value in (("L_D", loss_d), ("L_G", loss_g), ("D(real)", logits_real.mean()),
                               ("D(fake)", logits_fake[:BATCH].mean())):
                history[key].append((step, value.item()))
        if step + 1 in {steps // 4, steps // 2, steps}:
            snapshots.append((step + 1, generate(g, PROMPTS, fixed_z)))
    return g, history, snapshots, time.perf_counter() - start


def prompt_grid(g: Generator, n_noise: int, path: Path, title: str) -> None:
    z = torch.randn(n_noise, Z_DIM, generator=torch.Generator().manual_seed(2))
    images = torch.cat([generate(g, [p] * n_noise, z) for p in PROMPTS])
    fig, ax = plt.subplots(figsize=(n_noise * 0.75 + 3.2, len(PROMPTS) * 0.75 + 0.6))
    ax.imshow(make_grid(images, nrow=n_noise, upscale=3))
    ax.set_yticks([(i + 0.5) * (SIZE * 3 + 2) for i in range(len(PROMPTS))],
                  [p + ("  (held out)" if i >= 6 else "") for i, p in enumerate(PROMPTS)], fontsize=8)
    ax.set_xticks([])
    ax.set_xlabel(f"{n_noise} noise samples z (same z in every row)")
    ax.set_title(title, fontsize=10)
    save_figure(fig, path)


@torch.no_grad()
def evaluate(g: Generator) -> dict:
    """Prompt accuracy on seen and held-out prompts, coverage of the 90 classes, and what the output depends on."""
    gen = torch.Generator().manual_seed(3)
    seen = [shapes.caption(*c) for c in shapes.SEEN for _ in range(2)]
    held = [shapes.caption(*c) for c in shapes.HELD_OUT for _ in range(4)]
    seen_images = generate(g, seen, torch.randn(len(seen), Z_DIM, generator=gen))
    result = attribute_accuracy(seen_images, seen)
    result["held-out all"] = prompt_accuracy(generate(g, held, torch.randn(len(held), Z_DIM, generator=gen)), held)
    result["coverage"] = len({describe(x) for x in seen_images} - {(None, None, None)}) / len(shapes.ALL_COMBOS)
    # sensitivity: how much the image changes when we change the prompt (same z) vs the noise (same prompt)
    z = torch.randn(8, Z_DIM, generator=gen)
    per_prompt = torch.stack([generate(g, [p] * 8, z) for p in PROMPTS[:6]])  # [P, Z, 3, H, W]
    result["change with prompt"] = per_prompt.std(dim=0).mean().item()
    result["change with z"] = per_prompt.std(dim=1).mean().item()
    return result


def evaluate_real() -> dict:
    """The same measurements on real training images: the diversity a perfect G would have."""
    rng = np.random.default_rng(4)
    seen = [shapes.caption(*c) for c in shapes.SEEN for _ in range(2)]
    images = [shapes.render(*shapes.parse_caption(p), size=SIZE, rng=rng) for p in seen]  # what G was asked for
    result = {"coverage": len({describe(x) for x in images}) / len(shapes.ALL_COMBOS)}
    per_prompt = torch.stack([torch.stack([torch.from_numpy(shapes.render(*shapes.parse_caption(p), size=SIZE, rng=rng))
                                           for _ in range(8)]) for p in PROMPTS[:6]]).float() / 255.0  # [P, 8, H, W, 3]
    result["change with prompt"] = per_prompt.std(dim=0).mean().item()  # across prompts, same draw index
    result["change with z"] = per_prompt.std(dim=1).mean().item()  # across jitter draws of one prompt
    return result


def figure_losses(runs: dict) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
    for name, (_, history, _, _) in runs.items():
        style = "-" if name == "text-conditional" else ":"
        for key, color in (("L_D", "tab:red"), ("L_G", "tab:blue")):
            axes[0].plot(*zip(*history[key]), style, color=color, lw=1, label=f"{key} ({name})")
        for key, color in (("D(real)", "tab:green"), ("D(fake)", "tab:orange")):
            axes[1].plot(*zip(*history[key]), style, color=color, lw=1, label=f"{key} ({name})")
    axes[0].set_title("losses: no curve goes to 0 in a healthy GAN", fontsize=9)
    axes[1].axhline(1, color="gray", lw=0.5), axes[1].axhline(-1, color="gray", lw=0.5)
    axes[1].set_title("mean scores of D; the hinge margins are at +1 and -1", fontsize=9)
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, OUT / "losses.png")


def figure_progress(snapshots: list) -> None:
    fig, axes = plt.subplots(1, len(snapshots), figsize=(3 * len(snapshots), 3.2))
    for ax, (step, images) in zip(np.atleast_1d(axes), snapshots):
        ax.imshow(make_grid(images, nrow=4, upscale=2))
        ax.set_title(f"step {step}", fontsize=9)
        ax.axis("off")
    fig.suptitle("the same 8 prompts and z during training (last two prompts held out)", fontsize=10)
    save_figure(fig, OUT / "training_progress.png")


def figure_failure_modes(results: dict, real: dict) -> None:
    chance = {"color": 1 / 6, "shape": 1 / 3, "position": 1 / 5, "all": 1 / 90, "held-out all": 1 / 90}
    keys = list(chance)
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 3.6), gridspec_kw={"width_ratios": [1.6, 1]})
    width = 0.38
    for i, (name, r) in enumerate(results.items()):
        a.bar(np.arange(len(keys)) + (i - 0.5) * width, [r[k] for k in keys], width, label=name)
    a.scatter(range(len(keys)), [chance[k] for k in keys], marker="_", s=400, color="black", label="chance", zorder=3)
    a.set_xticks(range(len(keys)), keys)
    a.set_ylim(0, 1.05)
    a.set_title("prompt accuracy: does describe(G(z, prompt)) match the prompt?", fontsize=9)
    a.legend(fontsize=8)
    extra = ["coverage", "change with prompt", "change with z"]
    for i, (name, r) in enumerate({**results, "real data": real}.items()):
        b.bar(np.arange(len(extra)) + (i - 1) * 0.27, [r[k] for k in extra], 0.27, label=name, color=f"C{i}")
    b.legend(fontsize=8)
    b.set_xticks(range(len(extra)), ["classes covered\n(fraction of 90)", "pixel std across\nprompts (same z)",
                                     "pixel std across\nz (same prompt)"], fontsize=8)
    b.set_title("mode collapse and ignoring the prompt", fontsize=9)
    fig.tight_layout()
    save_figure(fig, OUT / "failure_modes.png")


def main() -> None:
    print(f"lesson 02 (quick={QUICK})")
    runs = {}
    for name, steps, see_text in (("text-conditional", STEPS, True), ("D blind to text", BLIND_STEPS, False)):
        runs[name] = train_gan(steps, see_text)
        print(f"  trained the {name} GAN for {steps} steps in {runs[name][3]:.0f} s")
    g, _, snapshots, _ = runs["text-conditional"]
    prompt_grid(g, 8, OUT / "samples_per_prompt.png", f"text-conditional GAN after {STEPS} steps (rows: prompts)")
    prompt_grid(runs["D blind to text"][0], 8, OUT / "blind_discriminator.png",
                f"D never sees the text ({BLIND_STEPS} steps): rows should differ, do they?")
    figure_progress(snapshots)
    figure_losses(runs)
    results = {name: evaluate(run[0]) for name, run in runs.items()}
    real = evaluate_real()
    figure_failure_modes(results, real)
    for name, r in {**results, "real data": real}.items():
        print(f"  {name:<17} " + "  ".join(f"{k} {v:.2f}" for k, v in r.items()))


if __name__ == "__main__":
    main()
