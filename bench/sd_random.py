"""Full-size Stable Diffusion v1.5 on this CPU with random weights: load memory and seconds per DDIM step.

    python bench/sd_random.py [--steps 3] [--dtype float32]

1. Writes a random-weight SD v1.5 checkpoint in the original single-file layout (model.diffusion_model.*,
   first_stage_model.*, cond_stage_model.transformer.*, 1.07B parameters) as one .safetensors file under
   bench/out/sd_random/ (fp32 4.3 GB), with CLIP's real BPE vocabulary (open_clip's copy) next to it. The
   weights come from diffusers' / transformers' own classes at SD v1.5's configs (reference libraries,
   bench only), renamed by minildm.stable_diffusion.keys and written by minildm's safetensors writer.
2. Runs `python sample.py --sd FILE "a photo of a cat" --steps N` in a fresh process (512x512) and reads its
   report: peak RSS after loading (the goal: at most the file size + 20%), seconds per DDIM step.
3. Writes bench/results/stable_diffusion.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
OUT = ROOT / "bench" / "out" / "sd_random"


def write_checkpoint(path: Path, dtype: torch.dtype) -> None:
    try:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel
    except ImportError:
        sys.exit("bench/sd_random.py needs the [parity] extra (diffusers, transformers) to draw the random weights.")
    from minildm.safetensors import save_safetensors
    from minildm.stable_diffusion import keys as K

    torch.manual_seed(0)
    unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8, sample_size=64)  # SD v1's UNet
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=512)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                        num_hidden_layers=12, hidden_act="quick_gelu"))
    sd = {K.UNET_PREFIX + k: v for k, v in K.unet_diffusers_to_original(unet.state_dict()).items()}
    sd.update({K.VAE_PREFIX + k: v for k, v in K.vae_diffusers_to_original(vae.state_dict()).items()})
    sd.update({K.TEXT_PREFIX + "text_model." + k.removeprefix("text_model."): v for k, v in text.state_dict().items()})
    del unet, vae, text
    save_safetensors({k: v.to(dtype).contiguous() for k, v in sd.items()}, path, metadata={"note": "random weights"})


def write_tokenizer(folder: Path) -> None:
    """CLIP's vocabulary as vocab.json + merges.txt, from open_clip's bpe_simple_vocab_16e6.txt.gz."""
    import importlib.util
    import json

    from minildm.text.bpe import BPETokenizer

    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        sys.exit("bench/sd_random.py needs open_clip's bpe_simple_vocab_16e6.txt.gz (the [parity] extra).")
    bpe = BPETokenizer.from_merges_gz(Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(bpe.vocab))
    merges = sorted(bpe.ranks, key=bpe.ranks.get)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    file = OUT / f"sd_v15_random_{args.dtype}.safetensors"
    if not file.is_file():
        start = time.perf_counter()
        write_checkpoint(file, dtype)
        print(f"wrote {file} in {time.perf_counter() - start:.0f} s")
    if not (OUT / "tokenizer" / "vocab.json").is_file():
        write_tokenizer(OUT / "tokenizer")
    png = OUT / "sample.png"
    cmd = [sys.executable, "sample.py", "--sd", str(file.relative_to(ROOT)), "a photo of a cat", "--steps", str(args.steps),
           "--device", "cpu", "--out", str(png.relative_to(ROOT))]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
    load_avg = os.getloadavg()
    start = time.perf_counter()
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    child_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    print(run.stdout, run.stderr[-2000:])
    if run.returncode:
        sys.exit(f"sample.py failed ({run.returncode})")
    loaded = re.search(r"loaded .* in ([\d.]+) s, peak RSS so far ([\d.]+) GiB", run.stdout)
    sampled = re.search(r"sampled .* in ([\d.]+) s", run.stdout)
    step_rates = re.findall(r"DDIM: 100%.*?([\d.]+)s/it", run.stderr)
    size = file.stat().st_size / 2**30
    load_s, load_rss = float(loaded.group(1)), float(loaded.group(2))
    per_step = float(step_rates[-1]) if step_rates else float("nan")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    cpu = next((line.split(":")[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    table = f"""# Stable Diffusion v1.5 layout, random weights, on this CPU

`python bench/sd_random.py --steps {args.steps} --dtype {args.dtype} --threads {args.threads}` (commit {commit}), which runs
`{' '.join(cmd[1:])}` in a fresh process with OMP_NUM_THREADS={args.threads}.
Machine: {cpu}, {os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM,
torch {torch.__version__}. The machine was SHARED with other engineers' jobs (load average {load_avg[0]:.1f} /
{load_avg[1]:.1f} when the run started), so times are pessimistic and vary from run to run.

| checkpoint file | size | load time | peak RSS after loading | peak / size | peak RSS of the whole run | s per DDIM step (512x512, CFG batch 2) | wall time |
|---|---|---|---|---|---|---|---|
| {file.name} | {size:.2f} GiB | {load_s:.1f} s | {load_rss:.2f} GiB | {load_rss / size:.2f} | {child_peak:.2f} GiB | {per_step:.1f} s | {wall:.0f} s |

Peak RSS after loading counts the interpreter and torch (~0.3-0.4 GiB) and the file's pages the loader
touched; the weights are memory-mapped and assigned in place (`load_state_dict(assign=True)` on modules built on
the meta device), so they are not copied. The whole run's peak adds the activations of 512x512 sampling (fp32,
the sdpa attention kernel) and the pages of the file that sampling reads. The image is noise: the weights are random.
"""
    results = ROOT / "bench" / "results" / "stable_diffusion.md"
    results.write_text(table)
    print(table)


if __name__ == "__main__":
    main()
