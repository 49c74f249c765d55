"""The convolutional blocks the UNet and the autoencoder share (the LDM / ADM layout): a residual block with
an optional timestep embedding, and the 2x down- and upsampling between resolution levels."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class ResBlock(nn.Module):
    """h = conv1(SiLU(GN x)) [+ W_t emb];  h = conv2(dropout(SiLU(GN h)));  out = skip(x) + h.

    x [B, C_in, h, w], emb [B, time_dim] -> [B, C_out, h, w]; skip is a 1x1 conv when C_in != C_out.
    time_dim: the UNet's timestep embedding shifts every channel; the autoencoder has none (None).
    zero_init: conv2 starts at zero, so a fresh block is skip(x) (ADM/LDM's UNet; the autoencoder keeps
    PyTorch's default initialisation).
    """

    def __init__(self, in_channels: int, out_channels: int, time_dim: int | None = None, dropout: float = 0.0,
                 norm_groups: int = 32, zero_init: bool = True):
        super().__init__()
        self.norm1 = nn.GroupNorm(norm_groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        if time_dim is not None:
            self.time_proj = nn.Linear(time_dim, out_channels)  # W_t
        self.norm2 = nn.GroupNorm(norm_groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if zero_init:
            nn.init.zeros_(self.conv2.weight)
            nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if emb is not None:
            h = h + self.time_proj(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Downsample(nn.Module):
    """Halve the side with a 3x3 stride-2 conv: [B, C, h, w] -> [B, C, h/2, w/2]."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double the side: nearest-neighbour upsampling, then a 3x3 conv: [B, C, h, w] -> [B, C, 2h, 2w]."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))
