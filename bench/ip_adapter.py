"""IP-Adapter on a trained base: cost, image-prompt fidelity, image + text, and the paper's CLIP-T / CLIP-I table.

    python bench/lesson_numbers.py lesson14_ip_adapter   # on runs/tiny, everything trained afresh
                                                         # -> bench/results/numbers/lesson14_ip_adapter.md, the
                                                         # tables lesson 14 quotes (tests check they are current)
    python bench/ip_adapter.py --base runs/tiny [--steps 50] [--retrain]     # the same, printed: for experiments

The CLI trains (or reuses) a CLIP and an adapter in bench/out/ip_adapter_<base>/ (the base run is only read; the
adapter is trained again when the base's ldm.pt is newer or the stage's recipe changed, the CLIPs only with
--retrain); bench/lesson_numbers.py trains all three in a temporary directory. Then:
- fidelity: one image prompt per shapes combination (all 90, fresh jitter), empty text, lambda = 1; a sample
  counts when `describe` reads the prompt image's colour and shape back (position reported apart);
- image + text: the text "on the left" with an image of a red square placed elsewhere; a sample counts when it
  is a red square on the left (colour and shape from the image, position from the text), over a lambda sweep;
  then the same conflict for all 6 colours x 3 shapes (placed right, bottom or center) with "on the left" and
  with "on the top";
- CLIP-T (generated image vs the caption of its image prompt) and CLIP-I (generated image vs the image prompt),
  as in the paper's table 1. They are scored by a second CLIP trained with another seed, so the adapter's own
  image encoder does not grade its own input (the paper, likewise, encodes with ViT-H and scores with ViT-L).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: `python bench/x.py` works

from machine import machine, shown  # noqa: E402  (bench/machine.py)
from minildm.adapters.image_prompt import ADAPTER_FILE, CLIP_FILE, load_image_prompter  # noqa: E402
from minildm.adapters.ip_adapter import set_ip_lambda  # noqa: E402
from minildm.checkpoint import load_checkpoint  # noqa: E402
from minildm.clip import clip_i, clip_t, load_clip, save_clip  # noqa: E402
from minildm.data import shapes  # noqa: E402
from minildm.data.describe import describe  # noqa: E402
from minildm.pipeline import LatentDiffusion  # noqa: E402
from minildm.progress import step_rng  # noqa: E402
from minildm.train.clip import CLIP_STEPS, evaluate_clip, train_clip, train_clip_stage  # noqa: E402
from minildm.train.ip_adapter import IPAdapterTrainConfig, parameter_counts, train_ip_adapter  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LAMBDAS = (0.5, 0.75, 1.0, 1.25, 1.5)  # image + text sweep


def renders(combos, seed: int) -> torch.Tensor:
    """One jittered render per combination: [N, 3, H, W] in [-1, 1] (random stream 2: never a training image)."""
    rng = step_rng(seed, 0, stream=2)
    images = np.stack([shapes.render(*combo, rng=rng) for combo in combos])
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def sample(pipe, prompter, prompts, images, scale, steps, seed=0, batch=30) -> torch.Tensor:
    """prompts [N] with image prompts [N, 3, H, W] (None: no image prompt) at lambda = scale -> [N, 3, H, W] in [0, 1].

    lambda = 0 is exactly the base text-to-image model (the adapter's layers still need their image tokens)."""
    set_ip_lambda(pipe.unet, scale)
    out = []
    for i in range(0, len(prompts), batch):
        tokens = prompter.extra_tokens(None if images is None else images[i:i + batch])
        out.append(pipe.generate(prompts[i:i + batch], steps=steps, guidance_scale=3.0, seed=seed + i, extra_tokens=tokens))
    return torch.cat(out)


def measure(base: str | Path, cache: str | Path | None = None, steps: int = 50, train_steps: int | None = None,
            clip_steps: int = CLIP_STEPS, retrain: bool = False) -> str:
    """Train (or reuse, from `cache`) the CLIP, the judge CLIP and the adapter on the run `base` (only read),
    sample, and return the markdown tables. cache None: a temporary directory (everything trained afresh).

    steps: DDIM steps per sample (guidance 3); train_steps: adapter steps (None: the stage's recipe);
    clip_steps: training steps of each CLIP. The tables quoted in lesson 14 use the defaults."""
    if cache is None:
        with tempfile.TemporaryDirectory() as tmp:
            return measure(base, tmp, steps, train_steps, clip_steps, retrain=True)
    base, cache = Path(base), Path(cache)
    cpu = torch.device("cpu")

    # --- training: CLIP, judge CLIP, adapter ------------------------------------------------------------------
    with torch.enable_grad():
        if retrain or not (cache / CLIP_FILE).is_file():
            train_clip_stage(cache, cpu, steps=clip_steps, show_progress=False)
        if retrain or not (cache / "judge_clip.pt").is_file():
            judge, judge_tok, _ = train_clip(steps=clip_steps, seed=1, progress=False)
            save_clip(cache / "judge_clip.pt", judge, judge_tok)
        cfg = IPAdapterTrainConfig()
        if train_steps:
            cfg.steps = train_steps
        cached = cache / ADAPTER_FILE
        stale = (not cached.is_file() or cached.stat().st_mtime < (base / "ldm.pt").stat().st_mtime
                 or load_checkpoint(cached, "ip-adapter")["train_config"] != asdict(cfg))  # another base or recipe
        if retrain or stale:
            train_ip_adapter(base, cpu, out_dir=cache, cfg=cfg, show_progress=False)
    torch.set_grad_enabled(False)
    clip, clip_tok = load_clip(cache / CLIP_FILE)
    clip_acc = evaluate_clip(clip, clip_tok)
    judge, judge_tok = load_clip(cache / "judge_clip.pt")
    state = load_checkpoint(cache / ADAPTER_FILE, "ip-adapter")
    train_cfg, seconds = state["train_config"], state["seconds"]
    pipe = LatentDiffusion.load(base)
    prompter = load_image_prompter(pipe, cache / ADAPTER_FILE)
    trainable, unet_params = parameter_counts(pipe, prompter.projection)
    steps_per_cpu_s = train_cfg["steps"] / seconds["cpu"]

    # --- fidelity: image prompt only ----------------------------------------------------------------------------
    t0 = time.time()
    combos = list(shapes.ALL_COMBOS)
    prompts_img = renders(combos, seed=0)
    ip_only = sample(pipe, prompter, [""] * len(combos), prompts_img, 1.0, steps)
    read = [describe(x) for x in ip_only]
    seen = [c not in shapes.HELD_OUT for c in combos]

    def rate(hits, which=None):
        hits = [h for h, w in zip(hits, which or [True] * len(hits)) if w]
        return sum(hits) / len(hits)

    colour_shape = [r[:2] == c[:2] for r, c in zip(read, combos)]
    position = [r[2] == c[2] for r, c in zip(read, combos)]

    # --- image + text: "on the left" + a red square elsewhere ---------------------------------------------------
    elsewhere = [("red", "square", pos) for pos in ("right", "top", "bottom", "center") for _ in range(4)]
    red_squares = renders(elsewhere, seed=1)
    multimodal = {}
    for scale in LAMBDAS:
        images = sample(pipe, prompter, ["on the left"] * len(elsewhere), red_squares, scale, steps, seed=100)
        looks = [describe(x) for x in images]
        multimodal[scale] = (np.mean([r == ("red", "square", "left") for r in looks]),
                             np.mean([r[:2] == ("red", "square") for r in looks]), np.mean([r[2] == "left" for r in looks]))
    # the same conflict for every colour and shape: a position phrase + an image of the shape elsewhere
    general = {}
    combos_elsewhere = [(c, s, p) for c in shapes.COLORS for s in shapes.SHAPES for p in ("right", "bottom", "center")]
    images_elsewhere = renders(combos_elsewhere, seed=7)
    for target in ("left", "top"):
        phrase = shapes.position_phrase(target)  # "on the left" / "on the top"
        for scale in LAMBDAS:
            looks = [describe(x) for x in sample(pipe, prompter, [phrase] * len(combos_elsewhere),
                                                 images_elsewhere, scale, steps, seed=300)]
            general[phrase, scale] = np.mean([r == (c[0], c[1], target) for r, c in zip(looks, combos_elsewhere)])
    # the text alone (lambda = 0: the base model): where it draws, and the "ghost" colour and shape it draws
    text_only_left = [describe(x) for x in sample(pipe, prompter, ["on the left"] * 16, None, 0.0, steps, seed=100)]
    text_only_left_rate = np.mean([r[2] == "left" for r in text_only_left])
    (ghost_colour, ghost_shape), ghost_count = Counter(r[:2] for r in text_only_left).most_common(1)[0]
    ghost = f"{ghost_colour} {ghost_shape}" if ghost_colour else "no shape"

    # --- CLIP-T / CLIP-I (judge CLIP) ------------------------------------------------------------------------------
    captions = [shapes.caption(*c) for c in combos]
    second_renders = renders(combos, seed=5)  # real images: another jittered render of the same combination
    text_samples = sample(pipe, prompter, captions, None, 0.0, steps)
    uncond_samples = sample(pipe, prompter, [""] * len(combos), None, 0.0, steps)
    both_samples = sample(pipe, prompter, captions, prompts_img, 1.0, steps)

    def scores(images01):
        x = images01 * 2 - 1
        return clip_t(judge, judge_tok, x, captions), clip_i(judge, x, prompts_img)

    sample_seconds = time.time() - t0
    rows_clip = [
        ("real images (another render of the prompt's combination)", "-", scores((second_renders + 1) / 2)),
        ("unconditional samples (empty text, no image)", "-", scores(uncond_samples)),
        ("base model, text prompt = the caption (lambda = 0)", "0 (base)", scores(text_samples)),
        ("IP-Adapter, image prompt only (lambda = 1)", f"{trainable / 1e6:.2f}M", scores(ip_only)),
        ("IP-Adapter, image prompt + caption (lambda = 1)", f"{trainable / 1e6:.2f}M", scores(both_samples)),
    ]

    def sweep_row(label: str, values: list[float]) -> str:
        """One table row over LAMBDAS with the largest value in bold (none when they are all equal)."""
        top = max(values) if max(values) > min(values) else None
        return f"| {label} | " + " | ".join(f"**{v:.3f}**" if v == top else f"{v:.3f}" for v in values) + " |"

    n_seen = sum(seen)
    lines = [
        f"IP-Adapter on `{shown(base)}`. Machine: {machine()}.",
        "",
        f"Training: CLIP zero-shot accuracy {clip_acc:.3f} among all {len(combos)} captions "
        f"(chance {1 / len(combos):.3f}). Adapter: "
        f"{train_cfg['steps']} steps x batch {train_cfg['batch_size']} (lr {train_cfg['lr']}, drop text / image / "
        f"both p = {train_cfg['drop_prob']} each, kept text full / colour+shape / position / empty "
        f"p = {' / '.join(str(p) for p in train_cfg['caption_mix'])}), "
        f"{seconds['wall'] / 60:.1f} min wall, {seconds['cpu'] / 60:.1f} min "
        f"CPU time (all threads) = {steps_per_cpu_s * 60:.0f} steps per CPU-minute; on 2 uncontended cores about "
        f"{seconds['cpu'] / 2 / 60:.1f} min. Trainable {trainable:,} parameters against the frozen UNet's "
        f"{unet_params:,} ({100 * trainable / unet_params:.1f}%; the paper: 22M of ~860M, 2.6%).",
        f"Sampling: DDIM {steps} steps, guidance 3 over (text, image) jointly (unconditional half: empty text "
        f"+ zero image embedding); evaluation took {sample_seconds / 60:.1f} min wall.",
        "",
        "| image prompt only (empty text, lambda = 1), one sample per combination | value |",
        "|---|---|",
        f"| colour and shape kept (all {len(combos)} combinations) | **{rate(colour_shape):.3f}** |",
        f"| ... seen ({n_seen}) / held-out ({len(combos) - n_seen}) combinations | {rate(colour_shape, seen):.3f} / "
        f"{rate(colour_shape, [not s for s in seen]):.3f} |",
        f"| ... position kept too (all three attributes) | {rate(position):.3f} "
        f"({rate([a and b for a, b in zip(colour_shape, position)]):.3f}) |",
        "",
        "A position phrase + an image prompt of a shape placed elsewhere: colour and shape should come from the image, "
        "the position from the text.",
        "",
        "| lambda | " + " | ".join(str(s) for s in LAMBDAS) + " |",
        "|---|" + "---|" * len(LAMBDAS),
        sweep_row(f"\"on the left\" + a red square elsewhere ({len(elsewhere)}): red square on the left",
                  [multimodal[s][0] for s in LAMBDAS]),
        "| ... red square / on the left | " + " | ".join(f"{multimodal[s][1]:.2f} / {multimodal[s][2]:.2f}"
                                                      for s in LAMBDAS) + " |",
        *[sweep_row(f"\"{phrase}\" + any colour and shape elsewhere ({len(combos_elsewhere)}): all three right",
                    [general[phrase, s] for s in LAMBDAS]) for phrase in ("on the left", "on the top")],
        "",
        f"The text \"on the left\" alone (lambda = 0, the base model), {len(text_only_left)} samples: position left "
        f"{text_only_left_rate:.3f}; its most frequent colour and shape: {ghost}, "
        f"{ghost_count} of {len(text_only_left)}.",
        "",
        "CLIP-T: cosine of a sample with the caption of its image prompt; CLIP-I: cosine of a sample with the image "
        f"prompt (the paper's table 1), scored by a judge CLIP trained with another seed; {len(combos)} samples per row.",
        "",
        "| method | trainable parameters | CLIP-T | CLIP-I |",
        "|---|---|---|---|",
        *[f"| {name} | {params} | {t:.3f} | {i:.3f} |" for name, params, (t, i) in rows_clip],
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="runs/tiny", help="the trained base run (only read)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps per sample (guidance 3)")
    p.add_argument("--train-steps", type=int, default=None, help="adapter training steps (default: the stage's)")
    p.add_argument("--clip-steps", type=int, default=CLIP_STEPS, help="training steps of each CLIP")
    p.add_argument("--retrain", action="store_true", help="train CLIP and adapter again even if cached")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    base = Path(args.base)
    if not (base / "ldm.pt").is_file():
        p.error(f"no trained model in {base}: run `python train.py` first.")
    torch.set_num_threads(args.threads)
    cache = ROOT / "bench" / "out" / f"ip_adapter_{base.name}"  # git-ignored
    print(measure(base, cache, args.steps, args.train_steps, args.clip_steps, args.retrain))


if __name__ == "__main__":
    main()
