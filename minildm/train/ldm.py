"""Stage 2: train the prompt encoder tau_theta and the UNet eps_theta jointly on scaled latents.

Algorithm 1 of the lecture, in latent space:
    z_0 = scale_factor * E(x)             (the frozen first stage, encoded once into a latent cache)
    y   = "" with probability p_uncond    (classifier-free guidance training, p = 0.1)
    t ~ Uniform{0..T-1}, eps ~ N(0, I)
    loss = || eps - eps_theta(sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps, t, tau_theta(y)) ||^2
(with the preset's prediction target: the tiny preset regresses v = sqrt(abar_t) eps - sqrt(1 - abar_t) z_0
instead of eps, diffusion/ddpm.py).

The EMA of the weights is what we sample from. Progress: a tqdm bar; a sample grid every
`sample_every` steps; a loss plot; Ctrl-C saves and stops; `resume=True` continues from ldm.pt.
Data: the shapes training set, or (images, captions) such as a folder's, with several captions per
image allowed (each step draws one). Mixed precision on CUDA; under torchrun every rank trains on its
slice of each batch (train/distributed.py).
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from minildm.autoencoder.kl import DiagonalGaussian
from minildm.checkpoint import load_checkpoint
from minildm.config import Preset
from minildm.data import shapes
from minildm.diffusion.ddpm import diffusion_loss
from minildm.diffusion.guidance import drop_tokens
from minildm.diffusion.schedule import NoiseSchedule
from minildm.modules.unet import UNet
from minildm.pipeline import LatentDiffusion, load_autoencoder
from minildm.text.encoder import PromptEncoder, TextEncoderConfig
from minildm.text.tokenizer import Tokenizer
from minildm.train import distributed
from minildm.progress import step_rng
from minildm.train.common import EMA, Checkpoint, adamw, autocast, fit, grad_scaler
from minildm.viz import plot_curves, save_grid

GRID_PROMPTS = ["a red circle on the left", "a blue square on the right", "a green triangle on the top",
                "a yellow circle on the bottom", "a purple square in the center", "a cyan triangle on the left",
                "a red triangle on the right", "a blue circle in the center"]


class Denoiser(nn.ModuleDict):
    """tau_theta and eps_theta as one module (one optimiser, one EMA, one DDP wrapper); keys text_encoder, unet.

    forward(x_t [B, c, h, w], t [B], tokens [B, L]) -> eps_theta(x_t, t, tau_theta(y)) [B, c, h, w]."""

    def __init__(self, text_encoder: PromptEncoder, unet: UNet):
        super().__init__({"text_encoder": text_encoder, "unet": unet})

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        context, mask = self["text_encoder"](tokens)  # tau_theta(y), trained jointly
        return self["unet"](x_t, t, context, mask)


@torch.no_grad()
def encode_latent_cache(autoencoder, images: torch.Tensor, batch_size: int = 256, device="cpu",
                        show_progress: bool = True, seed: int = 0) -> torch.Tensor:
    """Images [N, 3, H, W] in [-1, 1] -> scaled latents scale_factor * E(x), [N, c, h, w] (encode once, reuse).

    A KL autoencoder's E(x) is one sample z = mu + sigma n of its posterior q(z|x), n from a generator seeded
    with `seed`: LDM trains its diffusion model on posterior samples, not on the mean (CompVis'
    get_first_stage_encoding), i.e. on the latents the decoder was trained to decode. LDM draws a fresh
    sample every step; one draw per image, kept, is what an encode-once cache allows (the shapes' posterior
    sigma is small against std(z): the summary in autoencoder.pt gives both).
    `images` may be anything that slices into float batches, e.g. a folder's Uint8Images."""
    generator = torch.Generator().manual_seed(seed)

    def encode(x: torch.Tensor) -> torch.Tensor:
        z = autoencoder.encode(x)
        return z.sample(generator) if isinstance(z, DiagonalGaussian) else z

    chunks = [encode(images[i:i + batch_size].to(device)).cpu()
              for i in tqdm(range(0, len(images), batch_size), desc="encoding latent cache", leave=False,
                            disable=not show_progress)]
    return torch.cat(chunks) * float(autoencoder.scale_factor)


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
              data: tuple[torch.Tensor, list[str] | list[list[str]]] | None = None, precision: str = "fp32",
              compile: bool = False, on_sample: Callable[[int, LatentDiffusion], None] | None = None) -> Path:
    """Train tau_theta + eps_theta on the run's frozen autoencoder; returns the path of ldm.pt.

    data: optional (images [N, 3, H, W] in [-1, 1] or a folder's Uint8Images, captions), where captions[i]
    is one caption or a list of captions of image i (each step draws one); the default is the shapes set.
    precision: fp32, bf16 or fp16 (mixed precision on CUDA only); compile: torch.compile the UNet.
    on_sample(step, pipe): called after each progress grid (every `sample_every` steps and at the end) with the
    EMA model as a pipeline, to score the model while it trains (bench/recipe_search.py --every): the loss
    curve does not show when the model starts to use a word.
    batch_size is per process: under torchrun the global batch is world_size * batch_size.
    """
    cfg = preset.ldm
    steps = steps or cfg.steps
    batch_size = batch_size or cfg.batch_size
    run_dir = Path(run_dir)
    ckpt_path = run_dir / "ldm.pt"
    torch.manual_seed(cfg.seed)
    world, main = distributed.world_size(), distributed.is_main()

    autoencoder = load_autoencoder(run_dir, device)
    images, captions = data if data is not None else shapes_training_set(preset)
    caption_lists = [[c] if isinstance(c, str) else list(c) for c in captions]  # image i -> its captions
    flat_captions = [c for caps in caption_lists for c in caps]
    num_captions = np.array([len(caps) for caps in caption_lists])
    if len(caption_lists) != len(images) or not num_captions.all():
        raise ValueError(f"data needs one caption (or a non-empty list of captions) per image: got {len(images)} "
                         f"images and {len(caption_lists)} caption entries, {int((num_captions == 0).sum())} empty.")
    first_caption = np.cumsum(num_captions) - num_captions  # image i's captions are flat rows first[i] ...
    z0_all = encode_latent_cache(autoencoder, images, device=device, show_progress=main,
                                 seed=cfg.seed)  # [N, c, h, w], std ~ 1

    state = load_checkpoint(ckpt_path, "ldm") if resume and ckpt_path.is_file() else None
    tokenizer = Tokenizer.from_state(state["tokenizer"]) if state else build_tokenizer(flat_captions, preset.text.max_len)
    text_cfg = TextEncoderConfig(**{**asdict(preset.text), "vocab_size": tokenizer.vocab_size})
    tokens_all = tokenizer.encode(flat_captions)  # [M, L], M = number of captions
    empty = tokenizer.encode([""])  # [1, L]: the unconditional prompt
    grid_prompts = GRID_PROMPTS if data is None else [caps[0] for caps in caption_lists[:len(GRID_PROMPTS)]]

    denoiser = Denoiser(PromptEncoder(text_cfg), UNet(preset.unet)).to(device)
    schedule = NoiseSchedule(**preset.schedule).to(device)
    opt = adamw(denoiser.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = EMA(denoiser, cfg.ema_decay)

    def weights() -> dict:
        distributed.check_in_sync(denoiser)  # every rank; raises if the replicas drifted apart
        return {"model": denoiser.state_dict(), "ema": ema.model.state_dict(), "tokenizer": tokenizer.state(),
                "text_config": asdict(text_cfg), "unet_config": asdict(preset.unet),
                "schedule": dict(preset.schedule), "image_size": preset.image_size, "prediction": cfg.prediction,
                "preset": preset.name,
                "autoencoder_fingerprint": autoencoder.fingerprint}  # the latents it learns: pipeline.load checks

    def load(saved: dict) -> None:
        denoiser.load_state_dict(saved["model"])
        ema.model.load_state_dict(saved["ema"])

    def sample_grid(step: int) -> None:
        if not main:
            return
        pipe = LatentDiffusion(autoencoder, tokenizer, ema.model["text_encoder"], ema.model["unet"], schedule,
                               preset.image_size, cfg.prediction).eval()
        images = pipe.generate(grid_prompts, steps=25, guidance_scale=3.0, seed=0)
        save_grid(images, run_dir / "samples" / f"ldm_step{step:06d}.png", nrow=len(grid_prompts), upscale=2)
        if on_sample is not None:
            on_sample(step, pipe)
        denoiser.train()

    if compile:
        denoiser["unet"].compile()  # after the EMA copy: the EMA (used for sampling) stays eager
    model = distributed.wrap(denoiser, device)

    def loss_fn(step: int):
        # every rank draws the global batch of world * batch_size examples and keeps its slice
        rng = step_rng(cfg.seed, step)
        idx = rng.integers(len(z0_all), size=batch_size * world)
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        pick = first_caption[idx] + rng.integers(num_captions[idx])  # one of each image's captions
        tokens = drop_tokens(tokens_all[torch.from_numpy(pick)], empty, cfg.p_uncond, gen)  # y = "" with prob. p
        t = torch.randint(0, schedule.num_timesteps, (len(idx),), generator=gen)
        eps = torch.randn((len(idx), *z0_all.shape[1:]), generator=gen)
        z0 = z0_all[torch.from_numpy(idx)]
        z0, tokens, t, eps = (distributed.shard(v).to(device) for v in (z0, tokens, t, eps))
        with autocast(device, precision):
            loss = diffusion_loss(lambda x_t, t_: model(x_t, t_, tokens), schedule, z0, cfg.prediction, t=t, eps=eps,
                                  snr_gamma=cfg.snr_gamma)
        return loss, {"loss": loss.item()}

    denoiser.train()
    run = fit(loss_fn, opt, steps, Checkpoint(ckpt_path, "ldm", weights, load, every=cfg.save_every),
              lr=cfg.lr, warmup=cfg.warmup, resume=resume, desc="ldm", show_progress=show_progress, device=device,
              scaler=grad_scaler(device, precision), max_norm=cfg.grad_clip, ema=ema, postfix=("loss",),
              on_step=lambda step: sample_grid(step) if cfg.sample_every and step % cfg.sample_every == 0
              and step < steps else None)  # the last step's grid is drawn once, below
    path = ckpt_path
    distributed.barrier()
    if not main:
        return path
    plot_curves({"loss": run.log.history["loss"]}, run_dir / "ldm_loss.png",
                title=f"LDM training loss ({cfg.prediction} MSE)")
    if run.finished:
        sample_grid(run.step)
    return path
