"""Why diffuse in latent space: time per training step of the same UNet on 32x32x3 pixels vs 8x8x4 latents.

    python bench/latent_vs_pixel.py      # writes bench/results/latent_vs_pixel.md

Both runs use the tiny preset's UNet configuration, batch 64, AdamW, one forward + backward + update,
measured in one process one after the other (median of the timed steps after two warm-up steps).
"""
from __future__ import annotations

import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from minildm.config import tiny
from minildm.diffusion.ddpm import diffusion_loss
from minildm.diffusion.schedule import NoiseSchedule
from minildm.modules.unet import UNet

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from machine import commit, machine  # noqa: E402  (bench/machine.py)


def step_time(channels: int, side: int, batch: int = 64, steps: int = 8) -> tuple[float, int]:
    preset = tiny()
    torch.manual_seed(0)
    unet = UNet(replace(preset.unet, in_channels=channels, out_channels=channels))
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    schedule = NoiseSchedule(1000)
    x0 = torch.randn(batch, channels, side, side)
    context = torch.randn(batch, preset.text.max_len, preset.unet.context_dim)
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        loss = diffusion_loss(lambda x_t, t: unet(x_t, t, context), schedule, x0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times), sum(p.numel() for p in unet.parameters())


def main() -> None:
    pixel, n_params = step_time(3, 32)
    latent, _ = step_time(4, 8)
    table = "\n".join([
        f"`python bench/latent_vs_pixel.py` at commit {commit()}. Training step time, tiny-preset UNet "
        f"({n_params / 1e6:.2f}M parameters), batch 64. Machine: {machine()}.",
        "",
        "| diffusion in | tensor | time per step | relative |",
        "|---|---|---|---|",
        f"| pixels | 3 x 32 x 32 | {pixel * 1000:.0f} ms | {pixel / latent:.1f}x |",
        f"| latents (VQ f = 4) | 4 x 8 x 8 | {latent * 1000:.0f} ms | 1.0x |",
    ])
    out = ROOT / "bench" / "results" / "latent_vs_pixel.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
