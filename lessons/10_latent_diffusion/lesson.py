"""Lesson 10: latent diffusion. One training step taken apart, your training_step training a fresh prompt
model + UNet on the frozen autoencoder, the cost of a step in latent versus pixel space, and a sample's
latent trajectory decoded along the way.

    python lessons/10_latent_diffusion/lesson.py [--quick]

Figures go to lessons/10_latent_diffusion/out/. Your exercises.py function is used once you have filled
it in; until then the library's recipe is.
"""
from __future__ import annotations

import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from einops import rearrange  # noqa: E402

from lessons import common  # noqa: E402
from minildm.config import micro  # noqa: E402
from minildm.data import shapes  # noqa: E402
from minildm.diffusion.ddim import ddim_timesteps  # noqa: E402
from minildm.diffusion.ddpm import as_eps_fn, diffusion_loss  # noqa: E402
from minildm.modules.unet import UNet  # noqa: E402
from minildm.pipeline import LatentDiffusion  # noqa: E402
from minildm.text.encoder import PromptEncoder, TextEncoderConfig  # noqa: E402
from minildm.viz import plot_curves  # noqa: E402

TRAIN_STEPS = 15 if common.QUICK else 200
BATCH = 32
TIMING_REPEATS = 1 if common.QUICK else 3
SAMPLE_STEPS = 10 if common.QUICK else 25
SHOW_T = (100, 400, 800)
PROMPTS = ["a red circle on the left", "a blue square on the right", "a green triangle on the top",
           "a purple square in the center"]


def show(ax, image: torch.Tensor, title: str, cmap: str | None = None) -> None:
    """image: [3, H, W] in [0, 1] or [H, W] (shown with cmap)."""
    ax.imshow(rearrange(image, "c h w -> h w c").numpy() if image.ndim == 3 else image.numpy(), cmap=cmap,
              interpolation="nearest")
    ax.set_title(title, fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])


@torch.no_grad()
def explain_step(pipe: LatentDiffusion, out: Path) -> None:
    """x -> z_0 = s E(x) -> z_t (Property 1) -> eps_theta(z_t, t, tau(y)) -> z0_hat (Property 3) -> D(z0_hat)."""
    prompt = PROMPTS[0]
    image = torch.from_numpy(shapes.render(*shapes.parse_caption(prompt), size=pipe.image_size)).float() / 255
    x = rearrange(image, "h w c -> 1 c h w") * 2 - 1
    z0 = pipe.autoencoder.encode(x) * pipe.autoencoder.scale_factor
    context, mask = pipe.encode_prompts([prompt])
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(z0.shape, generator=g)
    print(f"  x {list(x.shape)} ({x.numel()} numbers) -> z_0 {list(z0.shape)} ({z0.numel()} numbers, std "
          f"{z0.std():.2f} after the scale factor {pipe.autoencoder.scale_factor.item():.3f})")

    fig, axes = plt.subplots(len(SHOW_T), 6, figsize=(9, 1.9 * len(SHOW_T) + 0.4))
    for r, t_value in enumerate(SHOW_T):
        t = torch.tensor([t_value])
        z_t = pipe.schedule.q_sample(z0, t, eps)
        # the tiny preset's UNet predicts v (config.tiny); as_eps_fn turns any target into eps_theta
        eps_hat = as_eps_fn(lambda x, t_: pipe.unet(x, t_, context, mask), pipe.schedule, pipe.prediction)(z_t, t)
        z0_hat = pipe.schedule.predict_x0(z_t, t, eps_hat)
        mse = (eps_hat - eps).pow(2).mean().item()
        show(axes[r, 0], (x[0] + 1) / 2, "x (pixels)")
        show(axes[r, 1], z0[0, 0], "z_0 = s E(x), ch 0", "RdBu")
        show(axes[r, 2], z_t[0, 0], f"z_t, t = {t_value}, ch 0", "RdBu")
        show(axes[r, 3], eps[0, 0], "eps, ch 0", "RdBu")
        show(axes[r, 4], eps_hat[0, 0], f"eps_theta, ch 0\nloss {mse:.3f}", "RdBu")
        show(axes[r, 5], pipe.decode(z0_hat)[0], "D(z0_hat / s)")
    fig.suptitle(f"one LDM training step for {prompt!r}: the loss compares eps_theta with eps ({pipe.label})",
                 fontsize=9)
    fig.tight_layout()
    common.save_figure(fig, out / "ldm_training_step.png")


