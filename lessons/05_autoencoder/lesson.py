"""Lesson 05: LDM's autoencoder. How much to compress (f), how to add the GAN loss (lambda), how to scale z.

    python lessons/05_autoencoder/lesson.py [--quick]

We train three small VQ-VAEs on 32x32 shapes with downsampling factors f = 2, 4, 8 (latents 16x16, 8x8, 4x4,
c = 4 channels), each for the same few hundred steps of L1 + VQ loss, and compare them like the slide's
autoencoder zoo. Then the f = 4 model continues with VQGAN's PatchGAN hinge loss, weighted by your
adaptive_weight (VQGAN switches the GAN on only after `disc_start` steps of reconstruction training). Last,
we measure the latent scale factor with your latent_scale and look at what it does to the diffusion
model's forward process.

Writes to lessons/05_autoencoder/out/:
    zoo_table.png        our "autoencoder zoo": f, |Z|, c, latent size, bits, PSNR, time per step, scale factor
    reconstructions.png  held-out shapes and their reconstructions for each f (and f = 4 after the GAN phase)
    adaptive_weight.png  L1 during training, then lambda and the hinge losses once the GAN is switched on
    latent_scale.png     latents before / after scaling, and how fast noise drowns them in q(z_t | z_0)
Uses your adaptive_weight / latent_scale from exercises.py once filled in, the library's until then.
"""
from __future__ import annotations

import copy
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

from lessons.common import QUICK, exercise_functions, out_dir, save_figure  # noqa: E402
from minildm.autoencoder import losses  # noqa: E402
from minildm.autoencoder.vqvae import VQConfig, VQVAE  # noqa: E402
from minildm.data import shapes  # noqa: E402
from minildm.diffusion.schedule import NoiseSchedule  # noqa: E402
from minildm.train.autoencoder import evaluate_autoencoder  # noqa: E402
from minildm.viz import make_grid  # noqa: E402

OUT = out_dir(__file__)
FACTORS = (2, 4, 8)
STEPS = 12 if QUICK else 450  # reconstruction training, per model
GAN_STEPS = 4 if QUICK else 60  # then the f = 4 model goes on with the GAN loss (disc_start = STEPS)
DISC_WARMUP = 4 if QUICK else 40  # discriminator-only steps before the GAN loss reaches the autoencoder
BATCH, LR = 8, 2e-3  # reconstruction phase
GAN_LR, DISC_LR, DISC_WEIGHT = 2e-4, 1e-3, 0.5  # GAN phase (DISC_WEIGHT: VQGANLossConfig's default)


FNS = exercise_functions(__file__)  # yours once filled in, the library's until then
adaptive_weight, latent_scale = FNS["adaptive_weight"], FNS["latent_scale"]


def vq_config(f: int) -> VQConfig:
    """The tiny preset's autoencoder at half width, with one level per factor of 2: f = 2 ** (levels - 1)."""
    levels = {2: (1, 2), 4: (1, 2, 2), 8: (1, 2, 2, 2)}[f]
    return replace(VQConfig.tiny(), channels=16, channel_mult=levels)


def train(f: int, seed: int = 0) -> tuple:
    """L1 + VQ loss for STEPS steps. Returns (model, L1 log, CPU seconds per step)."""
    torch.manual_seed(seed)
    model = VQVAE(vq_config(f))
    opt = torch.optim.Adam(model.parameters(), LR, betas=(0.5, 0.9))
    rng = np.random.default_rng(seed)
    log = []
    start = time.process_time()
    for step in range(STEPS):
        x, _ = shapes.sample_batch(BATCH, rng, split="train")
        x_rec, vq_loss, _ = model(x)
        rec_loss = (x - x_rec).abs().mean()  # L1 (the CPU recipe leaves out the perceptual term)
        opt.zero_grad(set_to_none=True)
        (rec_loss + vq_loss).backward()
        opt.step()
        log.append((step, rec_loss.item()))
    return model.eval(), log, (time.process_time() - start) / STEPS  # CPU seconds per step


