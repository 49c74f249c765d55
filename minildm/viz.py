"""Pictures people look at: image grids (PNG) and matplotlib loss curves."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from PIL import Image


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[N, 3, H, W] floats in [0, 1] -> [N, H, W, 3] uint8."""
    images = images.detach().float().clamp(0, 1).cpu()
    return (rearrange(images, "n c h w -> n h w c").numpy() * 255 + 0.5).astype(np.uint8)


def make_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2, upscale: int = 1) -> np.ndarray:
    """Tile [N, 3, H, W] images in [0, 1] into one uint8 picture with `nrow` images per row."""
    n = images.shape[0]
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    if upscale > 1:
        images = torch.nn.functional.interpolate(images.float(), scale_factor=upscale, mode="nearest")
    tiles = to_uint8(images)
    h, w = tiles.shape[1:3]
    grid = np.full((ncol * (h + pad) + pad, nrow * (w + pad) + pad, 3), 255, np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = tile
    return grid


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, upscale: int = 1) -> Path:
    """Save [N, 3, H, W] images in [0, 1] as a PNG grid; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(make_grid(images, nrow=nrow, upscale=upscale)).save(path)
    return path


def plot_curves(curves: dict[str, list[tuple[int, float]]], path: str | Path, title: str = "",
                logy: bool = True, marks: dict[str, int] | None = None) -> Path:
    """Plot named (step, value) series into one PNG; `marks` draws labelled vertical lines (e.g. disc_start)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, points in curves.items():
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, label=name, lw=1)
    for name, step in (marks or {}).items():
        ax.axvline(step, color="gray", ls="--", lw=1)
        ax.text(step, ax.get_ylim()[1], f" {name}", va="top", fontsize=8, color="gray")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
