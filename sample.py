"""Sample images from a trained run:  python sample.py "a red circle on the left"
or from Stable Diffusion v1.x weights:  python sample.py --sd v1-5-pruned-emaonly.safetensors "a photo of a cat"

Writes a PNG grid (one row per prompt, --n images each) and prints where it went.
Same --seed, same prompts, same settings -> the same image. The image in column j of every row is drawn
from its own generator seeded --seed + j, whatever the other prompts and the batch: `--n 1 --seed S+j`
draws that one picture again. The output path is checked before any sampling, a --n too large for memory
is refused up front, and the images already drawn are written even when sampling stops half-way.
With --sd: DDIM 50 steps and guidance 7.5 by default, 512x512, fp16 on CUDA; --init-image/--strength for
image-to-image; --dry-run prints parameters, activation memory and an estimated time without loading weights.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path

import torch
from tqdm.auto import tqdm

from minildm.diffusion.ddpm import MAX_SEED


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Generate images with a trained minildm run.")
    p.add_argument("prompts", nargs="*", default=None,
                   help='one or more prompts; "" is the unconditional prompt (default: "a red circle on the left", '
                        'or "" with --image-prompt)')
    p.add_argument("--run", default="runs/tiny", help="run directory written by train.py")
    p.add_argument("--n", type=int, default=None, help="images per prompt (default 4; 1 with --sd)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (DDIM); DDPM always uses all T")
    p.add_argument("--sampler", default="ddim", help="ddim or ddpm")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta: 0 deterministic, 1 DDPM-like")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale s (1 = off; "
                   "default 3 for minildm runs, 7.5 with --sd)")
    p.add_argument("--sd", default=None, help="Stable Diffusion v1.x weights: a .safetensors/.ckpt file or a diffusers folder")
    p.add_argument("--tokenizer", default=None, help="(--sd) folder with vocab.json and merges.txt, if not next to the file")
    p.add_argument("--height", type=int, default=None, help="(--sd) image height, a multiple of 64 (default 512)")
    p.add_argument("--width", type=int, default=None, help="(--sd) image width, a multiple of 64 (default 512)")
    p.add_argument("--negative", default=None, help="negative prompt: the unconditional half of guidance (default \"\")")
    p.add_argument("--init-image", default=None, help="(--sd) image-to-image (SDEdit): start from this whole image, "
                   "resized to --height x --width; with one of them, or neither (shorter side 512), it keeps its "
                   "aspect ratio, the other side rounded to a multiple of 64")
    p.add_argument("--strength", type=float, default=0.8, help="image-to-image: how much noise to add (1 = ignore the image)")
    p.add_argument("--dtype", default="auto", help="(--sd) float32, float16 or bfloat16 (auto: float16 on CUDA, float32 on CPU)")
    p.add_argument("--dry-run", action="store_true", help="(--sd) print parameters, activation memory and an estimated "
                   "time for 512x512 on a 24 GB GPU, then exit")
    p.add_argument("--seed", type=int, default=0,
                   help="column j of the grid is drawn with seed + j (0 <= seed + j < 2**32)")
    p.add_argument("--batch-size", type=int, default=16,
                   help="images sampled at once (lower it if the GPU runs out of memory); the images do not change")
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
    p.add_argument("--out", default=None,
                   help="output PNG, or a folder for the default name (default: RUN/samples/<prompt>_seed<S>.png)")
    args = p.parse_args(argv)
    args.guidance = args.guidance if args.guidance is not None else (7.5 if args.sd or args.dry_run else 3.0)
    args.n = args.n if args.n is not None else (1 if args.sd or args.dry_run else 4)
    if args.n < 1:
        p.error(f"--n must be at least 1, got {args.n}.")
    if args.batch_size < 1:
        p.error(f"--batch-size must be at least 1, got {args.batch_size}.")
    if not 0 <= args.seed <= MAX_SEED - (args.n - 1):
        p.error(f"--seed must lie in [0, {MAX_SEED - (args.n - 1)}] so that every image's seed, --seed + j for "
                f"j < --n, fits torch's 32-bit generator (larger seeds would repeat smaller ones); got {args.seed}.")
    for flag in ("guidance", "eta", "lora_strength", "ip_lambda", "body_lambda"):
        if not math.isfinite(getattr(args, flag)):
            p.error(f"--{flag.replace('_', '-')} must be a finite number, got {getattr(args, flag)}.")
    if args.init_image and not args.sd:
        p.error("--init-image (image-to-image) is for Stable Diffusion weights: give --sd too.")
    sd_only = [flag for flag, given in (("--height", args.height is not None), ("--width", args.width is not None),
                                        ("--tokenizer", args.tokenizer is not None), ("--dtype", args.dtype != "auto"))
               if given]
    if sd_only and not (args.sd or args.dry_run):
        p.error(f"{' and '.join(sd_only)} apply to Stable Diffusion weights (--sd); a minildm run draws at the size "
                "it was trained at: drop them or give --sd.")
    if args.body_id is not None and args.body_views:
        p.error("give either --body-id or --body-views, not both.")
    args.prompts = args.prompts or ([""] if args.image_prompt else ["a red circle on the left"])
    return args


def output_path(args, default_dir: Path) -> Path:
    """The PNG to write: --out (a directory gets the default name inside), else default_dir/<prompt>.png."""
    slug = "_".join(args.prompts)[:60].replace(" ", "-").replace("/", "-") or "unconditional"
    if args.body_id is not None or args.body_views:
        who = f"id{args.body_id}" if args.body_views is None else Path(args.body_views).name
        slug += f"_body-{who}-{args.body_lambda:g}"
    if args.image_prompt:
        slug += f"_ip-{Path(args.image_prompt).stem}-{args.ip_lambda:g}"
    name = f"{slug}_seed{args.seed}.png"
    if args.out is None:
        return default_dir / name
    out = Path(args.out)
    if out.is_dir() or args.out.endswith(("/", os.sep)):
        return out / name
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out {args.out} is not a .png file name: give one such as grid.png (or a folder).")
    return out


def check_writable(out: Path) -> None:
    """Before any sampling: the folder of `out` exists (or is made) and takes a file."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out.parent, prefix=".sample-check-"):
            pass
    except OSError as e:
        raise ValueError(f"cannot write into {out.parent} ({e.strerror or e}): choose another --out.") from None


