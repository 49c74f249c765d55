"""Lesson 08: train a small pixel-space DDPM on 16x16 shapes with Algorithm 1, then look inside it: the loss
by timestep, its x_0 predictions across t, and samples from the ancestral sampler.

    python lessons/08_ddpm_training/lesson.py [--quick]

Figures go to lessons/08_ddpm_training/out/. Your exercises.py functions are used once you have filled
them in; until then the library's versions are.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from lessons import common  # noqa: E402
from minildm.data import shapes  # noqa: E402
from minildm.diffusion.ddpm import diffusion_loss  # noqa: E402
from minildm.diffusion.schedule import NoiseSchedule  # noqa: E402
from minildm.modules.unet import UNet, UNetConfig  # noqa: E402
from minildm.viz import plot_curves, save_grid  # noqa: E402

SIZE = 16  # pixels: small enough to train on a CPU in a minute or two
STEPS = 20 if common.QUICK else 400  # training steps
BATCH = 32
SAMPLES = 2 if common.QUICK else 8  # images drawn with T ancestral steps
# Quick mode (CI) runs a 200-step DDPM: betas 5x larger, so abar_t over t / T is about the DDPM curve, 5x faster.
T = 200 if common.QUICK else 1000
BUCKETS = 10  # timestep buckets of width T / BUCKETS for the loss-by-t figure
SHOW_T = tuple(t * T // 1000 for t in (0, 50, 100, 200, 400, 600, 800, 999))

# A plain (unconditional) noise model: the same UNet class as the LDM, without attention; the context it
# expects is a dummy zero token (lesson 09 adds the prompt through cross-attention).
UNET = UNetConfig(in_channels=3, out_channels=3, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                  attention_levels=(), mid_attention=False, context_dim=8, norm_groups=8)


def eps_model(unet: UNet):
    """eps_theta(x_t, t): the UNet with its (unused) dummy context."""
    return lambda x_t, t: unet(x_t, t, torch.zeros(x_t.shape[0], 1, UNET.context_dim))


@torch.no_grad()
def loss_by_bucket(unet: UNet, schedule: NoiseSchedule, x0: torch.Tensor, seed: int) -> torch.Tensor:
    """Mean eps-MSE of x0 [N, ...] for t spread over each of BUCKETS equal timestep ranges -> [BUCKETS]."""
    g = torch.Generator().manual_seed(seed)
    width = schedule.num_timesteps // BUCKETS
    losses = []
    for b in range(BUCKETS):
        t = torch.randint(b * width, (b + 1) * width, (x0.shape[0],), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        losses.append(diffusion_loss(eps_model(unet), schedule, x0, t=t, eps=eps).item())
    return torch.tensor(losses)


def plot_buckets(before: torch.Tensor, after: torch.Tensor, width: int, out: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.6))
    centers = [(b + 0.5) * width for b in range(BUCKETS)]
    ax.plot(centers, before, "o--", label="untrained (predicts eps = 0)")
    ax.plot(centers, after, "o-", label=f"after {STEPS} steps")
    ax.set(xlabel="t", ylabel="|| eps - eps_theta ||^2 (mean)", yscale="log",
           title="Loss by timestep bucket")
    ax.legend(fontsize=8)
    fig.tight_layout()
    common.save_figure(fig, out / "loss_by_timestep.png")


def main() -> None:
    out, fns = common.start(__file__, "lesson 08: training a DDPM (Algorithm 1)")

    schedule = NoiseSchedule(T, "linear", beta_start=1e-4 * 1000 / T, beta_end=0.02 * 1000 / T)  # DDPM at T = 1000
    data, _ = shapes.sample_batch(2048, torch.Generator().manual_seed(0), split="all", size=SIZE)
    held, _ = shapes.sample_batch(32 if common.QUICK else 256, torch.Generator().manual_seed(1), split="all", size=SIZE)
    unet = UNet(UNET)
    before = loss_by_bucket(unet, schedule, held, seed=2)

    opt = torch.optim.AdamW(unet.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(3)
    history, start = [], time.process_time()
    for step in range(STEPS):
        x0 = data[torch.randint(len(data), (BATCH,), generator=g)]
        loss = fns["ddpm_loss"](eps_model(unet), schedule, x0, g)  # your Algorithm 1
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append((step + 1, loss.item()))
    print(f"  trained {STEPS} steps of batch {BATCH} in {time.process_time() - start:.0f} s CPU; "
          f"loss {history[0][1]:.3f} -> {sum(v for _, v in history[-20:]) / len(history[-20:]):.3f} (mean of last 20)")
    plot_curves({"eps MSE": history}, out / "training_loss.png", title="DDPM training loss (your ddpm_loss)")

    unet.eval()
    after = loss_by_bucket(unet, schedule, held, seed=2)
    plot_buckets(before, after, schedule.num_timesteps // BUCKETS, out)
    print("  loss by timestep bucket: " + " ".join(f"{v:.3f}" for v in after.tolist()))

    # x_0 predictions across t: the same image and noise, more and more noised
    t = torch.tensor(SHOW_T)
    x0 = held[:1].expand(len(SHOW_T), -1, -1, -1)
    eps = torch.randn(x0.shape[1:], generator=g).expand_as(x0)
    x_t = schedule.q_sample(x0, t, eps)
    with torch.no_grad():
        eps_hat = eps_model(unet)(x_t, t)
    rows = {"x_t": x_t, "eps_theta": eps_hat.clamp(-2, 2) / 2,
            "x0 predicted\n(your predict_x0)": fns["predict_x0"](schedule, x_t, t, eps_hat).clamp(-1, 1),
            "x0 with the\ntrue eps": fns["predict_x0"](schedule, x_t, t, eps)}
    rows = {label: (images + 1) / 2 for label, images in rows.items()}  # [-1, 1] -> [0, 1]
    common.save_rows_over_t(rows, SHOW_T, out / "x0_predictions.png")

    # ancestral sampling with your p_sample_step: x_T ~ N(0, I), then T steps down to x_0
    start = time.process_time()
    x = torch.randn(SAMPLES, 3, SIZE, SIZE, generator=g)
    with torch.no_grad():
        for step in reversed(range(schedule.num_timesteps)):
            t = torch.full((SAMPLES,), step, dtype=torch.long)
            x = fns["p_sample_step"](schedule, x, t, eps_model(unet)(x, t), torch.randn(x.shape, generator=g))
    print(f"  {SAMPLES} samples with {schedule.num_timesteps} ancestral steps in {time.process_time() - start:.0f} s CPU")
    save_grid(torch.cat([(x.clamp(-1, 1) + 1) / 2, (held[:SAMPLES] + 1) / 2]), out / "samples.png", nrow=SAMPLES,
              upscale=4)
    print(f"figures in {out}: training_loss.png loss_by_timestep.png x0_predictions.png samples.png")


if __name__ == "__main__":
    main()
