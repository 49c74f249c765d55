"""Diagnostics of a trained run: four checks that each return numbers and write one figure.

    python -m minildm.diagnostics --run runs/tiny        figures in runs/tiny/diagnostics/, numbers printed

It reads the last saved checkpoint (EMA weights), so it also works while `python train.py` is still running
(ldm.pt is saved every `save_every` steps): run it in a second terminal to look inside a training run.

- `latent_stats`: the latents the diffusion model sees, z * scale_factor, should have std ~ 1 (LDM's scale
  factor 1 / std(z)); a std far from 1 means the noise schedule hits the signal at the wrong strength.
- `loss_by_timestep`: the eps-MSE of Algorithm 1 per bucket of t, with the prompt and with the empty
  prompt. The training curve (ldm_loss.png) averages over t and hides where the model is weak.
- `x0_predictions`: Property 3, x0_hat = (x_t - sqrt(1 - abar_t) eps_theta) / sqrt(abar_t), decoded along t:
  what the model believes the clean image is, from little noise to almost pure noise.
- `guidance_sweep`: the same prompts and seed at several classifier-free guidance scales s, with the
  prompt accuracy of each row.
The lesson lessons/16_beyond/README.md says what each number should look like.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from einops import rearrange  # noqa: E402

from minildm.checkpoint import CheckpointError  # noqa: E402
from minildm.data import shapes  # noqa: E402
from minildm.data.describe import prompt_accuracy  # noqa: E402
from minildm.diffusion.ddpm import as_eps_fn, diffusion_loss  # noqa: E402
from minildm.pipeline import LatentDiffusion  # noqa: E402
from minildm.progress import step_rng  # noqa: E402
from minildm.viz import make_grid  # noqa: E402

SWEEP_PROMPTS = ("a red circle on the left", "a blue square on the right", "a green triangle on the top",
                 "a yellow circle on the bottom", "a purple square in the center", "a cyan triangle on the left",
                 "a red triangle on the right", "a blue circle in the center")
SWEEP_SCALES = (0.0, 1.0, 2.0, 3.0, 5.0, 8.0)
X0_TIMESTEPS = (20, 100, 250, 400, 600, 800, 950)


def fresh_shapes(n: int, split: str = "train", seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """n jittered shapes of a split, from random stream 2 (held back: no training batch): ([n, 3, 32, 32] in [-1, 1], captions)."""
    return shapes.sample_batch(n, step_rng(seed, 0, stream=2), split=split)


def _save(fig, out: str | Path | None) -> None:
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=110)
    plt.close(fig)


@torch.no_grad()
def latent_stats(autoencoder, images: torch.Tensor, out: str | Path | None = None) -> dict:
    """Statistics of the diffusion model's latents z * scale_factor for images [N, 3, H, W] in [-1, 1].

    Returns {"std_z" (unscaled), "scale_factor", "std", "mean" (both of z * scale_factor), "channel_mean",
    "channel_std" (lists, per latent channel)}. LDM rescales with ONE number, so the overall std is ~1 while
    single channels may sit off centre with a smaller spread. The figure: a histogram of z * scale_factor
    against N(0, 1), and each channel's mean +- std.
    """
    device = next(autoencoder.parameters()).device
    z = torch.cat([autoencoder.encode(images[i:i + 256].to(device)).cpu() for i in range(0, len(images), 256)])
    scale = float(autoencoder.scale_factor)
    zs = z * scale  # what the UNet is trained on
    stats = {"std_z": z.std().item(), "scale_factor": scale, "std": zs.std().item(), "mean": zs.mean().item(),
             "channel_mean": rearrange(zs, "b c h w -> c (b h w)").mean(dim=1).tolist(),
             "channel_std": rearrange(zs, "b c h w -> c (b h w)").std(dim=1).tolist()}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2), gridspec_kw={"width_ratios": [2, 1]})
    ax1.hist(zs.flatten().numpy(), bins=80, density=True, alpha=0.7, label="z * scale_factor")
    grid = np.linspace(-4, 4, 200)
    ax1.plot(grid, np.exp(-grid**2 / 2) / np.sqrt(2 * np.pi), "k--", lw=1, label="N(0, 1)")
    ax1.set(xlim=(-5, 5), title=f"latents: std {stats['std']:.3f}, mean {stats['mean']:.3f} (scale {scale:.3f})")
    ax1.legend(fontsize=8)
    channels = range(len(stats["channel_std"]))
    ax2.errorbar(channels, stats["channel_mean"], yerr=stats["channel_std"], fmt="o", capsize=4)
    ax2.axhline(0.0, color="k", ls="--", lw=1)
    ax2.set(xlabel="latent channel", xticks=list(channels), title="mean +- std per channel")
    fig.tight_layout()
    _save(fig, out)
    return stats


@torch.no_grad()
def loss_by_timestep(pipe: LatentDiffusion, images: torch.Tensor, captions: list[str], buckets: int = 10,
                     seed: int = 0, out: str | Path | None = None) -> dict:
    """The diffusion loss per bucket of t, with the prompts and with the empty prompt.

    images [N, 3, H, W] in [-1, 1] with their N captions; the whole set is noised once per bucket with t drawn
    uniformly inside the bucket (T / buckets timesteps wide) and the same eps for both prompts (a paired
    comparison). Returns {"edges": [buckets + 1] bucket bounds, "cond": [buckets] mean loss with the prompt,
    "uncond": [buckets] with the empty prompt ""}; the loss is Algorithm 1's ||target - output||^2 / dim.
    """
    T = pipe.schedule.num_timesteps
    edges = np.linspace(0, T, buckets + 1).round().astype(int)
    z0 = torch.cat([pipe.autoencoder.encode(images[i:i + 256].to(pipe.device)) for i in range(0, len(images), 256)])
    z0 = z0 * pipe.autoencoder.scale_factor  # z_0 = scale_factor * E(x), as in training
    context_c, mask_c = pipe.encode_prompts(list(captions))
    context_u, mask_u = pipe.encode_prompts([""] * len(captions))
    generator = torch.Generator().manual_seed(seed)
    cond, uncond = [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        t = torch.randint(int(lo), int(hi), (len(z0),), generator=generator).to(pipe.device)  # t ~ U{lo..hi-1}
        eps = torch.randn(z0.shape, generator=generator).to(pipe.device)
        for context, mask, losses in ((context_c, mask_c, cond), (context_u, mask_u, uncond)):
            def model_fn(x_t, t_, context=context, mask=mask):
                return pipe.unet(x_t, t_, context, mask)
            losses.append(diffusion_loss(model_fn, pipe.schedule, z0, pipe.prediction, t=t, eps=eps).item())
    result = {"edges": edges.tolist(), "cond": cond, "uncond": uncond}
    centres = (edges[:-1] + edges[1:]) / 2
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(centres, cond, "o-", label="with the prompt")
    ax.plot(centres, uncond, "s--", label='empty prompt ""')
    ax.set(xlabel="t (bucket centre)", ylabel=f"{pipe.prediction} MSE", yscale="log",
           title="diffusion loss by timestep bucket")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, out)
    return result


@torch.no_grad()
def x0_predictions(pipe: LatentDiffusion, images: torch.Tensor, captions: list[str],
                   timesteps=X0_TIMESTEPS, seed: int = 0, out: str | Path | None = None) -> dict:
    """The model's guess of the clean image from x_t, for a few real images [K, 3, H, W] in [-1, 1] and their captions.

    For each t: x_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps, eps_theta from the conditional UNet (s = 1),
    x0_hat = (x_t - sqrt(1 - abar_t) eps_theta) / sqrt(abar_t). Returns {"t": [...], "mse": [...] mean
    ||x0_hat - z_0||^2 / dim per t (latent space), "eps_mse": [...] mean ||eps_theta - eps||^2 / dim,
    "accuracy": [...] fraction of decoded x0_hat that `describe` reads as their caption}.
    Since x0_hat - z_0 = -sqrt((1 - abar_t) / abar_t) (eps_theta - eps), mse = (1 - abar_t) / abar_t * eps_mse:
    at large t a small eps error becomes a large x0 error (1 / abar_t ~ 10^4 near t = T, linear schedule). The figure: per image a row of decode(x_t) over a row of
    decode(x0_hat), the real image on the left.
    """
    z0 = pipe.autoencoder.encode(images.to(pipe.device)) * pipe.autoencoder.scale_factor
    context, mask = pipe.encode_prompts(list(captions))
    eps_fn = as_eps_fn(lambda x_t, t: pipe.unet(x_t, t, context, mask), pipe.schedule, pipe.prediction)
    generator = torch.Generator().manual_seed(seed)
    eps = torch.randn(z0.shape, generator=generator).to(pipe.device)  # the same noise at every t
    noisy, guesses, mse, eps_mse, accuracy = [], [], [], [], []
    for t_int in timesteps:
        t = torch.full((len(z0),), int(t_int), dtype=torch.long, device=pipe.device)
        x_t = pipe.schedule.q_sample(z0, t, eps)  # Property 1
        eps_hat = eps_fn(x_t, t)
        x0_hat = pipe.schedule.predict_x0(x_t, t, eps_hat)  # Property 3
        mse.append((x0_hat - z0).pow(2).mean().item())
        eps_mse.append((eps_hat - eps).pow(2).mean().item())
        decoded = pipe.decode(x0_hat).cpu()  # [K, 3, H, W] in [0, 1]
        accuracy.append(prompt_accuracy(decoded, list(captions)))
        noisy.append(pipe.decode(x_t).cpu())
        guesses.append(decoded)
    real = ((images.cpu() + 1) / 2).clamp(0, 1)
    rows = []
    for k in range(len(images)):
        blank = torch.ones_like(real[k])
        rows += [real[k]] + [x[k] for x in noisy] + [blank] + [g[k] for g in guesses]
    grid = make_grid(torch.stack(rows), nrow=len(timesteps) + 1, upscale=2)
    fig, ax = plt.subplots(figsize=(1.2 * (len(timesteps) + 1), 1.35 * 2 * len(images) + 0.6))
    ax.imshow(grid)
    ax.set_xticks([(i + 0.5) * grid.shape[1] / (len(timesteps) + 1) for i in range(len(timesteps) + 1)],
                  ["real"] + [f"t={t}" for t in timesteps], fontsize=8)
    ax.set_yticks([])
    ax.set_title("rows: decode(x_t), then decode(x0_hat) (Property 3)", fontsize=9)
    fig.tight_layout()
    _save(fig, out)
    return {"t": [int(t) for t in timesteps], "mse": mse, "eps_mse": eps_mse, "accuracy": accuracy}


@torch.no_grad()
def guidance_sweep(pipe: LatentDiffusion, prompts=SWEEP_PROMPTS, scales=SWEEP_SCALES, steps: int = 25,
                   seed: int = 0, out: str | Path | None = None) -> dict:
    """Sample the same prompts with the same seed at each CFG scale s of eps_u + s (eps_c - eps_u).

    Returns {"scales": [...], "accuracy": [...] prompt accuracy (all three attributes) of each row,
    "saturation": [...] mean of the brightest channel over the 5% brightest pixels per image (over-guided
    images burn out towards 1)}. The figure: one row per scale, one column per prompt.
    """
    rows, accuracy, saturation = [], [], []
    for s in scales:
        images = pipe.generate(list(prompts), steps=steps, guidance_scale=float(s), seed=seed).cpu()  # [P, 3, H, W]
        rows.append(images)
        accuracy.append(prompt_accuracy(images, list(prompts)))
        brightest = rearrange(images.amax(dim=1), "n h w -> n (h w)")
        saturation.append(brightest.topk(max(1, brightest.shape[1] // 20), dim=1).values.mean().item())
    grid = make_grid(torch.cat(rows), nrow=len(prompts), upscale=2)
    fig, ax = plt.subplots(figsize=(1.2 * len(prompts), 1.25 * len(scales) + 0.8))
    ax.imshow(grid)
    ax.set_yticks([(i + 0.5) * grid.shape[0] / len(scales) for i in range(len(scales))],
                  [f"s={s:g}  acc {a:.2f}" for s, a in zip(scales, accuracy)], fontsize=8)
    ax.set_xticks([(i + 0.5) * grid.shape[1] / len(prompts) for i in range(len(prompts))],
                  [p.removeprefix("a ") for p in prompts], rotation=35, ha="right", fontsize=7)
    ax.set_title(f"classifier-free guidance sweep (DDIM {steps} steps, seed {seed})", fontsize=9)
    fig.tight_layout()
    _save(fig, out)
    return {"scales": [float(s) for s in scales], "accuracy": accuracy, "saturation": saturation}


def run_all(pipe: LatentDiffusion, out_dir: str | Path, n: int = 256, seed: int = 0) -> dict:
    """All four diagnostics on fresh shapes; figures in out_dir; returns {name: numbers}."""
    out_dir = Path(out_dir)
    images, captions = fresh_shapes(n, "train", seed)
    return {
        "latent_stats": latent_stats(pipe.autoencoder, images, out_dir / "latent_stats.png"),
        "loss_by_timestep": loss_by_timestep(pipe, images, captions, seed=seed, out=out_dir / "loss_by_timestep.png"),
        "x0_predictions": x0_predictions(pipe, images[:3], captions[:3], seed=seed, out=out_dir / "x0_predictions.png"),
        "guidance_sweep": guidance_sweep(pipe, seed=seed, out=out_dir / "guidance_sweep.png"),
    }


def format_diagnostics(results: dict) -> str:
    """The numbers of `run_all` as short text lines."""
    ls, lt, x0, gs = (results[k] for k in ("latent_stats", "loss_by_timestep", "x0_predictions", "guidance_sweep"))
    lines = [f"latent_stats: std(z * scale) = {ls['std']:.3f} (mean {ls['mean']:.3f}; unscaled std {ls['std_z']:.3f}, "
             f"scale factor {ls['scale_factor']:.3f});\n  per channel mean +- std     " + "  ".join(
                 f"{m:+.2f} +- {s:.2f}" for m, s in zip(ls["channel_mean"], ls["channel_std"])),
             "loss_by_timestep: t bucket     " + "  ".join(f"{lo:>4}-{hi - 1:<4}" for lo, hi in zip(lt["edges"][:-1], lt["edges"][1:])),
             "  with the prompt            " + "  ".join(f"{v:9.4f}" for v in lt["cond"]),
             '  empty prompt ""            ' + "  ".join(f"{v:9.4f}" for v in lt["uncond"]),
             "x0_predictions: t            " + "  ".join(f"{t:6d}" for t in x0["t"]),
             "  eps MSE                    " + "  ".join(f"{v:6.3f}" for v in x0["eps_mse"]),
             "  latent MSE of x0_hat       " + "  ".join(f"{v:6.3g}" for v in x0["mse"]),
             "  decoded x0_hat right       " + "  ".join(f"{v:6.2f}" for v in x0["accuracy"]),
             "guidance_sweep: s            " + "  ".join(f"{s:6g}" for s in gs["scales"]),
             "  prompt accuracy            " + "  ".join(f"{v:6.2f}" for v in gs["accuracy"]),
             "  saturation (top 5% pixels) " + "  ".join(f"{v:6.2f}" for v in gs["saturation"])]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Diagnostics of a trained run: latent std, loss by timestep, x0 "
                                            "predictions, guidance sweep (numbers + figures).")
    p.add_argument("--run", default="runs/tiny")
    p.add_argument("--out", default=None, help="folder for the figures (default: RUN/diagnostics)")
    p.add_argument("--n", type=int, default=256, help="fresh shapes for the latent and loss statistics")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        pipe = LatentDiffusion.load(args.run)
        out = Path(args.out or Path(args.run) / "diagnostics")
        results = run_all(pipe, out, args.n, args.seed)
    except (ValueError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_diagnostics(results))
    print(f"figures: {out}/latent_stats.png, loss_by_timestep.png, x0_predictions.png, guidance_sweep.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
