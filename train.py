"""Train minildm:  python train.py

With no arguments: the tiny preset on procedural shapes, first the autoencoder (stage 1), then the prompt
encoder + UNet on its latents (stage 2), into runs/tiny/. Ctrl-C saves and stops; --resume continues.
Own data: --data FOLDER (Flickr8k's captions.txt, or images with .txt captions; docs/own_data.md).
Several GPUs: torchrun --nproc_per_node=N train.py ... (data parallel; --batch-size is per GPU).
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

STAGES = ("all", "autoencoder", "ldm", "lora", "clip", "ip-adapter", "body")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train the minildm latent diffusion model (or one of its stages).")
    p.add_argument("--stage", default="all", help=f"one of {', '.join(STAGES)} (all = autoencoder then ldm)")
    p.add_argument("--preset", default="tiny", help="tiny (32x32 shapes, CPU minutes) or 3090 (256x256 folders)")
    p.add_argument("--data", default="shapes", help="shapes (generated, the default) or a folder of captioned images")
    p.add_argument("--autoencoder", default="vq", choices=("vq", "kl"),
                   help="(autoencoder, all) the first stage to train: vq (the VQ-VAE, default) or kl (LDM / SD's "
                   "KL-regularised autoencoder at the same widths); later stages use whichever the run holds")
    p.add_argument("--steps", type=int, default=None, help="training steps of the stage (default: the preset's)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--out", default=None, help="run directory (default: runs/<preset>)")
    p.add_argument("--resume", action="store_true", help="continue a stopped run from its checkpoints")
    p.add_argument("--dry-run", action="store_true", help="print the models' sizes and exit")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="mixed precision on CUDA (auto: bf16 where supported, else fp16; fp32 on CPU and MPS)")
    p.add_argument("--compile", action="store_true", help="torch.compile the networks (slow start, faster steps)")
    p.add_argument("--grad-checkpoint", action="store_true",
                   help="recompute UNet activations in backward: less memory, about a third more compute")
    # LoRA stage
    p.add_argument("--base", default=None, help="(lora, ip-adapter, body) the trained run to adapt; body: a run "
                   "trained by --stage body (default: train the base model of people first)")
    p.add_argument("--concept", default="corner", help="(lora) the new word to teach: corner, orange or diamond "
                   "(the tiny autoencoder can draw only the first, see lessons/13_lora)")
    p.add_argument("--rank", type=int, default=None, help="(lora) adapter rank (default: the preset's recipe, 8)")
    p.add_argument("--alpha", type=float, default=None, help="(lora) adapter alpha (default: the rank)")
    args = p.parse_args(argv)
    if args.stage not in STAGES:
        p.error(f"unknown stage '{args.stage}': choose one of {', '.join(STAGES)}.")
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps must be a positive number of steps, got {args.steps}.")
    if args.batch_size is not None and args.batch_size < 1:
        p.error(f"--batch-size must be positive, got {args.batch_size}.")
    if args.autoencoder == "kl" and args.dry_run:
        p.error("--dry-run sizes the VQ-VAE stage only: drop --autoencoder kl.")
    if args.autoencoder == "kl" and args.stage not in ("all", "autoencoder"):
        p.error(f"--autoencoder kl picks what the autoencoder stage trains; --stage {args.stage} uses the run's "
                "autoencoder.pt, whichever kind it holds: drop --autoencoder.")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from minildm.checkpoint import CheckpointError
    from minildm.config import get_preset, describe_preset, with_kl_autoencoder
    from minildm.train import distributed
    from minildm.device import pick_device
    from minildm.train.common import resolve_precision

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        preset = get_preset(args.preset)
        device = pick_device(args.device)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.autoencoder == "kl":
        preset = with_kl_autoencoder(preset)
    if args.grad_checkpoint:
        preset.unet = replace(preset.unet, use_checkpoint=True)
    if args.dry_run:
        if args.batch_size and args.stage == "autoencoder":
            preset.vq_train = replace(preset.vq_train, batch_size=args.batch_size)
        if args.batch_size and args.stage == "ldm":
            preset.ldm = replace(preset.ldm, batch_size=args.batch_size)
        # the memory of a step on the GPU: with --precision auto, what an RTX 3090 runs (bf16)
        print(describe_preset(preset, "bf16" if args.precision == "auto" else args.precision))
        return 0
    own_stages = ("all", "autoencoder", "ldm")
    if args.data != "shapes" and args.stage not in own_stages:
        print(f"error: --data {args.data} trains the autoencoder and ldm stages only; the {args.stage} stage "
              "trains on shapes: drop --data.", file=sys.stderr)
        return 2
    if distributed.launched_by_torchrun() and args.stage not in own_stages:
        print(f"error: the {args.stage} stage runs on one process: start it without torchrun.", file=sys.stderr)
        return 2
    if distributed.launched_by_torchrun():
        device = distributed.setup(device)
    main_rank = distributed.is_main()
    precision = resolve_precision(args.precision, device)
    run_dir = Path(args.out or f"runs/{preset.name}")
    start = time.time()
    folder = None
    try:
        if args.data != "shapes":
            from minildm.data.folder import load_folder
            folder = load_folder(args.data, preset.image_size, show_progress=main_rank)
            if main_rank:
                log = folder.write_skipped(run_dir / "skipped_files.txt")
                print(folder.summary() + (f" (listed in {log})" if folder.skipped else ""))
        scene_data = None
        if args.data == "shapes" and preset.name == "scenes":  # two objects per picture (minildm/data/scenes.py)
            from minildm.data import scenes
            scene_data = scenes.training_set(preset.ldm.cache_size, preset.ldm.seed, preset.image_size)
        if args.stage in ("all", "autoencoder"):
            from minildm.train.autoencoder import train_autoencoder
            train_autoencoder(preset, run_dir, device, resume=args.resume, steps=args.steps if args.stage != "all" else None,
                              batch_size=args.batch_size if args.stage != "all" else None,
                              images=folder.images if folder else scene_data[0] if scene_data else None, precision=precision,
                              compile=args.compile)
        if args.stage in ("all", "ldm"):
            from minildm.train.ldm import train_ldm
            train_ldm(preset, run_dir, device, resume=args.resume, steps=args.steps if args.stage != "all" else None,
                      batch_size=args.batch_size if args.stage != "all" else None,
                      data=(folder.images, folder.captions) if folder else scene_data, precision=precision,
                      compile=args.compile)
        if args.stage == "lora":
            from minildm.train.lora import train_lora
            train_lora(preset, Path(args.base or run_dir), device, concept=args.concept, rank=args.rank,
                       alpha=args.alpha, steps=args.steps, out=args.out, resume=args.resume)
        if args.stage == "clip":  # the small CLIP: IP-Adapter's image encoder and the CLIP-T/CLIP-I judge
            from minildm.train.clip import train_clip_stage
            train_clip_stage(run_dir, device, steps=args.steps, batch_size=args.batch_size, resume=args.resume)
        if args.stage == "body":  # base LDM of people, keypoint regressor + body VAE, then the body adapter
            from minildm.train.body import body_stage_config, train_body_stage
            cfg = body_stage_config("micro" if args.preset == "micro" else "body")
            cfg = replace(cfg, adapter_steps=args.steps or cfg.adapter_steps,
                          adapter_batch=args.batch_size or cfg.adapter_batch)
            run_dir = Path(args.out or args.base or "runs/body")
            if not train_body_stage(run_dir, device, cfg, base_dir=args.base, resume=args.resume):
                print("stopped; continue with --resume.")
                return 0
            print(f'try: python sample.py "a person raising the left arm" --run {run_dir} --body-id 3')
        if args.stage == "ip-adapter":  # frozen base run + CLIP (trained first if the run has none)
            from minildm.train.ip_adapter import IPAdapterTrainConfig, train_ip_adapter
            cfg = IPAdapterTrainConfig()
            cfg = replace(cfg, steps=args.steps or cfg.steps, batch_size=args.batch_size or cfg.batch_size)
            base = Path(args.base or run_dir)
            run_dir = Path(args.out) if args.out else base  # ip_adapter.pt (and clip.pt) go here
            train_ip_adapter(base, device, out_dir=run_dir, cfg=cfg, resume=args.resume)
            if run_dir == base:  # sample.py finds ldm.pt, ip_adapter.pt and clip.pt in one run directory
                print(f'try: python sample.py "" --image-prompt IMAGE.png --run {run_dir}')
        distributed.barrier()  # rank 0 may still be plotting: no rank tears the group down under another
    except (ValueError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        distributed.cleanup()
    if not main_rank:
        return 0
    print(f"done in {(time.time() - start) / 60:.1f} min; run directory: {run_dir}")
    if args.stage in ("all", "ldm"):
        prompt = folder.captions[0][0] if folder else "a red circle on the left"
        print(f'try: python sample.py "{prompt}" --run {run_dir}')
    return 0


if __name__ == "__main__":
    sys.exit(main())