def train_fresh(pipe: LatentDiffusion, training_step, out: Path) -> None:
    """A fresh micro prompt model + UNet trained with your training_step on the pipeline's frozen autoencoder."""
    preset = micro()
    text_cfg = TextEncoderConfig(**{**asdict(preset.text), "vocab_size": pipe.tokenizer.vocab_size,
                                    "max_len": pipe.tokenizer.max_len})
    unet_cfg = replace(preset.unet, in_channels=pipe.latent_shape()[0], out_channels=pipe.latent_shape()[0],
                       context_dim=text_cfg.dim)
    torch.manual_seed(0)
    model = LatentDiffusion(pipe.autoencoder, pipe.tokenizer, PromptEncoder(text_cfg), UNet(unet_cfg), pipe.schedule,
                            pipe.image_size)
    params = list(model.unet.parameters()) + list(model.text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3)
    g = torch.Generator().manual_seed(1)
    history, start = [], time.process_time()
    for step in range(TRAIN_STEPS):
        images, captions = shapes.sample_batch(BATCH, g, split="train", size=pipe.image_size)
        loss = training_step(model, images, captions, 0.1, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append((step + 1, loss.item()))
    tail = history[-10:]
    print(f"  {TRAIN_STEPS} steps of your training_step (batch {BATCH}) in {time.process_time() - start:.0f} s CPU: "
          f"loss {history[0][1]:.3f} -> {sum(v for _, v in tail) / len(tail):.3f} (mean of the last {len(tail)})")
    plot_curves({"eps MSE": history}, out / "your_training_loss.png",
                title="a fresh micro UNet + prompt model trained with your training_step")


def step_time(unet: UNet, shape: tuple, context: torch.Tensor, mask: torch.Tensor, schedule) -> float:
    """CPU seconds of one training step (forward + backward) of `unet` on a batch of `shape`."""
    x0 = torch.randn(shape)
    diffusion_loss(lambda x, t: unet(x, t, context, mask), schedule, x0).backward()  # warm-up
    start = time.process_time()
    for _ in range(TIMING_REPEATS):
        unet.zero_grad(set_to_none=True)
        diffusion_loss(lambda x, t: unet(x, t, context, mask), schedule, x0).backward()
    return (time.process_time() - start) / TIMING_REPEATS


def compare_step_time(pipe: LatentDiffusion, out: Path) -> None:
    """The same UNet architecture on 8 latents [c, H/f, W/f] versus 8 images [3, H, W]."""
    batch, size, (c, h, w) = 8, pipe.image_size, pipe.latent_shape()
    context, mask = pipe.encode_prompts(PROMPTS[:1] * batch)
    torch.manual_seed(0)
    latent_unet = UNet(pipe.unet.cfg)
    pixel_unet = UNet(replace(pipe.unet.cfg, in_channels=3, out_channels=3))
    times = {f"latent\n{batch}x{c}x{h}x{w}": step_time(latent_unet, (batch, c, h, w), context, mask, pipe.schedule),
             f"pixel\n{batch}x3x{size}x{size}": step_time(pixel_unet, (batch, 3, size, size), context, mask, pipe.schedule)}
    (latent_name, latent), (pixel_name, pixel) = times.items()
    print(f"  training step, same UNet: latent {latent:.3f} s, pixel {pixel:.3f} s CPU ({pixel / latent:.1f}x slower)")
    fig, ax = plt.subplots(figsize=(4.5, 3.4))
    ax.bar(list(times), list(times.values()), color=["tab:green", "tab:red"])
    ax.set(ylabel="CPU seconds per training step", title=f"same UNet: pixel is {pixel / latent:.0f}x slower")
    fig.tight_layout()
    common.save_figure(fig, out / "latent_vs_pixel_step_time.png")


def plot_trajectory(pipe: LatentDiffusion, out: Path) -> None:
    """Decode z_t along DDIM sampling: rows = prompts, columns = steps."""
    _, extras = pipe.generate(PROMPTS, steps=SAMPLE_STEPS, guidance_scale=3.0, seed=0, return_trajectory=True)
    trajectory = extras["trajectory"]  # SAMPLE_STEPS + 1 tensors [n, 3, H, W]: D(z_T), ..., D(z_0)
    timesteps = ddim_timesteps(pipe.schedule.num_timesteps, SAMPLE_STEPS, spacing="trailing").tolist() + [-1]
    picks = torch.linspace(0, SAMPLE_STEPS, 7).round().long().tolist()
    fig, axes = plt.subplots(len(PROMPTS), len(picks), figsize=(1.3 * len(picks), 1.4 * len(PROMPTS) + 0.3))
    for r, prompt in enumerate(PROMPTS):
        for c, k in enumerate(picks):
            label = "z_0" if k == SAMPLE_STEPS else f"z_t, t = {timesteps[k]}"  # the noise level it now sits at
            show(axes[r, c], trajectory[k][r], f"after {k} steps\n{label}" if r == 0 else "")
        axes[r, 0].set_ylabel(prompt.replace(" on the", "\non the").replace(" in the", "\nin the"), fontsize=6)
    fig.suptitle(f"D(z_t / s) along {SAMPLE_STEPS} DDIM steps (guidance 3, {pipe.label})", fontsize=9)
    fig.tight_layout()
    common.save_figure(fig, out / "trajectory.png")


def main() -> None:
    out, fns = common.start(__file__, "lesson 10: latent diffusion", trained_model=True)
    training_step = fns["training_step"]
    pipe = common.trained_pipeline()
    explain_step(pipe, out)
    train_fresh(pipe, training_step, out)
    compare_step_time(pipe, out)
    plot_trajectory(pipe, out)
    print(f"figures in {out}: ldm_training_step.png your_training_loss.png latent_vs_pixel_step_time.png trajectory.png")


if __name__ == "__main__":
    main()
