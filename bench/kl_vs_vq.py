"""KL- versus VQ-regularised first stage on the shapes, same widths, same steps (lesson 05's last section).

    python bench/kl_vs_vq.py [--steps 600]

Both autoencoders: f = 4, 4 latent channels, widths 16 / 32 / 32, trained with L1 + their regulariser
(VQ: codebook + commitment with the tiny preset's EMA codebook of 256 codes; KL: 1e-6 x KL(q(z|x) || N(0, I)),
LDM's weight), Adam lr 2e-3, batch 32 of fresh shapes, no perceptual or GAN term. Reported on 256 held-back
shapes: PSNR of D(E(x)) (KL: the posterior mean), the std of the latents the diffusion model would see
before scaling, and the parameters. Writes bench/results/kl_vs_vq.md.
"""
from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minildm.autoencoder.kl import AutoencoderKL, KLConfig  # noqa: E402
from minildm.autoencoder.vqvae import VQVAE, VQConfig  # noqa: E402
from minildm.data import shapes  # noqa: E402
from minildm.progress import step_rng  # noqa: E402


def psnr(x, y) -> float:
    return 10 * math.log10(4 / (x.clamp(-1, 1) - y).pow(2).mean().item())  # images in [-1, 1]: peak-to-peak 2


def train(model, loss_fn, steps: int) -> float:
    opt = torch.optim.Adam(model.parameters(), lr=2e-3, betas=(0.5, 0.9))
    start = time.perf_counter()
    for step in range(steps):
        x, _ = shapes.sample_batch(32, step_rng(0, step))
        loss = loss_fn(model, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return time.perf_counter() - start


def vq_loss(model, x):
    x_rec, vq, _ = model(x)
    return (x_rec - x).abs().mean() + vq


def kl_loss(model, x):
    x_rec, kl, _ = model(x)
    return (x_rec - x).abs().mean() + 1e-6 * kl


@torch.no_grad()
def evaluate(model, images, kind: str) -> tuple[float, float]:
    model.eval()
    if kind == "VQ":
        z = model.encode(images)
        rec = model.decode(z)
    else:
        z = model.encode(images).mode()
        rec = model.decode(z)
    return psnr(rec, images), z.std().item()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=600)
    args = p.parse_args()
    torch.manual_seed(0)
    held_out, _ = shapes.sample_batch(256, step_rng(0, 0, stream=2), split="all")
    rows = []
    for kind, model, loss_fn in (("VQ", VQVAE(VQConfig.tiny()), vq_loss),
                                 ("KL", AutoencoderKL(KLConfig(channels=16, channel_mult=(1, 2, 2), num_res_blocks=1,
                                                               norm_groups=8)), kl_loss)):
        model.train()
        seconds = train(model, loss_fn, args.steps)
        quality, std = evaluate(model, held_out, kind)
        params = sum(p.numel() for p in model.parameters())
        rows.append(f"| {kind} | {params / 1e6:.3f}M | {quality:.1f} dB | {std:.2f} | {1 / std:.3f} | {seconds:.0f} s |")
        print(rows[-1])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    text = f"""# KL- vs VQ-regularised autoencoder on the shapes (f = 4, 4 channels)

`python bench/kl_vs_vq.py --steps {args.steps}` (commit {commit}), OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')},
{os.cpu_count()} CPU cores SHARED with other jobs (load average {os.getloadavg()[0]:.1f}): times are pessimistic.
L1 + the regulariser only, {args.steps} steps of batch 32, Adam lr 2e-3; 256 held-back shapes.

| first stage | parameters | PSNR of D(E(x)) | std of z | scale factor 1 / std | training time |
|---|---|---|---|---|---|
{chr(10).join(rows)}

The KL model has the VQ model's widths plus SD's mid-block self-attention, quant_conv and post_quant_conv.

The KL row's loss puts w_kl = 1e-6 on the per-pixel mean of |x - x_rec|; LDM's loss sums |x - x_rec| over the
3HW values of an image, so LDM's KL pressure is 3072 times weaker at 32x32. The autoencoder stage uses LDM's
balance: `python train.py --stage autoencoder --autoencoder kl` trains this KL model through the same loop
as the VQ-VAE (lesson 05, "KL or VQ").
"""
    (ROOT / "bench" / "results" / "kl_vs_vq.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
