"""Lesson 11: DDIM. A sampler built from your ddim_timesteps and ddim_step: steps versus prompt accuracy,
eta = 0 versus eta = 1, and what taking the previous timestep as t - T // n would do.

    python lessons/11_ddim/lesson.py [--quick]

Figures go to lessons/11_ddim/out/. Your exercises.py functions are used once you have filled them in;
until then the library's versions are.
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
from minildm.data.describe import prompt_accuracy  # noqa: E402
from minildm.diffusion.ddpm import as_eps_fn  # noqa: E402
from minildm.diffusion.guidance import cfg_model_fn  # noqa: E402

STEP_COUNTS = (5, 10, 25, 50)
PROMPTS = [shapes.caption(*combo) for combo in shapes.SEEN[:: 10 if common.QUICK else 3]]  # 8 or 27 prompts
GRID = 6  # prompts shown in the image grids
GUIDANCE = 3.0


@torch.no_grad()
def sample(pipe, fns, prompts: list[str], steps: int, eta: float = 0.0, seed: int = 0, noise_seed: int | None = None,
           buggy_prev: bool = False) -> torch.Tensor:
    """DDIM with your functions -> latents z_0 [n, c, h, w]. z_T comes from `seed` (as in pipeline.generate);
    the per-step noise of eta > 0 from `noise_seed` (default: the same generator, as the library's sampler).
    buggy_prev: land on t - T // steps instead of the next listed timestep (the pitfall)."""
    n, T = len(prompts), pipe.schedule.num_timesteps
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *pipe.latent_shape()), generator=g)  # z_T ~ N(0, I)
    g_noise = g if noise_seed is None else torch.Generator().manual_seed(noise_seed)
    context_c, mask_c = pipe.encode_prompts(prompts)
    context_u, mask_u = pipe.encode_prompts([""])
    eps_fn = as_eps_fn(cfg_model_fn(pipe.unet, context_c, mask_c, context_u, mask_u, GUIDANCE), pipe.schedule,
                       pipe.prediction)
    timesteps, prev_timesteps = fns["ddim_timesteps"](T, steps)
    for t, t_prev in zip(timesteps.tolist(), prev_timesteps.tolist()):
        if buggy_prev:
            t_prev = max(t - T // steps, -1)
        noise = torch.randn(x.shape, generator=g_noise) if eta > 0 and t_prev >= 0 else None
        eps = eps_fn(x, torch.full((n,), t, dtype=torch.long))
        x, _ = fns["ddim_step"](pipe.schedule, x, eps, t, t_prev, eta, noise)
    return x


def sweep(pipe, fns) -> tuple[dict, list[torch.Tensor]]:
    """Prompt accuracy of every (eta, steps): ({eta: [(steps, accuracy, CPU seconds)]}, the first GRID images of
    each). bench/lesson_numbers.py calls this too, so the README's table is what this lesson prints."""
    results, grids = {0.0: [], 1.0: []}, []
    for eta in results:
        for steps in STEP_COUNTS:
            start = time.process_time()
            images = pipe.decode(sample(pipe, fns, PROMPTS, steps, eta))
            seconds = time.process_time() - start
            accuracy = prompt_accuracy(images, PROMPTS)
            results[eta].append((steps, accuracy, seconds))
            grids.append(images[:GRID])
            print(f"  eta {eta:g}, {steps:>2} steps: prompt accuracy {accuracy:.2f} in {seconds:.1f} s CPU")
    return results, grids


def pitfall_accuracy(pipe, fns) -> tuple[float, float, float]:
    """7 steps landing on t - T // n vs on the list: (accuracy wrong, accuracy right, relative latent difference)."""
    right, wrong = sample(pipe, fns, PROMPTS, 7), sample(pipe, fns, PROMPTS, 7, buggy_prev=True)
    return (prompt_accuracy(pipe.decode(wrong), PROMPTS), prompt_accuracy(pipe.decode(right), PROMPTS),
            ((right - wrong).norm() / right.norm()).item())


def plot_accuracy(results: dict, out: Path, label: str) -> None:
    """results: eta -> list of (steps, accuracy, seconds)."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    for eta, rows in results.items():
        steps, acc, sec = zip(*rows)
        ax1.plot(steps, acc, "o-", label=f"eta = {eta:g}")
        ax2.plot(steps, sec, "o-", label=f"eta = {eta:g}")
    ax1.set(xscale="log", xlabel="DDIM steps", ylabel="prompt accuracy", ylim=(-0.02, 1.02),
            title=f"describe() agrees with the prompt ({len(PROMPTS)} prompts, {label})")
    ax2.set(xscale="log", xlabel="DDIM steps", ylabel="CPU seconds", title="sampling cost")
    for ax in (ax1, ax2):
        ax.set_xticks(STEP_COUNTS, [str(s) for s in STEP_COUNTS])
        ax.legend(fontsize=8)
    fig.tight_layout()
    common.save_figure(fig, out / "steps_vs_accuracy.png")


def plot_pitfall(fns, T: int, out: Path) -> None:
    """Left: where each step lands for n = 7, from the list and from t - T // n. Right: over n = 1..200, how
    many steps land off the list, and whether the last one still reaches clean data."""
    n = 7
    timesteps, prev = fns["ddim_timesteps"](T, n)
    buggy = [t - T // n for t in timesteps.tolist()]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    error = [b - a for a, b in zip(prev.tolist(), buggy)]
    ax1.bar(range(1, n + 1), error, color="tab:red")
    for i, (a, b) in enumerate(zip(prev.tolist(), buggy)):
        ax1.annotate(f"{b}\nvs {a}", (i + 1, error[i]), ha="center", va="bottom", fontsize=7)
    ax1.set(xlabel="step k", ylabel="(t - T // n) - listed t_prev", ylim=(0, 1.6),
            title=f"T = {T}, n = {n}: where a step lands, wrong vs listed")
    ns = list(range(1, 201))
    off, not_clean = [], []
    for steps in ns:
        ts, pv = fns["ddim_timesteps"](T, steps)
        wrong = [t - T // steps for t in ts.tolist()]
        off.append(sum(a != b for a, b in zip(pv.tolist(), wrong)) / steps)
        not_clean.append(wrong[-1] != -1)
    ax2.plot(ns, off, lw=1, label="fraction of steps landing off the list")
    ax2.plot([s for s, bad in zip(ns, not_clean) if bad], [0] * sum(not_clean), "|", color="red", ms=8,
             label="last step stops at t = 0, not clean data")
    ax2.set(xlabel="n (DDIM steps)", ylabel="fraction of the n steps", title=f"t - T // n for every n (T = {T})")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    common.save_figure(fig, out / "prev_timestep_pitfall.png")


def main() -> None:
    out, fns = common.start(__file__, "lesson 11: DDIM", trained_model=True)
    pipe = common.trained_pipeline()
    T = pipe.schedule.num_timesteps

    mine = pipe.decode(sample(pipe, fns, PROMPTS[:2], 10))
    library = pipe.generate(PROMPTS[:2], steps=10, guidance_scale=GUIDANCE, eta=0.0, seed=0)
    print(f"  your sampler vs pipeline.generate (10 steps, eta 0): max |difference| {(mine - library).abs().max():.2e}")

    results, grids = sweep(pipe, fns)
    plot_accuracy(results, out, pipe.label)
    common.save_labelled_grid(torch.cat(grids), out / "samples_eta0_top_eta1_bottom.png", GRID, pipe.label,
                              "rows: 5, 10, 25, 50 steps at eta 0, then at eta 1")

    # eta = 0 is a deterministic map z_T -> z_0; eta = 1 draws fresh noise each step
    a, b = (pipe.decode(sample(pipe, fns, PROMPTS[:GRID], 25, eta=0.0, noise_seed=s)) for s in (1, 2))
    c, d = (pipe.decode(sample(pipe, fns, PROMPTS[:GRID], 25, eta=1.0, noise_seed=s)) for s in (1, 2))
    print(f"  same z_T, two noise seeds: eta 0 max |difference| {(a - b).abs().max():.2e}, "
          f"eta 1 max |difference| {(c - d).abs().max():.2f}")
    common.save_labelled_grid(torch.cat([a, b, c, d]), out / "eta0_vs_eta1_same_start.png", GRID, pipe.label,
                              "same z_T: eta 0 twice, eta 1 twice")

    plot_pitfall(fns, T, out)
    wrong, right, relative = pitfall_accuracy(pipe, fns)
    print(f"  7 steps with t - T // n: prompt accuracy {wrong:.2f} vs {right:.2f} from the list; latents differ by "
          f"{relative:.1%} (relative norm)")
    print(f"figures in {out}: steps_vs_accuracy.png samples_eta0_top_eta1_bottom.png eta0_vs_eta1_same_start.png "
          "prev_timestep_pitfall.png")


if __name__ == "__main__":
    main()
