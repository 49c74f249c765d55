"""Train minildm:  python train.py

With no arguments: the tiny preset on procedural shapes, first the autoencoder (stage 1), then the prompt
encoder + UNet on its latents (stage 2), into runs/tiny/. Ctrl-C saves and stops; --resume continues.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

STAGES = ("all", "autoencoder", "ldm", "lora")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train the minildm latent diffusion model (or one of its stages).")
    p.add_argument("--stage", default="all", help=f"one of {', '.join(STAGES)} (all = autoencoder then ldm)")
    p.add_argument("--preset", default="tiny", help="tiny (32x32 shapes, CPU minutes) or 3090 (256x256 folders)")
    p.add_argument("--data", default="shapes", help="shapes (generated, the default) or a folder of captioned images")
    p.add_argument("--steps", type=int, default=None, help="training steps of the stage (default: the preset's)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--out", default=None, help="run directory (default: runs/<preset>)")
    p.add_argument("--resume", action="store_true", help="continue a stopped run from its checkpoints")
    p.add_argument("--dry-run", action="store_true", help="print the models' sizes and exit")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    # LoRA stage
    p.add_argument("--base", default=None, help="(lora) the trained run to adapt")
    p.add_argument("--concept", default="orange", help="(lora) the new concept to learn")
    p.add_argument("--rank", type=int, default=4, help="(lora) adapter rank")
    p.add_argument("--alpha", type=float, default=None, help="(lora) adapter alpha (default: the rank)")
    args = p.parse_args(argv)
    if args.stage not in STAGES:
        p.error(f"unknown stage '{args.stage}': choose one of {', '.join(STAGES)}.")
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps must be a positive number of steps, got {args.steps}.")
    if args.batch_size is not None and args.batch_size < 1:
        p.error(f"--batch-size must be positive, got {args.batch_size}.")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from minildm.checkpoint import CheckpointError
    from minildm.config import get_preset, describe_preset
    from minildm.train.common import pick_device

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        preset = get_preset(args.preset)
        device = pick_device(args.device)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(describe_preset(preset))
        return 0
    if args.data != "shapes":
        print("error: only --data shapes is available in this version; folders of captioned images come later.",
              file=sys.stderr)
        return 2
    run_dir = Path(args.out or f"runs/{preset.name}")
    start = time.time()
    try:
        if args.stage in ("all", "autoencoder"):
            from minildm.train.autoencoder import train_autoencoder
            train_autoencoder(preset, run_dir, device, resume=args.resume, steps=args.steps if args.stage != "all" else None,
                              batch_size=args.batch_size if args.stage != "all" else None)
        if args.stage in ("all", "ldm"):
            from minildm.train.ldm import train_ldm
            train_ldm(preset, run_dir, device, resume=args.resume, steps=args.steps if args.stage != "all" else None,
                      batch_size=args.batch_size if args.stage != "all" else None)
        if args.stage == "lora":
            from minildm.train.lora import train_lora
            train_lora(preset, Path(args.base or run_dir), device, concept=args.concept, rank=args.rank,
                       alpha=args.alpha, steps=args.steps, out=args.out)
    except (ValueError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"done in {(time.time() - start) / 60:.1f} min; run directory: {run_dir}")
    if args.stage in ("all", "ldm"):
        print(f'try: python sample.py "a red circle on the left" --run {run_dir}')
    return 0


if __name__ == "__main__":
    sys.exit(main())
