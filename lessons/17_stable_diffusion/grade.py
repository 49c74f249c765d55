"""Grade lesson 17: python lessons/17_stable_diffusion/grade.py  (add -v to see what differed).

Compared with minildm: sd_timesteps against minildm/diffusion/ddim.py's "leading" list with offset 1 and the
pipeline's final_timestep 0 (SD v1's set_alpha_to_one = False); img2img_timesteps against what
LatentDiffusion.generate(init_images=..., strength=...) runs (diffusers' StableDiffusionImg2ImgPipeline
does the same: tests/test_stable_diffusion.py).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from lessons.grading import Check, main  # noqa: E402
from minildm.diffusion import ddim  # noqa: E402


def reference_sd_timesteps(num_timesteps, steps, offset=1):
    timesteps = ddim.ddim_timesteps(num_timesteps, steps, spacing="leading", offset=offset)
    return timesteps, torch.cat([timesteps[1:], torch.tensor([0])])  # SD v1 lands on abar_0 after the last step


def reference_img2img_timesteps(timesteps, strength):
    steps = len(timesteps)
    return timesteps[steps - int(steps * strength):]  # as generate(): skip_steps = steps - int(steps * strength)


REFERENCE = {"sd_timesteps": reference_sd_timesteps, "img2img_timesteps": reference_img2img_timesteps}


def same(mine, ref, what: str) -> None:
    mine = torch.as_tensor(mine)
    assert mine.dtype == torch.long, f"{what}: return a LongTensor, got {mine.dtype}"
    assert mine.tolist() == ref.tolist(), f"{what}: {mine.tolist()[:8]}..., expected {ref.tolist()[:8]}..."


def compare_timesteps(fn, T, n, offset=1):
    timesteps, prev = fn(T, n, offset)
    ref_t, ref_prev = reference_sd_timesteps(T, n, offset)
    same(timesteps, ref_t, f"T={T}, n={n}, offset={offset}: timesteps")
    same(prev, ref_prev, f"T={T}, n={n}, offset={offset}: prev_timesteps")


def check_sd_50(fn):
    compare_timesteps(fn, 1000, 50)  # 981 ... 1, the list a v1.5 image is drawn with


def check_uneven(fn):
    for n in (3, 7, 30):  # T // n leaves a remainder: leading spacing never reaches T - 1
        compare_timesteps(fn, 1000, n)


def check_offset(fn):
    compare_timesteps(fn, 1000, 10, offset=0)
    compare_timesteps(fn, 20, 4, offset=1)


def compare_img2img(fn, n, strength):
    full = reference_sd_timesteps(1000, n)[0]
    same(fn(full, strength), reference_img2img_timesteps(full, strength), f"n={n}, strength={strength}")


def check_img2img_common(fn):
    compare_img2img(fn, 50, 0.8)
    compare_img2img(fn, 50, 0.3)


def check_img2img_rounding(fn):
    compare_img2img(fn, 3, 0.5)  # int(1.5) = 1 step: the last one
    compare_img2img(fn, 7, 0.75)  # int(5.25) = 5
    compare_img2img(fn, 10, 0.99)


def check_img2img_full(fn):
    compare_img2img(fn, 50, 1.0)  # strength 1: every step, the image is forgotten


CHECKS = [
    Check("sd_timesteps", check_sd_50,
          "leading spacing starts at 0 and steps by T // n, plus the offset, listed from the largest; after the last "
          "step SD v1 lands on abar_0 (t_prev = 0), not on clean data."),
    Check("sd_timesteps", check_uneven,
          "with leading spacing the largest timestep is (n - 1)(T // n) + offset, not T - 1: that is trailing spacing."),
    Check("sd_timesteps", check_offset, "use the given offset (steps_offset), added to every timestep."),
    Check("img2img_timesteps", check_img2img_common,
          "strength is the fraction of steps that RUN: keep the last ones (the low-noise end), skip the first."),
    Check("img2img_timesteps", check_img2img_rounding, "the number of steps run is int(n * strength), rounded down."),
    Check("img2img_timesteps", check_img2img_full, "strength 1 runs the whole list."),
]

if __name__ == "__main__":
    sys.exit(main(CHECKS, __file__))
