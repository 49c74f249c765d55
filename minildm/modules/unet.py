"""The denoiser eps_theta(z_t, t, tau_theta(y)): a UNet with cross-attention (LDM / ADM layout).

It predicts whatever the preset's `prediction` says (LDMTrainConfig): eps as in the lecture, or v (the
tiny preset) or x0; the lecture's name eps_theta stays for the network.

    emb = MLP(timestep_embedding(t))                       one vector per sample, added inside every ResBlock
    down path:  conv_in, then per level: num_res_blocks x [ResBlock (+ SpatialTransformer)], Downsample
    middle:     ResBlock, SpatialTransformer, ResBlock
    up path:    per level (reversed): (num_res_blocks + 1) x [concat skip, ResBlock (+ SpatialTransformer)], Upsample
    out:        GroupNorm, SiLU, conv_out (zero-initialised)  -> the prediction [B, C, h, w]

Every block of the down path pushes its output on a stack; every ResBlock of the up path pops one and
concatenates it along channels (the UNet's skip connections). A level l works at resolution h / 2^l with
model_channels * channel_mult[l] channels; `attention_levels` lists the levels that get a
SpatialTransformer (in both the down and up paths), which is where the prompt enters via cross-attention.

As in ADM/LDM, the last conv of every ResBlock, the proj_out of every SpatialTransformer and conv_out
are zero-initialised: a fresh UNet predicts 0 and each residual branch starts as the identity.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from minildm.modules.attention import KERNELS
from minildm.modules.blocks import Downsample, ResBlock, Upsample
from minildm.modules.transformer import SpatialTransformer


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of timesteps t [B] -> [B, dim], laid out as [cos | sin] (as ADM/LDM).

        freq_i = max_period^(-i / half),  i = 0..half-1,  half = dim // 2
        emb    = [cos(t freq_0), ..., cos(t freq_{half-1}), sin(t freq_0), ..., sin(t freq_{half-1})]
    An odd `dim` gets one trailing zero column.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None, :]  # t * freq_i
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedSequential(nn.Sequential):
    """A UNet block: runs its layers in order, giving each the inputs it needs (emb, or context and mask)."""

    def forward(self, x, emb, context, context_mask):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, context_mask)
            else:
                x = layer(x)
        return x


@dataclass
class UNetConfig:
    in_channels: int = 4  # latent channels c of z
    out_channels: int = 4  # eps has the shape of z
    model_channels: int = 64  # channels of level 0
    channel_mult: tuple = (1, 2, 2)  # level l has model_channels * channel_mult[l] channels
    num_res_blocks: int = 2  # ResBlocks per level in the down path (the up path has one more)
    attention_levels: tuple = (1, 2)  # levels with a SpatialTransformer after each ResBlock
    mid_attention: bool = True  # SpatialTransformer between the two middle ResBlocks
    # Attention layout per level (channels C of the level): both set -> heads x dim_head at every level
    # (minildm's presets); dim_head None -> `heads` heads of width C / heads (SD v1: 8 heads of 40, 80, 160);
    # heads None -> heads = C / dim_head (SD v2: 64-wide heads, 5 / 10 / 20 of them).
    heads: int | None = 4
    dim_head: int | None = 32
    proj_linear: bool = False  # SpatialTransformer proj_in / proj_out as Linear on tokens (SD v2) or 1x1 conv (SD v1)
    context_dim: int = 128  # width of tau_theta(y)
    transformer_depth: int = 1  # BasicTransformerBlocks per SpatialTransformer
    dropout: float = 0.0
    norm_groups: int = 32  # GroupNorm groups; must divide every level's channel count
    kernel: str = "naive"  # attention kernel: "naive" | "chunked" | "sdpa"
    # weights and activations in channels_last (NHWC) memory format: the layout oneDNN's CPU convolutions and
    # cuDNN's tensor cores work in (NCHW costs them a reorder per convolution), and in which the
    # SpatialTransformer's "b c h w -> b (h w) c" is a view instead of a copy (bench/unet_reference.py)
    channels_last: bool = False
    use_checkpoint: bool = False  # gradient checkpointing: recompute block activations in backward

    def __post_init__(self):
        self.channel_mult = tuple(self.channel_mult)  # accept lists (e.g. a config read back from JSON)
        self.attention_levels = tuple(self.attention_levels)
        levels = len(self.channel_mult)
        if any(not 0 <= lvl < levels for lvl in self.attention_levels):
            raise ValueError(f"attention_levels {self.attention_levels} must be level indices in 0..{levels - 1}.")
        bad = [m for m in self.channel_mult if (self.model_channels * m) % self.norm_groups]
        if self.model_channels % self.norm_groups or bad:
            raise ValueError(
                f"norm_groups={self.norm_groups} must divide model_channels * mult for every mult in "
                f"{self.channel_mult} (model_channels={self.model_channels}); pick a divisor."
            )
        if self.kernel not in KERNELS:
            raise ValueError(f"Unknown attention kernel {self.kernel!r}; choose one of {KERNELS}.")
        if self.heads is None and self.dim_head is None:
            raise ValueError("give heads, dim_head or both (SD v1: heads=8, dim_head=None; SD v2: heads=None, dim_head=64).")
        for lvl in self.attention_levels + ((len(self.channel_mult) - 1,) if self.mid_attention else ()):
            self.attention_layout(self.model_channels * self.channel_mult[lvl])

    def attention_layout(self, channels: int) -> tuple[int, int]:
        """(heads, dim_head) of a SpatialTransformer on `channels` channels (see the fields' comment)."""
        heads, dim_head = self.heads, self.dim_head
        if heads is None or dim_head is None:
            split = dim_head if heads is None else heads
            if channels % split:
                raise ValueError(f"{channels} channels do not split into heads of {split}: "
                                 f"pick heads / dim_head dividing every attended level's channels.")
            heads, dim_head = (channels // dim_head, dim_head) if heads is None else (heads, channels // heads)
        return heads, dim_head

    @classmethod
    def flickr8k_report(cls, in_channels: int = 4, context_dim: int = 256) -> "UNetConfig":
        """The UNet of the Flickr8k student report's own diffusion model (a diffusers UNet2DConditionModel):
        block channels 64,128,256,256, two layers per block, cross-attention in the first two down and last two
        up blocks (= levels 0 and 1, the two highest resolutions), plus the cross-attention middle block of that library's default. The report does not
        give its cross-attention width; 256 is our choice."""
        return cls(
            in_channels=in_channels,
            out_channels=in_channels,
            model_channels=64,
            channel_mult=(1, 2, 4, 4),
            num_res_blocks=2,
            attention_levels=(0, 1),
            mid_attention=True,
            heads=8,
            dim_head=32,
            context_dim=context_dim,
        )

    @classmethod
    def sd_v1(cls) -> "UNetConfig":
        """Stable Diffusion v1.x's UNet (859.5M parameters): 8 heads per level, CLIP ViT-L/14 context of 768."""
        return cls(in_channels=4, out_channels=4, model_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                   attention_levels=(0, 1, 2), mid_attention=True, heads=8, dim_head=None, context_dim=768,
                   norm_groups=32, kernel="sdpa")


class UNet(nn.Module):
    """eps_theta: x [B, C, h, w], t [B], context [B, L, d], context_mask [B, L] | None -> [B, C, h, w] (eps, v or x0).

    h and w must be divisible by 2^(len(channel_mult) - 1).
    """

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        ch = cfg.model_channels
        time_dim = 4 * ch
        self.time_embed = nn.Sequential(nn.Linear(ch, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))

        def res(c_in, c_out):
            return ResBlock(c_in, c_out, time_dim, cfg.dropout, cfg.norm_groups)

        def spatial(c):
            heads, dim_head = cfg.attention_layout(c)
            return SpatialTransformer(c, cfg.context_dim, heads, dim_head, cfg.transformer_depth,
                                      cfg.dropout, cfg.norm_groups, cfg.kernel, cfg.proj_linear)

        # down path: remember each block's output channels for the skip connections
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, ch, 3, padding=1))])
        skip_channels = [ch]
        last_level = len(cfg.channel_mult) - 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [res(ch, cfg.model_channels * mult)]
                ch = cfg.model_channels * mult
                if level in cfg.attention_levels:
                    layers.append(spatial(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != last_level:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)

        middle = [res(ch, ch)] + ([spatial(ch)] if cfg.mid_attention else []) + [res(ch, ch)]
        self.middle_block = TimestepEmbedSequential(*middle)

        # up path: mirror image; every ResBlock consumes one skip (concatenated along channels)
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [res(ch + skip_channels.pop(), cfg.model_channels * mult)]
                ch = cfg.model_channels * mult
                if level in cfg.attention_levels:
                    layers.append(spatial(ch))
                if level != 0 and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            nn.GroupNorm(cfg.norm_groups, ch), nn.SiLU(), nn.Conv2d(ch, cfg.out_channels, 3, padding=1)
        )
        nn.init.zeros_(self.out[-1].weight)  # a fresh UNet predicts eps = 0
        nn.init.zeros_(self.out[-1].bias)
        if cfg.channels_last:
            self.to(memory_format=torch.channels_last)  # the 4-d conv weights; load_state_dict keeps the layout

    def _run(self, block, h, emb, context, context_mask):
        if self.cfg.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(block, h, emb, context, context_mask, use_reentrant=False)
        return block(h, emb, context, context_mask)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        factor = 2 ** (len(self.cfg.channel_mult) - 1)
        if x.ndim != 4 or x.shape[-1] % factor or x.shape[-2] % factor:
            raise ValueError(
                f"UNet input must be [B, C, h, w] with h and w divisible by {factor} "
                f"({len(self.cfg.channel_mult)} levels), got {tuple(x.shape)}."
            )
        if context.ndim != 3 or context.shape[-1] != self.cfg.context_dim:
            raise ValueError(
                f"context must be [B, L, {self.cfg.context_dim}] (the prompt encoder output), "
                f"got {tuple(context.shape)}."
            )
        emb = self.time_embed(timestep_embedding(t, self.cfg.model_channels).to(x.dtype))
        skips = []
        h = x.contiguous(memory_format=torch.channels_last) if self.cfg.channels_last else x
        for block in self.input_blocks:
            h = self._run(block, h, emb, context, context_mask)
            skips.append(h)
        h = self._run(self.middle_block, h, emb, context, context_mask)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)  # skip connection
            h = self._run(block, h, emb, context, context_mask)
        return self.out(h).contiguous()  # the caller's layout, whichever the UNet computes in
