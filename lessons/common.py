"""Small helpers the lesson scripts share: quick mode, your exercise functions or the library's, where and how
figures are saved, and a trained model to look at.

Quick mode (`python lessons/NN_x/lesson.py --quick`, or MINILDM_QUICK=1) shrinks every lesson to seconds;
CI runs all lessons that way. Figures go to lessons/NN_x/out/.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from lessons.grading import ROOT, load_module, mine_or_reference  # noqa: F401  (ROOT also puts the repo on sys.path)

QUICK = os.environ.get("MINILDM_QUICK") == "1" or "--quick" in sys.argv


def out_dir(lesson_file: str) -> Path:
    """lessons/NN_x/out/, created on demand."""
    path = Path(lesson_file).resolve().parent / "out"
    path.mkdir(exist_ok=True)
    return path


def save_figure(fig, path: Path) -> None:
    """Write a matplotlib figure as PNG (cropped to its content) and close it."""
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    print(f"  wrote {path}")


def save_rows_over_t(rows: dict[str, Any], timesteps: tuple[int, ...], path: Path, title: str = "") -> None:
    """A grid figure: one row per label of images [len(timesteps), 3, H, W] in [0, 1], one column per t; `title`
    names what drew it (e.g. the model_label of a trained run)."""
    import matplotlib.pyplot as plt
    from einops import rearrange

    fig, axes = plt.subplots(len(rows), len(timesteps), figsize=(1.3 * len(timesteps), 1.45 * len(rows)), squeeze=False)
    for r, (label, images) in enumerate(rows.items()):
        for c, t in enumerate(timesteps):
            ax = axes[r, c]
            ax.imshow(rearrange(images[c].clamp(0, 1), "c h w -> h w c").numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"t = {t}", fontsize=8)
            if c == 0:
                ax.set_ylabel(label, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def exercises_of(lesson_file: str):
    """The lesson's exercises.py module (your versions of the exercise functions)."""
    return load_module(Path(lesson_file).resolve().parent / "exercises.py")


def exercise_functions(lesson_file: str) -> dict[str, Any]:
    """{exercise name: function} for a lesson.py: your version from exercises.py once its TODO is filled in,
    the library's reference (REFERENCE in the lesson's grade.py) until then. Prints which one runs."""
    reference = load_module(Path(lesson_file).resolve().parent / "grade.py").REFERENCE
    fns = {name: mine_or_reference(exercises_of(lesson_file), name, ref) for name, ref in reference.items()}
    width = max(map(len, fns))
    for name, fn in fns.items():
        print(f"  {name:<{width}}  {'yours' if fn is not reference[name] else 'library (exercise not filled in yet)'}")
    return fns


def start(lesson_file: str, title: str, trained_model: bool = False) -> tuple[Path, dict[str, Any]]:
    """Where a lesson's main() begins: a fixed seed, its title, which trained model it will look at (when it
    needs one: said before anything else runs), then (its out/ folder, its exercise functions)."""
    import torch

    torch.manual_seed(0)
    print(title + (" (quick mode)" if QUICK else ""))
    if trained_model:
        trained_run()
    return out_dir(lesson_file), exercise_functions(lesson_file)


TINY_RUN = ROOT / "runs" / "tiny"  # what `python train.py` makes
MICRO_RUN = ROOT / "lessons" / ".cache" / "micro"  # trained here in seconds when there is no TINY_RUN
_announced = False  # trained_run() says which model once
TRAIN_TIME = "about 10 minutes on 2 free CPU cores, longer on a busy machine"  # the main README's table


def model_label(run: Path) -> str:
    """What drew a figure, for its title: "runs/tiny", "micro model, quick mode" or "micro model, no runs/tiny yet"."""
    if run == TINY_RUN:
        return "runs/tiny"
    return "micro model, quick mode" if QUICK else "micro model, no runs/tiny yet"


def trained_run() -> Path:
    """The run folder of a trained LatentDiffusion to look at: runs/tiny when `python train.py` has made it;
    otherwise (or in quick mode) a micro model trained here in seconds into lessons/.cache/micro (blurry).
    Says in one sentence (once per lesson) which one it is, and what to run when it is the micro model."""
    global _announced
    announce, _announced = not _announced, True
    if not QUICK and (TINY_RUN / "ldm.pt").is_file():
        if announce:
            print(f"  using the trained model in {TINY_RUN.relative_to(ROOT)} (figures say \"runs/tiny\")")
        return TINY_RUN
    if announce and QUICK:
        print("  quick mode: a micro model trained in seconds draws the figures; its samples are blobs that "
              "show none of the effects the README describes (those need runs/tiny, run without --quick)")
    elif announce:
        print(f"  this lesson needs a trained model and there is no {TINY_RUN.relative_to(ROOT)} yet: run "
              f"`python train.py` first ({TRAIN_TIME}), then this lesson again. Until then a micro model "
              "trained in seconds draws the figures: blobs, labelled \"micro model\".")
    if not (MICRO_RUN / "ldm.pt").is_file():
        import torch

        from minildm.config import micro
        from minildm.train.autoencoder import train_autoencoder
        from minildm.train.ldm import train_ldm

        print(f"  training the micro model into {MICRO_RUN.relative_to(ROOT)}")
        preset = micro()
        train_autoencoder(preset, MICRO_RUN, torch.device("cpu"), show_progress=False)
        train_ldm(preset, MICRO_RUN, torch.device("cpu"), show_progress=False)
    return MICRO_RUN


def trained_pipeline():
    """The LatentDiffusion of `trained_run()`, with `.label` (model_label) for the figures' titles."""
    from minildm.pipeline import LatentDiffusion

    run = trained_run()
    pipe = LatentDiffusion.load(run)
    pipe.label = model_label(run)
    return pipe


def save_labelled_grid(images, path: Path, nrow: int, label: str, title: str = "") -> None:
    """A grid of images [N, 3, H, W] in [0, 1] as a PNG whose title names the model that drew it."""
    import matplotlib.pyplot as plt

    from minildm.viz import make_grid

    grid = make_grid(images, nrow=nrow, upscale=2)
    fig, ax = plt.subplots(figsize=(grid.shape[1] / 100, grid.shape[0] / 100 + 0.35))
    ax.imshow(grid, interpolation="nearest")
    ax.axis("off")
    ax.set_title(f"{title} ({label})" if title else label, fontsize=8)
    save_figure(fig, path)