def check_memory(n_images: int, image_size: int, upscale: int) -> None:
    """Refuse up front a grid that would not fit in memory (the images as floats plus the uint8 grid)."""
    side = image_size * upscale + 2
    need = n_images * (3 * image_size**2 * 4 + 3 * side**2)
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not Linux: no cheap way to ask
        return
    if need > free // 2:
        fits = max(1, int(free // 2 // (need / n_images)))
        raise ValueError(f"{n_images} images make a grid of {need / 2**30:.1f} GB, more than half the free memory "
                         f"({free / 2**30:.1f} GB): ask for at most {fits} images per run (--n x prompts), and "
                         "the next ones with a higher --seed.")


def save(images: torch.Tensor, out: Path, nrow: int, upscale: int) -> Path:
    """Write the grid; if that fails (disk full, folder gone), write it into the temp folder instead."""
    from minildm.viz import save_grid

    try:
        return save_grid(images, out, nrow=nrow, upscale=upscale)
    except OSError as e:
        fallback = Path(tempfile.gettempdir()) / out.name
        save_grid(images, fallback, nrow=nrow, upscale=upscale)
        raise ValueError(f"could not write {out} ({e.strerror or e}); the images were saved to {fallback} "
                         "instead.") from None


def read_init_image(path: str, height: int | None, width: int | None, multiple: int) -> torch.Tensor:
    """--init-image -> [1, 3, H, W] in [0, 1], read like every image input (data/images.py: 16-bit scaled, alpha
    on white, one sentence for a bad file), whole: --height and --width as given; with one of them the other
    follows the picture's aspect ratio, with neither the shorter side is 512 (SD v1's training size); a side
    that follows the aspect ratio is rounded to a multiple of `multiple` (64: what SD's UNet takes)."""
    from minildm.data.images import read_image

    size = (height, width) if height or width else 512
    pixels = torch.from_numpy(read_image(path, size, crop=False, multiple=multiple))  # uint8 [H, W, 3]
    return pixels.permute(2, 0, 1).float().div(255)[None]


def sample_sd(args) -> int:
    """python sample.py --sd PATH "prompt": Stable Diffusion v1.x on minildm's modules."""
    import resource
    import time

    from minildm.device import pick_device
    from minildm.pipeline import LatentDiffusion
    from minildm.stable_diffusion import SDLoadError

    if args.dry_run:
        from minildm.stable_diffusion.estimate import print_estimate
        print_estimate(height=args.height or 512, width=args.width or 512, steps=args.steps)
        return 0
    try:
        out = output_path(args, Path("runs/sd/samples"))
        check_writable(out)  # before minutes of loading and sampling
        device = pick_device(args.device)
        dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
        if args.dtype != "auto" and args.dtype not in dtypes:
            raise ValueError(f"--dtype must be auto, {', '.join(dtypes)}; got {args.dtype}.")
        dtype = dtypes.get(args.dtype, torch.float16 if device.type == "cuda" else torch.float32)
        if dtype != torch.float32 and device.type == "cpu":
            raise ValueError(f"--dtype {args.dtype} is for CUDA; on the CPU use float32.")
        init_image, height, width = None, args.height, args.width
        if args.init_image:  # before minutes of loading: a file that cannot be read is said at once
            init_image = read_init_image(args.init_image, height, width, multiple=64)  # SD v1: f = 8, 3 halvings
            height, width = init_image.shape[2:]
            print(f"{args.init_image} read whole at {height}x{width} (height x width)")
        tokenizer = None
        if args.tokenizer:
            from minildm.text.bpe import BPETokenizer
            tokenizer = BPETokenizer.from_folder(args.tokenizer)
        start = time.perf_counter()
        pipe = LatentDiffusion.from_stable_diffusion(args.sd, device=device, dtype=dtype, tokenizer=tokenizer)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)
        print(f"loaded {args.sd} in {time.perf_counter() - start:.1f} s, peak RSS so far {peak:.2f} GiB")
        n = args.n
        prompts = [p for p in args.prompts for _ in range(n)]
        init = None if init_image is None else init_image.repeat(len(prompts), 1, 1, 1)
        start = time.perf_counter()
        seeds = [args.seed + j for _ in args.prompts for j in range(n)]  # column j: seed + j, as below
        images = pipe.generate(prompts, steps=args.steps, guidance_scale=args.guidance, eta=args.eta, seed=seeds,
                               progress=True, height=height, width=width, negative_prompts=args.negative,
                               init_images=init, strength=args.strength)
        calls = args.steps - (args.steps - int(args.steps * args.strength) if init is not None else 0)
        seconds = time.perf_counter() - start
        print(f"sampled {len(prompts)} image(s) in {seconds:.1f} s ({calls} DDIM steps, {seconds / calls:.2f} s per step "
              f"including the text encoder and decoder)")
    except (ValueError, SDLoadError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except torch.OutOfMemoryError:
        print(f"error: out of memory on {device}: lower --height/--width, --n or use --dtype float16.",
              file=sys.stderr)
        return 1
    try:
        print(f"wrote {save(images.float(), out, n, 1)}")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.sd or args.dry_run:
        return sample_sd(args)
    from minildm.checkpoint import CheckpointError
    from minildm.pipeline import LatentDiffusion
    from minildm.device import pick_device

    images, out, upscale, device = [], None, 1, args.device  # what the error handlers below may need
    try:
        out = output_path(args, Path(args.run) / "samples")
        check_writable(out)
        device = pick_device(args.device)
        pipe = LatentDiffusion.load(args.run, device)
        upscale = 4 if pipe.image_size <= 64 else 1
        check_memory(len(args.prompts) * args.n, pipe.image_size, upscale)
        if args.lora:
            from minildm.adapters.lora import apply_lora_file  # LoRA weights + the new words the file teaches
            apply_lora_file(pipe, args.lora, args.lora_strength)
        extra_tokens = None
        if args.body_id is not None or args.body_views:  # BoLID: cat[c_ref, c_b] after the text of both CFG halves
            from minildm.adapters.body import load_body_prompter, load_view_folder
            from minildm.data.body_render import BACKGROUND, identity_views
            from minildm.data.images import read_image_tensor
            prompter = load_body_prompter(pipe, args.run, body_lambda=args.body_lambda, ref_lambda=args.ip_lambda)
            if args.body_views:  # keypoints: the run's regressor
                c_body = prompter.c_body(load_view_folder(args.body_views, pipe.image_size))
            else:  # the renderer's keypoints
                views = identity_views(args.body_id, size=pipe.image_size, seed=prompter.seed)
                c_body = prompter.c_body(views["image"], views["keypoints"], views["visible"])
            ref = read_image_tensor(args.image_prompt, pipe.image_size, BACKGROUND) if args.image_prompt else None
            extra_tokens = prompter.extra_tokens(c_body, ref)
        elif args.image_prompt:  # IP-Adapter: image tokens appended after the text of both guidance halves
            from minildm.adapters.image_prompt import ADAPTER_FILE, load_image_file, load_image_prompter
            prompter = load_image_prompter(pipe, Path(args.run) / ADAPTER_FILE, args.ip_lambda)
            extra_tokens = prompter.extra_tokens(load_image_file(args.image_prompt, pipe.image_size))
        prompts = [p for p in args.prompts for _ in range(args.n)]
        seeds = [args.seed + j for _ in args.prompts for j in range(args.n)]  # column j: seed + j
        with tqdm(total=len(prompts), desc="images", unit="img", disable=len(prompts) <= args.batch_size) as bar:
            for i in range(0, len(prompts), args.batch_size):
                batch = slice(i, i + args.batch_size)
                images.append(pipe.generate(prompts[batch], steps=args.steps, guidance_scale=args.guidance,
                                            sampler=args.sampler, eta=args.eta, seed=seeds[batch],
                                            progress=len(prompts) <= args.batch_size, extra_tokens=extra_tokens).cpu())
                bar.update(len(images[-1]))
        print(f"wrote {save(torch.cat(images), out, args.n, upscale)}; column j is --seed {args.seed} + j "
              f"(--n 1 --seed {args.seed}+j draws that image alone)")
        return 0
    except (ValueError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except torch.OutOfMemoryError:
        print(f"error: out of memory sampling {min(args.batch_size, len(args.prompts) * args.n)} images at once on "
              f"{device}: lower --batch-size (now {args.batch_size}) or sample with --device cpu."
              + save_partial(images, out, args.n, upscale), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stopped." + save_partial(images, out, args.n, upscale), file=sys.stderr)
        return 130


def save_partial(images: list[torch.Tensor], out: Path | None, nrow: int, upscale: int) -> str:
    """Write the images finished before sampling stopped (nothing lost); returns a sentence saying where."""
    if not images or out is None:
        return ""
    partial = out.with_name(out.stem + "_partial.png")
    try:
        path = save(torch.cat(images), partial, nrow, upscale)
    except ValueError as e:
        return f" {e}"
    return f" The {sum(len(x) for x in images)} images finished before are in {path}."


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
