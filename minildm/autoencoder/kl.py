"""The KL-regularised autoencoder of LDM and Stable Diffusion (Rombach et al. 2022, arXiv:2112.10752, sec. 3).

Lecture 13, "LDM: Autoencoder": the first stage can be regularised two ways. The VQ-VAE (vqvae.py) snaps
latents onto a codebook; the KL autoencoder instead makes the encoder output a diagonal Gaussian
posterior and pulls it softly towards N(0, I), like a VAE with a tiny weight on the KL term:

    (mu, log sigma^2) = quant_conv(E(x))                  [B, 2c, H/f, W/f] split into two [B, c, H/f, W/f]
    z = mu + sigma * n,  n ~ N(0, I)                      (training; `mode()` = mu at inference)
    x_rec = D(post_quant_conv(z))
    KL(q(z|x) || N(0, I)) = 1/2 sum_(c,h,w) (mu^2 + sigma^2 - 1 - log sigma^2)        per image
    L = |x - x_rec| + w_p L_perceptual + w_kl KL (+ GAN)   with w_kl ~ 1e-6 in LDM's configs

so the latent space stays continuous (nothing to quantise) but cannot drift to arbitrary scales. The
diffusion model then works on z * scale_factor; SD v1's autoencoder (f = 8, c = 4) uses 0.18215, which is
1 / std(z) measured on its training images, as `compute_scale_factor` does.

Layout and parameter names follow the original CompVis code (so an SD v1 `first_stage_model.*` state dict
loads as it is):
  Encoder: conv_in -> per level i: down[i].block[j] (ResnetBlock x num_res_blocks), down[i].downsample
           -> mid.block_1, mid.attn_1 (single-head self-attention over pixels), mid.block_2
           -> norm_out, SiLU, conv_out -> 2c channels (mean and log-variance)
  Decoder: conv_in -> mid.block_1, mid.attn_1, mid.block_2 -> per level i (reversed): up[i].block[j]
           (num_res_blocks + 1), up[i].upsample -> norm_out, SiLU, conv_out
The blocks are the VQ-VAE's (ResBlock, Downsample, Upsample) with three differences SD's weights need:
GroupNorm eps 1e-6, a downsampling conv padded only right and bottom (pad (0, 1, 0, 1), then stride 2
without padding, which shifts the sampling grid by half a pixel against vqvae.py's symmetric padding),
and the self-attention block in the middle.
Images are float tensors in [-1, 1].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from minildm.modules.attention import attention


@dataclass
class KLConfig:
    in_channels: int = 3
    channels: int = 128  # base width; level i has channels * channel_mult[i]
    channel_mult: tuple = (1, 2, 4, 4)  # f = 2 ** (len - 1)
    num_res_blocks: int = 2  # ResnetBlocks per encoder level (the decoder has one more)
    z_channels: int = 4  # latent channels c
    norm_groups: int = 32
    scale_factor: float = 0.18215  # z_diffusion = z * scale_factor (SD v1's measured 1 / std(z))

    def __post_init__(self):
        self.channel_mult = tuple(self.channel_mult)
        widths = [self.channels * m for m in self.channel_mult]
        if not self.channel_mult or any(w % self.norm_groups for w in widths):
            raise ValueError(f"every level width {widths} must be divisible by norm_groups={self.norm_groups}.")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @classmethod
    def sd_v1(cls) -> "KLConfig":
        """Stable Diffusion v1's autoencoder (kl-f8): 83.7M parameters, 512x512x3 -> 64x64x4."""
        return cls()


def _norm(groups: int, ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, ch, eps=1e-6)


