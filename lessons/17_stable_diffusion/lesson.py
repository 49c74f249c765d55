"""Lesson 17: Stable Diffusion v1 from the modules you built. Every SD v1.5 component next to the lesson that
built it, with its parameter count; then an SD-layout checkpoint is loaded and sampled through minildm, with
your sd_timesteps driving a hand-written DDIM loop and your img2img_timesteps driving SDEdit.

    python lessons/17_stable_diffusion/lesson.py [--quick]            a small random-weight SD layout
    python lessons/17_stable_diffusion/lesson.py --sd FILE_OR_FOLDER  the real weights (512x512; slow on a CPU)

Without --sd the lesson writes a random-weight checkpoint in SD's original single-file layout
(model.diffusion_model.*, first_stage_model.*, cond_stage_model.transformer.*) at a small size and loads it
back through the same loader a real v1.5 file goes through: its images are noise, its numbers are real.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from lessons import common  # noqa: E402
from minildm.autoencoder.kl import AutoencoderKL, KLConfig  # noqa: E402
from minildm.diffusion.ddim import ddim_step  # noqa: E402
from minildm.diffusion.guidance import cfg_model_fn  # noqa: E402
from minildm.modules.unet import UNet, UNetConfig  # noqa: E402
from minildm.pipeline import LatentDiffusion  # noqa: E402
from minildm.safetensors import save_safetensors  # noqa: E402
from minildm.stable_diffusion import keys  # noqa: E402
from minildm.text.bpe import BPETokenizer, bytes_to_unicode  # noqa: E402
from minildm.text.clip_text import CLIPTextConfig, CLIPTextTransformer  # noqa: E402
from minildm.viz import save_grid  # noqa: E402

GUIDANCE = 7.5
PROMPTS = ["a photo of a cat", "a watercolour of a lighthouse"]
# (component, minildm module, lesson where the learner built it)
COMPONENTS = [
    ("BPE tokenizer (49408 tokens, 77 positions)", "minildm/text/bpe.py", "06 (a word tokenizer; SD's is byte-level BPE)"),
    ("CLIP ViT-L/14 text transformer tau_theta", "minildm/text/clip_text.py", "04 (CLIP), 06 (the prompt transformer)"),
    ("KL autoencoder E / D, f = 8, 4 channels", "minildm/autoencoder/kl.py", "05 (autoencoder, KL vs VQ)"),
    ("scale factor 0.18215 on z", "AutoencoderKL.scale_factor", "10 (latent diffusion)"),
    ("noise schedule, scaled_linear 0.00085..0.012", "minildm/diffusion/schedule.py", "07 (the forward process)"),
    ("eps-prediction UNet with cross-attention", "minildm/modules/unet.py", "08 (training), 09 (cross-attention)"),
    ("DDIM, leading + offset 1, last step to abar_0", "minildm/diffusion/ddim.py", "11 (DDIM), 17"),
    ("classifier-free guidance s = 7.5", "minildm/diffusion/guidance.py", "12 (guidance)"),
    ("image-to-image (SDEdit)", "LatentDiffusion.generate(init_images=...)", "17 (this one)"),
]


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def print_components() -> None:
    """Every component with its lesson; parameters counted on SD v1.5's configs built on the meta device."""
    with torch.device("meta"):
        sizes = {"unet": count(UNet(UNetConfig.sd_v1())), "vae": count(AutoencoderKL(KLConfig.sd_v1())),
                 "text": count(CLIPTextTransformer(CLIPTextConfig()))}
    print("\nStable Diffusion v1.5, component by component:")
    for name, where, lesson in COMPONENTS:
        print(f"  {name:<48} {where:<44} lesson {lesson}")
    print(f"  parameters: UNet {sizes['unet'] / 1e6:.1f}M, autoencoder {sizes['vae'] / 1e6:.1f}M, text encoder "
          f"{sizes['text'] / 1e6:.1f}M = {sum(sizes.values()) / 1e6:.0f}M")