def gan_phase(model: VQVAE, seed: int = 1) -> tuple:
    """Continue a trained copy of `model` with L1 + VQ + DISC_WEIGHT * lambda * L_GAN (and train the PatchGAN).

    The discriminator first trains alone for DISC_WARMUP steps on the frozen model's reconstructions (a CPU
    shortcut: an untrained D's gradients are noise, and lambda would scale that noise up to the size of the
    reconstruction gradient). Returns (model, log) with log = {"L1", "lambda", "L_GAN", "L_D"}: lists of
    (step, value), steps counted on from the end of reconstruction training."""
    torch.manual_seed(seed)
    model = copy.deepcopy(model).train()
    disc = losses.PatchDiscriminator(3, channels=16, num_layers=2)
    opt = torch.optim.Adam(model.parameters(), GAN_LR, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(disc.parameters(), DISC_LR, betas=(0.5, 0.9))
    rng = np.random.default_rng(seed)
    log = {"L1": [], "lambda": [], "L_GAN": [], "L_D": []}
    for step in range(STEPS, STEPS + DISC_WARMUP + GAN_STEPS):
        x, _ = shapes.sample_batch(BATCH, rng, split="train")
        if step < STEPS + DISC_WARMUP:  # discriminator warm-up: the autoencoder (codebook included) does not move
            with torch.no_grad():
                x_rec = model.eval()(x)[0]
            model.train()
        else:
            x_rec, vq_loss, _ = model(x)
            rec_loss = (x - x_rec).abs().mean()
            gan_loss = losses.hinge_g_loss(disc(x_rec))  # L_GAN = -E[D(x_rec)]
            lam = adaptive_weight(rec_loss, gan_loss, model.last_layer)  # ||grad rec|| / (||grad gan|| + 1e-4)
            opt.zero_grad(set_to_none=True)
            (rec_loss + vq_loss + DISC_WEIGHT * lam * gan_loss).backward()
            opt.step()
            for key, value in (("L1", rec_loss), ("lambda", lam), ("L_GAN", gan_loss)):
                log[key].append((step, value.item()))
        loss_d = losses.hinge_d_loss(disc(x), disc(x_rec.detach()))  # the discriminator's half of the step
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        log["L_D"].append((step, loss_d.item()))
    return model.eval(), log


def figure_zoo(rows: list) -> None:
    columns = ["f", "|Z|", "c", "latent\nh x w x c", "numbers per\nimage (x: 3072)", "bits per\nimage (h w\nlog2 |Z|)",
               "PSNR (dB) \u2191", "codes\nused", "CPU s\n/ step", "scale factor\n1 / std(z)"]
    fig, ax = plt.subplots(figsize=(13, 0.5 * len(rows) + 1.2))
    ax.axis("off")
    table = ax.table(cellText=rows, colLabels=columns, loc="center", cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    table.scale(1, 2.6)
    ax.set_title(f"our autoencoder zoo: 32x32 shapes, {STEPS} steps of L1 + VQ loss each; compare the slide's Table 8",
                 fontsize=10)
    save_figure(fig, OUT / "zoo_table.png")


def figure_reconstructions(images: torch.Tensor, recs: dict) -> None:
    grid = torch.cat([images] + list(recs.values())).add(1).div(2).clamp(0, 1)
    fig, ax = plt.subplots(figsize=(10, 1.3 * (len(recs) + 1) + 0.4))
    ax.imshow(make_grid(grid, nrow=len(images), upscale=2))
    ax.set_yticks([(i + 0.5) * 66 for i in range(len(recs) + 1)], ["original"] + [f"f = {f}" for f in recs])
    ax.set_xticks([])
    ax.set_title("held-out shapes (all 90 combinations) and their reconstructions", fontsize=10)
    save_figure(fig, OUT / "reconstructions.png")


def figure_adaptive_weight(l1_logs: dict, gan_log: dict) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.2))
    for f, log in l1_logs.items():
        axes[0].plot(*zip(*log), lw=1, label=f"f = {f}")
    axes[0].plot(*zip(*gan_log["L1"]), lw=1, color="black", label="f = 4, GAN on")
    axes[0].axvline(STEPS, color="gray", ls="--", lw=1)
    axes[0].axvline(STEPS + DISC_WARMUP, color="gray", ls=":", lw=1)
    axes[0].set_yscale("log")
    axes[0].set_title("L1 (dashed: D starts training; dotted: GAN loss on)", fontsize=9)
    axes[1].plot(*zip(*gan_log["lambda"]), lw=1, label=f"DISC_WEIGHT = {DISC_WEIGHT} multiplies it")
    axes[1].set_yscale("log")
    axes[1].set_title("lambda = ||grad L_rec|| / (||grad L_GAN|| + 1e-4), f = 4", fontsize=9)
    axes[2].plot(*zip(*gan_log["L_GAN"]), lw=1, label="L_GAN (generator)")
    axes[2].plot(*zip(*gan_log["L_D"]), lw=1, label="L_D (discriminator)")
    axes[2].axvline(STEPS + DISC_WARMUP, color="gray", ls=":", lw=1)
    axes[2].set_title("hinge losses, f = 4 (D alone before the dotted line)", fontsize=9)
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, OUT / "adaptive_weight.png")


