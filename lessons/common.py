"""Small helpers the lesson scripts share: quick mode, where figures go, and a trained model to look at.

Quick mode (`python lessons/NN_x/lesson.py --quick`, or MINILDM_QUICK=1) shrinks every lesson to seconds;
CI runs all lessons that way. Figures go to lessons/NN_x/out/.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from lessons.grading import ROOT, load_module  # noqa: F401  (ROOT also puts the repo on sys.path)

QUICK = os.environ.get("MINILDM_QUICK") == "1" or "--quick" in sys.argv


def out_dir(lesson_file: str) -> Path:
    """lessons/NN_x/out/, created on demand."""
    path = Path(lesson_file).resolve().parent / "out"
    path.mkdir(exist_ok=True)
    return path


def exercises_of(lesson_file: str):
    """The lesson's exercises.py module (your versions of the exercise functions)."""
    return load_module(Path(lesson_file).resolve().parent / "exercises.py")


def trained_pipeline(run: str | Path = ROOT / "runs" / "tiny"):
    """A trained LatentDiffusion to look at: `runs/tiny` when `python train.py` has made it; otherwise (or in
    quick mode) a micro model trained here in seconds into lessons/.cache/micro (its samples are blurry)."""
    import torch

    from minildm.config import micro
    from minildm.pipeline import LatentDiffusion
    from minildm.train.autoencoder import train_autoencoder
    from minildm.train.ldm import train_ldm

    run = Path(run)
    if not QUICK and (run / "ldm.pt").is_file():
        return LatentDiffusion.load(run)
    print(f"no trained model in {run} (python train.py makes one): training a micro model for this lesson")
    cache = ROOT / "lessons" / ".cache" / "micro"
    if not (cache / "ldm.pt").is_file():
        preset = micro()
        train_autoencoder(preset, cache, torch.device("cpu"), show_progress=False)
        train_ldm(preset, cache, torch.device("cpu"), show_progress=False)
    return LatentDiffusion.load(cache)
