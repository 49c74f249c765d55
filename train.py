"""Train minildm:  python train.py

With no arguments: the tiny preset on procedural shapes, first the autoencoder (stage 1), then the prompt
encoder + UNet on its latents (stage 2), into runs/tiny/. Ctrl-C saves and stops; --resume continues.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

STAGES = ("all", "autoencoder", "ldm", "lora", "clip", "ip-adapter")


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
    p.add_argument("--base", default=None, help="(lora, ip-adapter) the trained run to adapt")
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
        if args.stage == "clip":  # the small CLIP: IP-Adapter's image encoder and the CLIP-T/CLIP-I judge
            from minildm.train.clip import train_clip_stage
            train_clip_stage(run_dir, device, steps=args.steps, batch_size=args.batch_size)
        if args.stage == "ip-adapter":  # frozen base run + CLIP (trained first if the run has none)
            from dataclasses import replace

            from minildm.train.ip_adapter import IPAdapterTrainConfig, train_ip_adapter
            cfg = IPAdapterTrainConfig()
            cfg = replace(cfg, steps=args.steps or cfg.steps, batch_size=args.batch_size or cfg.batch_size)
            base = Path(args.base or run_dir)
            run_dir = Path(args.out) if args.out else base  # ip_adapter.pt (and clip.pt) go here
            train_ip_adapter(base, device, out_dir=run_dir, cfg=cfg)
            if run_dir == base:  # sample.py finds ldm.pt, ip_adapter.pt and clip.pt in one run directory
                print(f'try: python sample.py "" --image-prompt IMAGE.png --run {run_dir}')
    except (ValueError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"done in {(time.time() - start) / 60:.1f} min; run directory: {run_dir}")
    if args.stage in ("all", "ldm"):
        print(f'try: python sample.py "a red circle on the left" --run {run_dir}')
    return 0


if __name__ == "__main__":
    sys.exit(main())
