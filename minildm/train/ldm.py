"""Stage 2: train the prompt encoder tau_theta and the UNet eps_theta jointly on scaled latents.

Algorithm 1 of the lecture, in latent space:
    z_0 = scale_factor * E(x)             (the frozen first stage, encoded once into a latent cache)
    y   = "" with probability p_uncond    (classifier-free guidance training, p = 0.1)
    t ~ Uniform{0..T-1}, eps ~ N(0, I)
    loss = || eps - eps_theta(sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps, t, tau_theta(y)) ||^2

The EMA of the weights is what we sample from. Progress: a tqdm bar; a sample grid every
`sample_every` steps; a loss plot; Ctrl-C saves and stops; `resume=True` continues from ldm.pt.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from minildm.checkpoint import load_checkpoint, save_checkpoint
from minildm.config import Preset
from minildm.data import shapes
from minildm.diffusion.ddpm import diffusion_loss
from minildm.diffusion.guidance import drop_tokens
from minildm.diffusion.schedule import NoiseSchedule
from minildm.modules.unet import UNet
from minildm.pipeline import LatentDiffusion, load_autoencoder
from minildm.text.encoder import PromptEncoder, TextEncoderConfig
from minildm.text.tokenizer import Tokenizer
from minildm.train.common import EMA, GracefulInterrupt, LossLog, progress, step_rng
from minildm.viz import plot_curves, save_grid

GRID_PROMPTS = ["a red circle on the left", "a blue square on the right", "a green triangle on the top",
                "a yellow circle on the bottom", "a purple square in the center", "a cyan triangle on the left",
                "a red triangle on the right", "a blue circle in the center"]


@torch.no_grad()
def encode_latent_cache(autoencoder, images: torch.Tensor, batch_size: int = 256, device="cpu") -> torch.Tensor:
    """Images [N, 3, H, W] in [-1, 1] -> scaled latents scale_factor * E(x), [N, c, h, w] (encode once, reuse)."""
    chunks = [autoencoder.encode(images[i:i + batch_size].to(device)).cpu()
              for i in tqdm(range(0, len(images), batch_size), desc="encoding latent cache", leave=False)]
    return torch.cat(chunks) * autoencoder.scale_factor.cpu()


def shapes_training_set(preset: Preset) -> tuple[torch.Tensor, list[str]]:
    """A fixed set of jittered SEEN shapes (no HELD_OUT combination), [N, 3, H, W] in [-1, 1], and captions."""
    data = shapes.ShapesDataset(size=preset.image_size, split="train", length=preset.ldm.cache_size,
                                seed=preset.ldm.seed, cache=True, paraphrase_prob=preset.ldm.paraphrase_prob)
    images, captions = zip(*(data[i] for i in range(len(data))))
    return torch.stack(images), list(captions)


def build_tokenizer(captions: list[str], max_len: int) -> Tokenizer:
    """The vocabulary comes from the training captions (plus every word shapes captions can use)."""
    return Tokenizer.build(list(captions) + [" ".join(shapes.VOCAB_WORDS)], max_len=max_len)


def train_ldm(preset: Preset, run_dir: str | Path, device: torch.device, resume: bool = False,
              steps: int | None = None, batch_size: int | None = None, show_progress: bool = True,
              data: tuple[torch.Tensor, list[str]] | None = None) -> Path:
    """Train tau_theta + eps_theta on the run's frozen autoencoder; returns the path of ldm.pt.

    data: optional (images [N, 3, H, W] in [-1, 1], captions); the default is the shapes training set.
    """
    cfg = preset.ldm
    steps = steps or cfg.steps
    batch_size = batch_size or cfg.batch_size
    run_dir = Path(run_dir)
    ckpt_path = run_dir / "ldm.pt"
    torch.manual_seed(cfg.seed)

    autoencoder = load_autoencoder(run_dir, device)
    images, captions = data if data is not None else shapes_training_set(preset)
    z0_all = encode_latent_cache(autoencoder, images, device=device)  # [N, c, h, w], std ~ 1

    state = load_checkpoint(ckpt_path, "ldm") if resume and ckpt_path.is_file() else None
    tokenizer = Tokenizer.from_state(state["tokenizer"]) if state else build_tokenizer(captions, preset.text.max_len)
    text_cfg = TextEncoderConfig(**{**asdict(preset.text), "vocab_size": tokenizer.vocab_size})
    tokens_all = tokenizer.encode(captions)  # [N, L]
    empty = tokenizer.encode([""])  # [1, L]: the unconditional prompt

    denoiser = nn.ModuleDict({"text_encoder": PromptEncoder(text_cfg), "unet": UNet(preset.unet)}).to(device)
    schedule = NoiseSchedule(**preset.schedule).to(device)
    opt = torch.optim.AdamW(denoiser.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = EMA(denoiser, cfg.ema_decay)
    log = LossLog()
    step = 0
    if state:
        denoiser.load_state_dict(state["model"])
        ema.model.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        log.load(state["log"])
        step = state["step"]

    def save() -> Path:
        return save_checkpoint(ckpt_path, "ldm", {
            "model": denoiser.state_dict(), "ema": ema.model.state_dict(), "optimizer": opt.state_dict(),
            "step": step, "log": log.state(), "tokenizer": tokenizer.state(), "text_config": asdict(text_cfg),
            "unet_config": asdict(preset.unet), "schedule": dict(preset.schedule), "image_size": preset.image_size,
            "prediction": "eps", "preset": preset.name,
        })

    def sample_grid() -> None:
        pipe = LatentDiffusion(autoencoder, tokenizer, ema.model["text_encoder"], ema.model["unet"], schedule,
                               preset.image_size).eval()
        images = pipe.generate(GRID_PROMPTS, steps=25, guidance=3.0, seed=0)
        save_grid(images, run_dir / "samples" / f"ldm_step{step:06d}.png", nrow=len(GRID_PROMPTS), upscale=2)

    lr_at = lambda s: cfg.lr * min(1.0, (s + 1) / cfg.warmup)  # linear warm-up, then constant
    denoiser.train()
    bar = progress(steps, step, "ldm", show_progress)
    with GracefulInterrupt() as interrupt:
        while step < steps and not interrupt.requested:
            rng = step_rng(cfg.seed, step)
            idx = torch.from_numpy(rng.integers(len(z0_all), size=batch_size))
            z0 = z0_all[idx].to(device)
            gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
            tokens = drop_tokens(tokens_all[idx], empty, cfg.p_uncond, gen).to(device)  # y = "" with prob. p
            context, mask = denoiser["text_encoder"](tokens)  # tau_theta(y), trained jointly
            t = torch.randint(0, schedule.num_timesteps, (batch_size,), generator=gen).to(device)
            eps = torch.randn(z0.shape, generator=gen).to(device)
            loss = diffusion_loss(lambda x_t, t_: denoiser["unet"](x_t, t_, context, mask), schedule, z0, t=t, eps=eps)

            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(denoiser.parameters(), cfg.grad_clip)
            opt.step()
            ema.update(denoiser, step)
            step += 1

            log.add(step, loss=loss.item())
            bar.update(1)
            bar.set_postfix(log.postfix("loss"))
            if cfg.sample_every and step % cfg.sample_every == 0:
                sample_grid()
                denoiser.train()
            if cfg.save_every and step % cfg.save_every == 0:
                save()
    bar.close()
    path = save()
    plot_curves({"loss": log.history["loss"]}, run_dir / "ldm_loss.png", title="LDM training loss (eps MSE)")
    if not interrupt.requested:
        sample_grid()
    if interrupt.requested:
        tqdm.write(f"stopped at step {step}; continue with --resume.")
    return path