class ResnetBlock(nn.Module):
    """h = conv2(SiLU(GN(conv1(SiLU(GN x))))); out = nin_shortcut(x) + h.  [B, C_in, H, W] -> [B, C_out, H, W]."""

    def __init__(self, in_ch: int, out_ch: int, groups: int):
        super().__init__()
        self.norm1 = _norm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = _norm(groups, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w pixels, residual:  x + proj_out(softmax(q k^T / sqrt(C)) v).

    q, k, v, proj_out are 1x1 convs (per-pixel Linear maps).  x [B, C, h, w] -> [B, C, h, w].
    """

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.norm = _norm(groups, ch)
        self.q, self.k, self.v = (nn.Conv2d(ch, ch, 1) for _ in range(3))
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)
        q, k, v = (rearrange(f(hn), "b c h w -> b 1 (h w) c") for f in (self.q, self.k, self.v))
        out = rearrange(attention(q, k, v), "b 1 (h w) c -> b c h w", h=h, w=w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """[B, C, H, W] -> [B, C, H/2, W/2]: pad right and bottom by one, then a 3x3 stride-2 conv (CompVis)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """[B, C, H, W] -> [B, C, 2H, 2W]: nearest-neighbour upsampling, then a 3x3 conv."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Mid(nn.Module):
    """ResnetBlock, AttnBlock, ResnetBlock at the lowest resolution (both encoder and decoder)."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.block_1, self.attn_1, self.block_2 = ResnetBlock(ch, ch, groups), AttnBlock(ch, groups), ResnetBlock(ch, ch, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


def level(blocks: list[nn.Module], resample_name: str, resample: nn.Module | None) -> nn.Module:
    """One resolution level as CompVis names it: `block` (ResnetBlocks), then `downsample` / `upsample` if any."""
    m = nn.Module()
    m.block = nn.ModuleList(blocks)
    if resample is not None:
        m.add_module(resample_name, resample)
    return m


def run_level(m: nn.Module, h: torch.Tensor) -> torch.Tensor:
    for block in m.block:
        h = block(h)
    for name in ("downsample", "upsample"):
        if hasattr(m, name):
            h = getattr(m, name)(h)
    return h


class Encoder(nn.Module):
    """x [B, 3, H, W] -> moments [B, 2 z_channels, H/f, W/f] (mean and log-variance, before quant_conv)."""

    def __init__(self, cfg: KLConfig):
        super().__init__()
        widths = [cfg.channels * m for m in cfg.channel_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)
        self.down, ch = nn.ModuleList(), widths[0]
        for i, width in enumerate(widths):
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(ch, width, cfg.norm_groups))
                ch = width
            self.down.append(level(blocks, "downsample", Downsample(ch) if i < len(widths) - 1 else None))
        self.mid = Mid(ch, cfg.norm_groups)
        self.norm_out = _norm(cfg.norm_groups, ch)
        self.conv_out = nn.Conv2d(ch, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for m in self.down:
            h = run_level(m, h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    """z [B, z_channels, h, w] (after post_quant_conv) -> x [B, 3, h*f, w*f]."""

    def __init__(self, cfg: KLConfig):
        super().__init__()
        widths = [cfg.channels * m for m in cfg.channel_mult]
        ch = widths[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, ch, 3, padding=1)
        self.mid = Mid(ch, cfg.norm_groups)
        levels = []
        for i in reversed(range(len(widths))):  # built from the lowest resolution up, stored by level index
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(ch, widths[i], cfg.norm_groups))
                ch = widths[i]
            levels.insert(0, level(blocks, "upsample", Upsample(ch) if i > 0 else None))
        self.up = nn.ModuleList(levels)  # up[0] is the full-resolution level, run last
        self.norm_out = _norm(cfg.norm_groups, ch)
        self.conv_out = nn.Conv2d(ch, cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for m in reversed(self.up):
            h = run_level(m, h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussian:
    """q(z | x) = N(mean, diag(exp(logvar))) from moments [B, 2c, h, w] (first c channels: mean)."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)  # as LDM: keeps exp() finite for an untrained encoder
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mean + std * n, n ~ N(0, I) (the reparameterisation trick: gradients reach mean and std).

        n is drawn on the generator's device (a CPU generator gives the same n for a model on any device)."""
        device = generator.device if generator is not None else self.mean.device
        n = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * n.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) = 1/2 sum_(c,h,w) (mean^2 + var - 1 - logvar), one value per image: [B]."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class AutoencoderKL(nn.Module):
    """encode(x) -> DiagonalGaussian; decode(z) -> x; forward(x) -> (x_rec, kl [0-dim], info).

    Shapes: x [B, 3, H, W] in [-1, 1], z [B, c, H/f, W/f] unscaled (diffusion uses z * scale_factor).
    """

    def __init__(self, cfg: KLConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)

    @property
    def scale_factor(self) -> float:
        return self.cfg.scale_factor

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the decoder's final conv: where VQGAN's adaptive GAN weight compares gradients."""
        return self.decoder.conv_out.weight

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        f = self.cfg.downsample_factor
        if x.dim() != 4 or x.shape[1] != self.cfg.in_channels or x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"x must be images [B, {self.cfg.in_channels}, H, W] in [-1, 1] with H and W divisible "
                             f"by f={f}, got shape {tuple(x.shape)}.")
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents [B, c, h, w] -> images [B, 3, h*f, w*f] in about [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, sample: bool = True) -> tuple:
        """Training pass: x -> (x_rec, mean KL per image, {"posterior": q}); the loss weighs the KL (~1e-6)."""
        posterior = self.encode(x)
        z = posterior.sample() if sample else posterior.mode()
        return self.decode(z), posterior.kl().mean(), {"posterior": posterior}

    @torch.no_grad()
    def compute_scale_factor(self, batches: Iterable[torch.Tensor], generator: torch.Generator | None = None) -> float:
        """scale_factor = 1 / std(z) over posterior samples z ~ q(z|x) of `batches` (LDM measures samples, the
        latents its diffusion model trains on); stored in cfg and returned."""
        zs = torch.cat([self.encode(x).sample(generator).flatten().double() for x in batches])
        if zs.numel() < 2:
            raise ValueError("compute_scale_factor needs at least one batch of images to measure std(z).")
        self.cfg.scale_factor = float(1.0 / zs.std().clamp_min(1e-12))
        return self.cfg.scale_factor
