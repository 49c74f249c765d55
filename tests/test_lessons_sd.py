"""Lesson 17 (Stable Diffusion v1): the grader fails realistic wrong versions of SD's DDIM timesteps and of
image-to-image's start, and accepts right answers written differently. tests/test_lessons_graders.py checks
that the references pass and the stubs fail; .ci/lessons runs lesson.py with --quick.
"""
from __future__ import annotations

import pytest
import torch

from lesson_helpers import assert_two_wrong_versions_each, failed
from minildm.diffusion import ddim

NAME = "17_stable_diffusion"


def _with_last(timesteps, last):
    return timesteps, torch.cat([timesteps[1:], torch.tensor([last])])


def timesteps_trailing(T, n, offset=1):
    """minildm's own models' spacing (lesson 11) instead of SD's leading spacing."""
    return _with_last(ddim.ddim_timesteps(T, n, "trailing"), 0)


def timesteps_no_offset(T, n, offset=1):
    """Forgets steps_offset: 980, 960, ..., 0."""
    return _with_last(ddim.ddim_timesteps(T, n, "leading", offset=0), 0)


def timesteps_last_to_clean(T, n, offset=1):
    """Lesson 11's ending (abar = 1) instead of SD v1's abar_0."""
    return _with_last(ddim.ddim_timesteps(T, n, "leading", offset), -1)


def timesteps_linspace(T, n, offset=1):
    """Evenly spaced from T - 1 down to the offset (the "linspace" spacing)."""
    return _with_last(torch.linspace(T - 1, offset, n).round().long(), 0)


def img2img_first_steps(timesteps, strength):
    """Runs the first int(n * strength) steps: starts from pure noise and stops early."""
    return timesteps[: int(len(timesteps) * strength)]


def img2img_inverted(timesteps, strength):
    """Skips int(n * strength) steps: strength read as "how much of the image to keep"."""
    return timesteps[int(len(timesteps) * strength):] if int(len(timesteps) * strength) < len(timesteps) else timesteps[-1:]


def img2img_rounds(timesteps, strength):
    """round(n * strength) instead of int(): one step too many at 1.5."""
    return timesteps[len(timesteps) - round(len(timesteps) * strength):]


WRONG = [
    (NAME, "sd_timesteps", timesteps_trailing),
    (NAME, "sd_timesteps", timesteps_no_offset),
    (NAME, "sd_timesteps", timesteps_last_to_clean),
    (NAME, "sd_timesteps", timesteps_linspace),
    (NAME, "img2img_timesteps", img2img_first_steps),
    (NAME, "img2img_timesteps", img2img_inverted),
    (NAME, "img2img_timesteps", img2img_rounds),
]


@pytest.mark.parametrize("name, exercise, wrong", WRONG, ids=[w[2].__name__ for w in WRONG])
def test_wrong_version_fails(name, exercise, wrong):
    assert failed(name, only=exercise, **{exercise: wrong}), f"{wrong.__name__} passed every {exercise} check"


def timesteps_by_hand(T, n, offset=1):
    ts = [k * (T // n) + offset for k in reversed(range(n))]
    return torch.tensor(ts), torch.tensor(ts[1:] + [0])


def img2img_by_count(timesteps, strength):
    m = int(len(timesteps) * strength)
    return timesteps[len(timesteps) - m:].clone()


RIGHT = [(NAME, "sd_timesteps", timesteps_by_hand), (NAME, "img2img_timesteps", img2img_by_count)]


@pytest.mark.parametrize("name, exercise, right", RIGHT, ids=[r[2].__name__ for r in RIGHT])
def test_right_answer_written_differently_passes(name, exercise, right):
    assert not failed(name, only=exercise, **{exercise: right})


def test_every_exercise_has_two_wrong_versions():
    assert_two_wrong_versions_each(WRONG, [NAME])