def write_random_sd(folder: Path) -> Path:
    """A small random-weight checkpoint in SD's original single-file layout, with a byte-level vocabulary."""
    torch.manual_seed(0)
    unet = UNet(UNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2, attention_levels=(0, 1),
                           heads=8, dim_head=None, context_dim=64, norm_groups=32))
    vae = AutoencoderKL(KLConfig(channels=32, channel_mult=(1, 2, 2), num_res_blocks=1))
    text = CLIPTextTransformer(CLIPTextConfig(vocab_size=514, width=64, layers=2, heads=1, mlp=256))
    with torch.no_grad():  # zero-initialised layers (UNet output, residual branches) get weights too
        for p in unet.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors({k: v.contiguous() for k, v in keys.original_state_dict(unet, vae, text).items()},
                     folder / "model.safetensors", metadata={"note": "random weights, lesson 17"})
    chars = list(bytes_to_unicode().values())  # no merges: every byte is its own token
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return folder / "model.safetensors"


@torch.no_grad()
def ddim_by_hand(pipe, fns, prompts, steps, x_T):
    """DDIM with your sd_timesteps: x_T [B, 4, h, w] -> z_0, the loop pipeline.generate runs inside."""
    timesteps, prev = fns["sd_timesteps"](pipe.schedule.num_timesteps, steps, 1)
    context_c, _ = pipe.encode_prompts(prompts)
    context_u, _ = pipe.encode_prompts([""])
    eps_fn = cfg_model_fn(pipe.unet, context_c, None, context_u, None, GUIDANCE)
    x = x_T
    for t, t_prev in zip(timesteps.tolist(), prev.tolist()):
        eps = eps_fn(x, torch.full((len(x),), t, dtype=torch.long))
        x, _ = ddim_step(pipe.schedule, x, eps, t, t_prev)
    return x


def main() -> None:
    out, fns = common.start(__file__, "Lesson 17: Stable Diffusion v1 from your modules")
    print_components()
    path = Path(sys.argv[sys.argv.index("--sd") + 1]) if "--sd" in sys.argv else None
    size = 512 if path else 32
    steps = 50 if path and not common.QUICK else (4 if common.QUICK else 10)
    if path is None:
        path = write_random_sd(out / "sd_random")
        print(f"\nwrote a random-weight SD layout: {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    pipe = LatentDiffusion.from_stable_diffusion(path)
    print(f"loaded {path}: UNet {count(pipe.unet) / 1e6:.2f}M, autoencoder {count(pipe.autoencoder) / 1e6:.2f}M, "
          f"text encoder {count(pipe.text_encoder) / 1e6:.2f}M parameters; heads per level "
          f"{[pipe.unet.cfg.attention_layout(pipe.unet.cfg.model_channels * m) for m in pipe.unet.cfg.channel_mult]}")

    x_T = torch.randn(len(PROMPTS), *pipe.latent_shape(size, size), generator=torch.Generator().manual_seed(0))
    images = pipe.generate(PROMPTS, steps=steps, guidance_scale=GUIDANCE, height=size, width=size, latents=x_T)
    z0 = ddim_by_hand(pipe, fns, PROMPTS, steps, x_T)
    diff = (pipe.decode(z0) - images).abs().max().item()
    print(f"\nDDIM {steps} steps with your sd_timesteps vs pipeline.generate: max |difference| {diff:.2e}"
          + ("  (same sampler)" if diff < 1e-4 else "  <- not SD's conventions yet"))

    strengths = (0.25, 0.5, 0.75, 1.0)
    rows = [images[:1]]
    for strength in strengths:
        run = fns["img2img_timesteps"](fns["sd_timesteps"](pipe.schedule.num_timesteps, steps, 1)[0], strength)
        ours = pipe.generate(PROMPTS[1:], steps=steps, guidance_scale=GUIDANCE, init_images=images[:1], strength=strength, seed=1)
        print(f"  image-to-image strength {strength:.2f}: your list runs {len(run)} of {steps} steps from t = "
              f"{int(run[0])}; the pipeline ran {int(steps * strength)}")
        rows.append(ours)
    save_grid(torch.cat(rows), out / "img2img_strengths.png", nrow=len(rows), upscale=4 if size <= 64 else 1)
    save_grid(images, out / "samples.png", nrow=len(images), upscale=4 if size <= 64 else 1)
    print("\nWith random weights the pictures are noise; with --sd and the v1.5 file the same code draws the prompts.")


if __name__ == "__main__":
    main()