def figure_latent_scale(z: torch.Tensor, scale: float, f: int) -> None:
    """Histograms of z and z * scale; the share of x_t's variance that is still signal, with and without scaling."""
    schedule = NoiseSchedule(1000, "linear")
    abar = schedule.alphas_cumprod.numpy()
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 3.6))
    a.hist(z.flatten().numpy(), bins=80, alpha=0.6, density=True, label=f"z  (std {z.std():.3f})")
    a.hist((z * scale).flatten().numpy(), bins=80, alpha=0.6, density=True, label=f"z * scale  (std {(z * scale).std():.3f})")
    a.set_title(f"latents of the f = {f} model on held-out shapes; scale = {scale:.3f}", fontsize=9)
    a.legend(fontsize=8)
    t = np.arange(len(abar))
    for variance, label in ((float(z.var()), f"unscaled z (var {float(z.var()):.3g})"), (1.0, "z * scale (var 1)")):
        signal = abar * variance / (abar * variance + 1 - abar)  # Var(sqrt(abar) z) / Var(z_t)
        half = int(np.argmax(signal < 0.5))
        b.plot(t, signal, label=f"{label}: half noise at t = {half}")
    b.set_xlabel("timestep t (linear schedule, T = 1000)")
    b.set_ylabel("signal share of Var(z_t)")
    b.set_title("q(z_t | z_0) = N(sqrt(abar_t) z_0, (1 - abar_t) I): the noise does not know z's scale", fontsize=9)
    b.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, OUT / "latent_scale.png")


def main() -> None:
    print(f"lesson 05 (quick={QUICK})")
    held_out = shapes.sample_batch(64 if QUICK else 256, np.random.default_rng(123), split="all")[0]
    rows, recs, logs, latents, models = [], {}, {}, {}, {}
    for f in FACTORS:
        model, logs[f], seconds = train(f)
        models[f] = model
        summary = evaluate_autoencoder(model, held_out)
        with torch.no_grad():
            z = model.encode(held_out)  # [N, c, 32/f, 32/f]
            recs[f] = model(held_out[:10])[0]
        scale = float(latent_scale(z))
        latents[f] = (z, scale)
        c, h, w = z.shape[1:]
        rows.append([f, model.cfg.num_codes, c, f"{h} x {w} x {c}", c * h * w, f"{h * w * np.log2(model.cfg.num_codes):.0f}",
                     f"{summary['psnr']:.1f}", f"{summary['codes_used']}", f"{seconds:.2f}", f"{scale:.3f}"])
        print(f"  f = {f}: latents {h}x{w}x{c} | PSNR {summary['psnr']:.1f} dB | {summary['codes_used']} codes used | "
              f"{seconds:.2f} CPU s/step | scale factor {scale:.3f}")
    figure_zoo(rows)
    gan_model, gan_log = gan_phase(models[4])
    with torch.no_grad():
        recs["4 + GAN"] = gan_model(held_out[:10])[0]
    gan_psnr = evaluate_autoencoder(gan_model, held_out)["psnr"]
    print(f"  f = 4 after {GAN_STEPS} more steps with the GAN loss: PSNR {gan_psnr:.1f} dB | "
          f"lambda from {gan_log['lambda'][0][1]:.3g} to {gan_log['lambda'][-1][1]:.3g}")
    figure_reconstructions(held_out[:10], recs)
    figure_adaptive_weight(logs, gan_log)
    figure_latent_scale(*latents[4], 4)


if __name__ == "__main__":
    main()
