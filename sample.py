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
    p.add_argument("prompts", nargs="*", default=None,
                   help='one or more prompts; "" is the unconditional prompt (default: "a red circle on the left", '
                        'or "" with --image-prompt)')
    p.add_argument("--run", default="runs/tiny", help="run directory written by train.py")
    p.add_argument("--n", type=int, default=4, help="images per prompt")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (DDIM); DDPM always uses all T")
    p.add_argument("--sampler", default="ddim", help="ddim or ddpm")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta: 0 deterministic, 1 DDPM-like")
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale s (1 = off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lora", default=None, help="a LoRA file from train.py --stage lora")
    p.add_argument("--lora-strength", type=float, default=1.0, help="the LoRA update times this (0 = base model, 1 = as trained)")
    p.add_argument("--image-prompt", default=None,
                   help="an image file (PNG, JPG, ...) as image prompt, read by the run's IP-Adapter (ip_adapter.pt)")
    p.add_argument("--ip-lambda", type=float, default=1.0, help="IP-Adapter lambda: weight of the image prompt (0 = text only)")
    p.add_argument("--body-id", type=int, default=None,
                   help="(body runs) generate identity N of the run's people, read from a few rendered views of it")
    p.add_argument("--body-views", default=None,
                   help="(body runs) a folder of PNG views of one person (the run's keypoint regressor finds the keypoints)")
    p.add_argument("--body-lambda", type=float, default=1.0,
                   help="body_lambda: weight of the body stream (0 = the body stage's fine-tuned UNet without it; for the "
                        "base model leave out --body-id/--body-views); --ip-lambda is ref_lambda with --image-prompt")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="output PNG (default: RUN/samples/<prompt>.png)")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error(f"--n must be at least 1, got {args.n}.")
    if args.body_id is not None and args.body_views:
        p.error("give either --body-id or --body-views, not both.")
    args.prompts = args.prompts or ([""] if args.image_prompt else ["a red circle on the left"])
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from minildm.checkpoint import CheckpointError
    from minildm.pipeline import LatentDiffusion
    from minildm.device import pick_device
    from minildm.viz import save_grid

    try:
        device = pick_device(args.device)
        pipe = LatentDiffusion.load(args.run, device)
        if args.lora:
            from minildm.adapters.lora import apply_lora_file
            apply_lora_file(pipe, args.lora, args.lora_strength)
        extra_tokens = None
        if args.body_id is not None or args.body_views:  # BoLID: cat[c_ref, c_b] after the text of both CFG halves
            from minildm.adapters.body import load_body_prompter, load_view_folder
            from minildm.data.body_render import identity_views
            from minildm.data.folder import load_image_file
            prompter = load_body_prompter(pipe, args.run, body_lambda=args.body_lambda, ref_lambda=args.ip_lambda)
            if args.body_views:  # keypoints: the run's regressor
                c_body = prompter.c_body(load_view_folder(args.body_views, pipe.image_size))
            else:  # the renderer's keypoints
                views = identity_views(args.body_id, size=pipe.image_size, seed=prompter.seed)
                c_body = prompter.c_body(views["image"], views["keypoints"], views["visible"])
            ref = load_image_file(args.image_prompt, pipe.image_size) if args.image_prompt else None
            extra_tokens = prompter.extra_tokens(c_body, ref)
        elif args.image_prompt:  # IP-Adapter: image tokens appended after the text of both guidance halves
            from minildm.adapters.image_prompt import ADAPTER_FILE, load_image_prompter
            from minildm.data.folder import load_image_file
            prompter = load_image_prompter(pipe, Path(args.run) / ADAPTER_FILE, args.ip_lambda)
            extra_tokens = prompter.extra_tokens(load_image_file(args.image_prompt, pipe.image_size))
        prompts = [p for p in args.prompts for _ in range(args.n)]
        images = pipe.generate(prompts, steps=args.steps, guidance_scale=args.guidance, sampler=args.sampler,
                               eta=args.eta, seed=args.seed, progress=True, extra_tokens=extra_tokens)
    except (ValueError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    slug = "_".join(args.prompts)[:60].replace(" ", "-").replace("/", "-") or "unconditional"
    if args.body_id is not None or args.body_views:
        who = f"id{args.body_id}" if args.body_views is None else Path(args.body_views).name
        slug += f"_body-{who}-{args.body_lambda:g}"
    if args.image_prompt:
        slug += f"_ip-{Path(args.image_prompt).stem}-{args.ip_lambda:g}"
    out = Path(args.out) if args.out else Path(args.run) / "samples" / f"{slug}_seed{args.seed}.png"
    save_grid(images, out, nrow=args.n, upscale=4 if images.shape[-1] <= 64 else 1)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
