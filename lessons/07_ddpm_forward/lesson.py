"""Lesson 07: the forward process. Three noise schedules, x_t along t in pixel and latent space, and why
the noise is scaled by sqrt(1 - abar_t) (the variance stays 1).

    python lessons/07_ddpm_forward/lesson.py [--quick]

Figures go to lessons/07_ddpm_forward/out/. Your exercises.py functions are used once you have filled
them in; until then the library's versions are.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from einops import rearrange  # noqa: E402

from lessons import common  # noqa: E402
from minildm.data import shapes  # noqa: E402

KINDS = ("linear", "scaled_linear", "cosine")
T = 1000
SHOW_T = (0, 50, 100, 200, 300, 500, 700, 999)


def plot_schedules(betas: dict, abar: dict, out: Path) -> None:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for kind in KINDS:
        ax1.plot(betas[kind], label=kind)
        ax2.plot(abar[kind], label=kind)
    ax1.set(yscale="log", xlabel="t", title="beta_t (log scale)")
    ax2.set(xlabel="t", title="abar_t = prod (1 - beta_s): signal variance left")
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    common.save_figure(fig, out / "schedules.png")


def plot_snr(abar: dict, out: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for kind in KINDS:
        log_snr = torch.log10(abar[kind] / (1 - abar[kind]))
        line, = ax.plot(log_snr, label=kind)
        t_half = int((log_snr < 0).float().argmax())  # first t where noise outweighs signal
        ax.plot([t_half], [0], "o", color=line.get_color())
    ax.axhline(0, color="gray", lw=0.8, ls="--")
    ax.set(xlabel="t", ylabel="log10 SNR", title="SNR_t = abar_t / (1 - abar_t); dots: SNR = 1")
    ax.legend(fontsize=8)
    fig.tight_layout()
    common.save_figure(fig, out / "snr.png")


def plot_variance(abar: torch.Tensor, var_mine: torch.Tensor, var_data: float, out: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.6))
    t = torch.arange(T)
    ax.plot(t, var_mine, label="Var[x_t] measured with q_sample")
    ax.plot(t, abar * var_data + (1 - abar), "k--", lw=1, label="sqrt(1 - abar) eps: abar Var[x0] + (1 - abar)")
    ax.plot(t, abar * var_data + (1 - abar) ** 2, "r:", label="slide's (1 - abar) eps: abar Var[x0] + (1 - abar)^2")
    ax.set(xlabel="t", ylabel="variance", ylim=(0, 1.3), title="Latents z_0 (std ~ 1) pushed through q(z_t | z_0), linear")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    common.save_figure(fig, out / "variance.png")


def plot_posterior(betas: torch.Tensor, coef_x0: torch.Tensor, coef_xt: torch.Tensor, variance: torch.Tensor,
                   out: Path) -> None:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax1.plot(coef_x0, label="coefficient of x_0")
    ax1.plot(coef_xt, label="coefficient of x_t")
    ax1.set(xlabel="t", yscale="log", title="posterior mean = a x_0 + b x_t (linear)")
    ax1.legend(fontsize=8)
    t = torch.arange(1, len(betas))
    ax2.plot(t, variance[1:] / betas[1:])
    ax2.set(xlabel="t (log scale)", xscale="log", ylim=(0, 1.05),
            title="sigma_t^2 / beta_t, sigma_t^2 = (1 - abar_{t-1}) beta_t / (1 - abar_t)")
    fig.tight_layout()
    common.save_figure(fig, out / "posterior.png")


def main() -> None:
    out, fns = common.start(__file__, "lesson 07: the forward process", trained_model=True)

    betas = {kind: fns["beta_schedule"](kind, T) for kind in KINDS}
    abar = {kind: fns["alphas_cumprod"](betas[kind]) for kind in KINDS}
    plot_schedules(betas, abar, out)
    plot_snr(abar, out)
    for kind in KINDS:
        print(f"  {kind:<14} abar_T-1 = {abar[kind][-1]:.2e}: signal std left at the end sqrt(abar) = "
              f"{abar[kind][-1].sqrt():.3f}; SNR = 1 at t = {int((abar[kind] < 0.5).float().argmax())}")

    # x_t of one shapes image along t, in pixel space and in the latent space of the trained autoencoder
    pipe = common.trained_pipeline()
    size = pipe.image_size
    image = torch.from_numpy(shapes.render("red", "circle", "left", size=size)).float() / 255
    x0 = rearrange(image, "h w c -> 1 c h w").repeat(len(SHOW_T), 1, 1, 1) * 2 - 1  # [n, 3, H, W] in [-1, 1]
    t = torch.tensor(SHOW_T)
    g = torch.Generator().manual_seed(0)
    eps_pixel = torch.randn(x0.shape, generator=g)[:1].expand_as(x0)  # the same noise at every t
    with torch.no_grad():
        z0 = pipe.autoencoder.encode(x0) * pipe.autoencoder.scale_factor  # scaled latents [n, c, h, w]
        eps_latent = torch.randn(z0.shape, generator=g)[:1].expand_as(z0)
        rows = {}
        for kind in ("linear", "cosine"):
            x_t = fns["q_sample"](abar[kind], x0, t, eps_pixel)
            z_t = fns["q_sample"](abar[kind], z0, t, eps_latent)
            rows[f"pixel x_t\n{kind}"] = (x_t + 1) / 2
            rows[f"latent z_t\n{kind}, decoded"] = pipe.decode(z_t.float())
    common.save_rows_over_t(rows, SHOW_T, out / "forward_pixel_latent.png", f"latents: the autoencoder of {pipe.label}")

    # Property 1 keeps the variance: Var[z_t] = abar Var[z_0] + (1 - abar) = 1 when Var[z_0] = 1
    n = 64 if common.QUICK else 512
    batch, _ = shapes.sample_batch(n, torch.Generator().manual_seed(1), split="all", size=size)
    with torch.no_grad():
        z0 = pipe.autoencoder.encode(batch) * pipe.autoencoder.scale_factor
    var_data = z0.var().item()
    var_mine = torch.zeros(T)
    for t0 in range(0, T, 100):  # 100 timesteps per call: [100 * n, c, h, w]
        ts = torch.arange(t0, t0 + 100).repeat_interleave(n)
        z_t = fns["q_sample"](abar["linear"], z0.repeat(100, 1, 1, 1), ts, torch.randn(100 * n, *z0.shape[1:]))
        var_mine[t0:t0 + 100] = rearrange(z_t, "(k n) c h w -> k (n c h w)", k=100).var(dim=1)
    plot_variance(abar["linear"], var_mine, var_data, out)
    print(f"  Var[z_0] = {var_data:.3f} (the scale factor makes it ~1); measured Var[z_t] ranges "
          f"{var_mine.min():.3f}..{var_mine.max():.3f}")

    # Property 2: read the posterior mean's coefficients off two unit inputs
    lin_betas, lin_abar = betas["linear"], abar["linear"]
    ones, zeros, all_t = torch.ones(T, 1), torch.zeros(T, 1), torch.arange(T)
    coef_x0, variance = fns["q_posterior"](lin_betas, lin_abar, ones, zeros, all_t)
    coef_xt, _ = fns["q_posterior"](lin_betas, lin_abar, zeros, ones, all_t)
    plot_posterior(lin_betas, coef_x0.flatten(), coef_xt.flatten(), variance.flatten(), out)
    ratio = variance.flatten()[1:] / lin_betas[1:]
    print(f"  posterior variance / beta_t: {ratio[0]:.3f} at t = 1, {ratio[-1]:.4f} at t = {T - 1}")
    print(f"figures in {out}: schedules.png snr.png forward_pixel_latent.png variance.png posterior.png")


if __name__ == "__main__":
    main()
