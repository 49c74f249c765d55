"""Train minildm:  python train.py

With no arguments: the tiny preset on procedural shapes, first the autoencoder (stage 1), then the prompt
encoder + UNet on its latents (stage 2), into runs/tiny/. Ctrl-C saves and stops the whole command (exit
130); --resume continues. A run directory is checked before step 1 and locked while it trains; a stage whose
checkpoint exists needs --resume (continue) or --overwrite (start over); a training that diverges stops
with one sentence and keeps its last checkpoint (minildm/train/run_dir.py, minildm/train/divergence.py).
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
    p.add_argument("--overwrite", action="store_true", help="start the stage over, replacing its checkpoint in --out")
    p.add_argument("--lr-scale", type=float, default=1.0,
                   help="multiply the stage's learning rates (all but clip; e.g. 0.3 after a divergence; the body "
                        "stage scales its regressor, VAE and adapter, not the base model it trains first)")
    p.add_argument("--dry-run", action="store_true", help="print the models' sizes and exit")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--seed", type=int, default=None,
                   help="(autoencoder, ldm, all) the seed of the weights, batches and noise (default: the preset's, 0)")
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
    if args.resume and args.overwrite:
        p.error("give --resume (continue the run) or --overwrite (start it over), not both.")
    if args.seed is not None and not 0 <= args.seed < 2**32:
        p.error(f"--seed must lie in [0, 2**32 - 1], got {args.seed}.")
    if args.seed is not None and args.stage not in ("all", "autoencoder", "ldm"):
        p.error(f"--seed sets the autoencoder and ldm stages' seed; the {args.stage} stage has its own recipe: drop --seed.")
    if not 0 < args.lr_scale < float("inf"):
        p.error(f"--lr-scale must be a positive number, got {args.lr_scale}.")
    if args.lr_scale != 1 and args.stage == "clip":
        p.error("--lr-scale does not apply to the clip stage (its recipe is fixed in minildm/train/clip.py).")
    return args


def main(argv=None, preset=None) -> int:
    """preset: a Preset to train instead of --preset's (bench/train_speed.py compares recipes this way)."""
    args = parse_args(argv)
    import torch

    from minildm.checkpoint import CheckpointError
    from minildm.config import get_preset, describe_preset, with_kl_autoencoder
    from minildm.train import distributed
    from minildm.device import pick_device
    from minildm.train.common import resolve_precision, stop_requested

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        preset = preset or get_preset(args.preset)
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
    if args.seed is not None:
        preset.vq_train = replace(preset.vq_train, seed=args.seed)
        preset.ldm = replace(preset.ldm, seed=args.seed)
    if args.lr_scale != 1:
        preset.vq_train = replace(preset.vq_train, lr=preset.vq_train.lr * args.lr_scale,
                                  disc_lr=preset.vq_train.disc_lr * args.lr_scale)
        preset.ldm = replace(preset.ldm, lr=preset.ldm.lr * args.lr_scale)
    out_dir, files = stage_outputs(args, preset, run_dir)
    start = time.time()
    folder = lock = None
    try:
        if main_rank:  # before any data loading or step 1: writable, locked, nothing replaced by accident
            from minildm.train.run_dir import prepare
            lock = prepare(out_dir, files, resume=args.resume, overwrite=args.overwrite,
                           preset=preset if args.stage in ("all", "autoencoder", "ldm") else None)
            if (args.stage == "all" and args.resume and (run_dir / "ldm.pt").is_file()
                    and not finished_autoencoder(args, preset, run_dir)):
                print(f"error: --resume would train {run_dir / 'autoencoder.pt'} further, and {run_dir / 'ldm.pt'} "
                      "was trained on it as it is: continue only the ldm with --stage ldm --resume, or start both "
                      "over with --overwrite.", file=sys.stderr)
                return 2
            if args.stage == "autoencoder" and (run_dir / "ldm.pt").is_file():
                print(f"note: {run_dir / 'ldm.pt'} was trained on the autoencoder this changes: train the ldm stage "
                      "again afterwards (--stage ldm --overwrite); sample.py refuses the pair until then.")
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
        if args.stage == "autoencoder" or (args.stage == "all" and not finished_autoencoder(args, preset, run_dir)):
            from minildm.train.autoencoder import train_autoencoder
            train_autoencoder(preset, run_dir, device, resume=args.resume, steps=args.steps,
                              batch_size=args.batch_size,
                              images=folder.images if folder else scene_data[0] if scene_data else None,
                              precision=precision, compile=args.compile)
            if stop_requested():  # Ctrl-C: never start the next stage on a half-trained autoencoder
                return stopped(run_dir)
        if args.stage in ("all", "ldm"):
            if args.resume and main_rank:  # the autoencoder may have changed under a half-trained ldm.pt
                from minildm.train.run_dir import check_resume_fits
                check_resume_fits(run_dir, preset)
            from minildm.train.ldm import train_ldm
            train_ldm(preset, run_dir, device, resume=args.resume, steps=args.steps, batch_size=args.batch_size,
                      data=(folder.images, folder.captions) if folder else scene_data, precision=precision,
                      compile=args.compile)
        if args.stage == "lora":
            from minildm.train.lora import train_lora
            train_lora(preset, Path(args.base or run_dir), device, concept=args.concept, rank=args.rank,
                       alpha=args.alpha, steps=args.steps, out=args.out, resume=args.resume, lr_scale=args.lr_scale)
        if args.stage == "clip":  # the small CLIP: IP-Adapter's image encoder and the CLIP-T/CLIP-I judge
            from minildm.train.clip import train_clip_stage
            train_clip_stage(run_dir, device, steps=args.steps, batch_size=args.batch_size, resume=args.resume)
        if args.stage == "body":  # base LDM of people, keypoint regressor + body VAE, then the body adapter
            from minildm.train.body import body_stage_config, train_body_stage
            cfg = body_stage_config("micro" if args.preset == "micro" else "body")
            cfg = replace(cfg, adapter_steps=args.steps or cfg.adapter_steps,
                          adapter_batch=args.batch_size or cfg.adapter_batch,
                          regressor_lr=cfg.regressor_lr * args.lr_scale, vae_lr=cfg.vae_lr * args.lr_scale,
                          adapter_lr=cfg.adapter_lr * args.lr_scale)
            run_dir = out_dir
            if not train_body_stage(run_dir, device, cfg, base_dir=args.base, resume=args.resume):
                return stopped(run_dir)
            print(f'try: python sample.py "a person raising the left arm" --run {run_dir} --body-id 3')
        if args.stage == "ip-adapter":  # frozen base run + CLIP (trained first if the run has none)
            from minildm.train.ip_adapter import IPAdapterTrainConfig, train_ip_adapter
            cfg = IPAdapterTrainConfig()
            cfg = replace(cfg, steps=args.steps or cfg.steps, batch_size=args.batch_size or cfg.batch_size,
                          lr=cfg.lr * args.lr_scale)
            base = Path(args.base or run_dir)
            run_dir = out_dir  # ip_adapter.pt (and clip.pt) go here
            train_ip_adapter(base, device, out_dir=run_dir, cfg=cfg, resume=args.resume)
            if run_dir == base:  # sample.py finds ldm.pt, ip_adapter.pt and clip.pt in one run directory
                print(f'try: python sample.py "" --image-prompt IMAGE.png --run {run_dir}')
        if stop_requested():
            return stopped(run_dir)
        distributed.barrier()  # rank 0 may still be plotting: no rank tears the group down under another
    except (ValueError, CheckpointError) as e:  # also RunDirError, DivergenceError, ImageReadError
        print(f"error: {e}", file=sys.stderr)
        return 2
    except torch.OutOfMemoryError:
        print(f"error: out of memory on {device} (the last checkpoint saved stays): lower --batch-size, add "
              "--grad-checkpoint, or try --precision bf16, then --resume.", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (loading data, encoding latents, a second Ctrl-C)
        print("stopped; every checkpoint saved so far stays: continue with --resume.", file=sys.stderr)
        return 130
    finally:
        if lock is not None:
            lock.release()
        distributed.cleanup()
    if not main_rank:
        return 0
    print(f"done in {(time.time() - start) / 60:.1f} min; run directory: {run_dir}")
    if args.stage in ("all", "ldm"):
        prompt = folder.captions[0][0] if folder else "a red circle on the left"
        print(f'try: python sample.py "{prompt}" --run {run_dir}')
    return 0


def stage_outputs(args, preset, run_dir: Path) -> tuple[Path, list[str]]:
    """The folder a stage writes into and the checkpoints there it would replace."""
    if args.stage == "all":
        return run_dir, ["autoencoder.pt", "ldm.pt"]
    if args.stage in ("autoencoder", "ldm"):
        return run_dir, [f"{args.stage}.pt"]
    if args.stage == "clip":
        return run_dir, ["clip.pt"]
    if args.stage == "lora":
        from minildm.train.lora import lora_train_config
        rank = args.rank or lora_train_config(preset).rank
        return Path(args.out or args.base or run_dir), [f"lora_{args.concept}_r{rank}.pt"]
    if args.stage == "ip-adapter":
        return Path(args.out or args.base or run_dir), ["ip_adapter.pt"]
    # body: the base model too unless --base gives one
    body = ["keypoint_regressor.pt", "body_vae.pt", "body_adapter.pt"]
    return Path(args.out or args.base or "runs/body"), body if args.base else ["autoencoder.pt", "ldm.pt", *body]


def finished_autoencoder(args, preset, run_dir: Path) -> bool:
    """--resume of a whole run whose autoencoder.pt already reached its steps: go straight to the ldm stage
    (training it again would recompute and rewrite it, and change nothing the ldm relies on)."""
    from minildm.checkpoint import load_checkpoint

    path = run_dir / "autoencoder.pt"
    return (args.resume and path.is_file()
            and load_checkpoint(path, "autoencoder").get("step", 0) >= (args.steps or preset.vq_train.steps))


def stopped(run_dir: Path) -> int:
    """After a Ctrl-C: the stage saved its checkpoint; nothing else starts. Exit code 130 (= interrupted)."""
    print(f"stopped after saving; continue with: python train.py --resume --out {run_dir} (and the same options)",
          file=sys.stderr)
    return 130


if __name__ == "__main__":
    sys.exit(main())
