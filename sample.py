"""Sample images from a trained run:  python sample.py "a red circle on the left"

Writes a PNG grid (one row per prompt, --n images each) and prints where it went.
Same --seed, same prompts, same settings -> the same image.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Generate images with a trained minildm run.")
    p.add_argument("prompts", nargs="*", default=["a red circle on the left"],
                   help='one or more prompts; "" is the unconditional prompt')
    p.add_argument("--run", default="runs/tiny", help="run directory written by train.py")
    p.add_argument("--n", type=int, default=4, help="images per prompt")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (DDIM); DDPM always uses all T")
    p.add_argument("--sampler", default="ddim", help="ddim or ddpm")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta: 0 deterministic, 1 DDPM-like")
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale s (1 = off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lora", default=None, help="a LoRA file from train.py --stage lora")
    p.add_argument("--lora-scale", type=float, default=1.0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="output PNG (default: RUN/samples/<prompt>.png)")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error(f"--n must be at least 1, got {args.n}.")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from minildm.checkpoint import CheckpointError
    from minildm.pipeline import LatentDiffusion
    from minildm.train.common import pick_device
    from minildm.viz import save_grid

    try:
        device = pick_device(args.device)
        pipe = LatentDiffusion.load(args.run, device)
        if args.lora:
            from minildm.adapters.lora import load_lora_file, set_lora_scale
            load_lora_file(pipe.unet, args.lora)
            set_lora_scale(pipe.unet, args.lora_scale)
        prompts = [p for p in args.prompts for _ in range(args.n)]
        images = pipe.generate(prompts, steps=args.steps, guidance=args.guidance, sampler=args.sampler,
                               eta=args.eta, seed=args.seed, progress=True)
    except (ValueError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    slug = "_".join(args.prompts)[:60].replace(" ", "-").replace("/", "-") or "unconditional"
    out = Path(args.out) if args.out else Path(args.run) / "samples" / f"{slug}_seed{args.seed}.png"
    save_grid(images, out, nrow=args.n, upscale=4 if images.shape[-1] <= 64 else 1)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
