"""Presets: every number that decides a run, as plain dataclasses you can read top to bottom.

    tiny  32x32 shapes, VQ f = 4 (8x8x4 latents), a small UNet: `python train.py` on 2 CPU cores in minutes
    3090  256x256 captioned folders (Flickr8k), VQ f = 8 with 8192 codes (32x32x4 latents, as the seed-000
          project), a larger UNet for one 24 GB GPU

Each model's own config lives beside the model (VQConfig in autoencoder/vqvae.py, UNetConfig in
modules/unet.py, TextEncoderConfig in text/encoder.py); a preset only picks their values.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from minildm.autoencoder.losses import VQGANLossConfig
from minildm.autoencoder.vqvae import VQConfig
from minildm.modules.unet import UNetConfig
from minildm.text.encoder import TextEncoderConfig


@dataclass
class AutoencoderTrainConfig:
    steps: int = 800
    batch_size: int = 32
    lr: float = 2e-3  # peak; cosine decay to 0
    disc_lr: float = 2e-4
    loss: VQGANLossConfig = field(default_factory=VQGANLossConfig.tiny)
    log_every: int = 10
    image_every: int = 200  # reconstruction grid (inputs above reconstructions) every N steps
    save_every: int = 500
    eval_images: int = 1024  # held-back shapes for the PSNR / usage summary
    seed: int = 0


@dataclass
class LDMTrainConfig:
    steps: int = 4000
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    p_uncond: float = 0.1  # classifier-free guidance: train with the empty prompt this often
    cache_size: int = 16000  # shapes rendered and encoded once into the latent cache
    paraphrase_prob: float = 0.0
    sample_every: int = 1000
    save_every: int = 500
    seed: int = 0


@dataclass
class Preset:
    name: str
    image_size: int
    vq: VQConfig
    vq_train: AutoencoderTrainConfig
    text: TextEncoderConfig  # vocab_size is filled in from the tokenizer when training starts
    unet: UNetConfig
    ldm: LDMTrainConfig
    schedule: dict = field(default_factory=lambda: {"num_timesteps": 1000, "kind": "linear"})


def tiny() -> Preset:
    return Preset(
        name="tiny",
        image_size=32,
        vq=VQConfig.tiny(),
        vq_train=AutoencoderTrainConfig(),
        text=TextEncoderConfig(vocab_size=0, max_len=12, dim=128, depth=2, heads=4, dim_head=32),
        unet=UNetConfig(in_channels=4, out_channels=4, model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=1,
                        attention_levels=(0, 1, 2), heads=4, dim_head=32, context_dim=128, norm_groups=32),
        ldm=LDMTrainConfig(),
    )


def rtx3090() -> Preset:
    return Preset(
        name="3090",
        image_size=256,
        vq=VQConfig.f8_8192(),
        vq_train=AutoencoderTrainConfig(steps=200_000, batch_size=12, lr=4.5e-6 * 12, disc_lr=4.5e-6 * 12, loss=VQGANLossConfig.f8_8192(),
                                        image_every=2000, save_every=2000, eval_images=64),
        text=TextEncoderConfig(vocab_size=0, max_len=40, dim=512, depth=6, heads=8, dim_head=64),
        unet=UNetConfig.seed000(in_channels=4, context_dim=512),
        ldm=LDMTrainConfig(steps=300_000, batch_size=48, lr=1e-4, warmup=1000, ema_decay=0.9999,
                           sample_every=5000, save_every=2000),
        schedule={"num_timesteps": 1000, "kind": "scaled_linear"},
    )


def micro() -> Preset:
    """The tiny preset shrunk to seconds of CPU: for tests, quick lessons and smoke runs (blurry samples)."""
    p = tiny()
    p.name = "micro"
    p.vq = replace(p.vq, channels=8, num_codes=32, kmeans_iters=2)
    p.vq_train = replace(p.vq_train, steps=20, batch_size=16, image_every=0, save_every=0, eval_images=32)
    p.unet = UNetConfig(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
                        heads=2, dim_head=8, context_dim=32, norm_groups=8)
    p.text = replace(p.text, dim=32, depth=1, heads=2, dim_head=16)
    p.ldm = replace(p.ldm, steps=20, batch_size=16, cache_size=256, sample_every=0, save_every=0, warmup=2)
    return p


def get_preset(name: str) -> Preset:
    if name == "tiny":
        return tiny()
    if name == "3090":
        return rtx3090()
    if name == "micro":
        return micro()
    raise ValueError(f"unknown preset '{name}': use tiny, 3090 (or micro for a seconds-long smoke run).")


def count_parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())


def describe_preset(preset: Preset) -> str:
    """A table of the preset's components and their parameter counts (builds the models, no training)."""
    from minildm.autoencoder.vqvae import VQVAE
    from minildm.modules.unet import UNet
    from minildm.text.encoder import PromptEncoder

    f = preset.vq.downsample_factor
    rows = [
        ("autoencoder (VQ-VAE)", count_parameters(VQVAE(preset.vq)),
         f"{preset.image_size}x{preset.image_size}x3 -> {preset.image_size // f}x{preset.image_size // f}x"
         f"{preset.vq.z_channels}, {preset.vq.num_codes} codes"),
        ("prompt encoder", count_parameters(PromptEncoder(replace(preset.text, vocab_size=1000))),
         f"d={preset.text.dim}, depth {preset.text.depth}, max_len {preset.text.max_len} (vocab 1000 assumed)"),
        ("UNet", count_parameters(UNet(preset.unet)),
         f"channels {preset.unet.model_channels}x{preset.unet.channel_mult}, attention at {preset.unet.attention_levels}"),
    ]
    lines = [f"preset {preset.name}", f"{'component':<22}{'parameters':>14}  shape"]
    lines += [f"{name:<22}{n:>14,}  {info}" for name, n, info in rows]
    return "\n".join(lines)
