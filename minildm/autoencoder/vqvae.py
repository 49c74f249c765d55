"""VQ-VAE: the autoencoder of latent diffusion (LDM's VQ-regularised "first stage").

Lecture 13, "LDM: Autoencoder": train an encoder-decoder once on raw images, freeze it, and run diffusion on
its latents. The encoder E maps an image x [B, 3, H, W] to continuous latents z = E(x) [B, c, H/f, W/f]
(f = downsampling factor, c = z_channels); a vector quantiser snaps every latent pixel to its nearest
codebook vector (these ids are the "image tokens" of Parti / VQGAN); the decoder D maps the snapped latents
back to pixels. As in LDM's VQ-regularised models, the diffusion model works on the continuous z and the
quantiser sits at the start of the decoder: `decode(z)` snaps z to the codebook first, so whatever the
diffusion model produces is decoded from codebook vectors.

Architecture (small, attention-free like the zoo table's f=4 dagger row):
  Encoder: conv_in -> per level [ResBlock x num_res_blocks, strided-conv Downsample] -> mid ResBlock x 2
           -> GroupNorm, SiLU, conv_out -> z
  Decoder: conv_in -> mid ResBlock x 2 -> per level (reversed) [ResBlock x (num_res_blocks + 1),
           nearest-neighbour Upsample + conv] -> GroupNorm, SiLU, conv_out -> x
The codebook lives in the latent space itself (codebook dim = z_channels), so there is no 1x1
quant_conv: the z that diffusion sees is exactly the z that gets quantised.

Images are float tensors in [-1, 1].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from minildm.modules.blocks import Downsample, ResBlock, Upsample


@dataclass
class VQConfig:
    """Architecture and quantiser settings of a VQVAE (the tiny training recipe is in `tiny()`'s docstring)."""

    in_channels: int = 3
    resolution: int = 32  # image side the preset trains on (the model itself is fully convolutional)
    channels: int = 64  # base width; level i has channels * channel_mult[i]
    channel_mult: tuple = (1, 2, 2)  # one entry per resolution level; f = 2 ** (len - 1)
    num_res_blocks: int = 1  # ResBlocks per encoder level (the decoder has one more, as in LDM)
    norm_groups: int = 8  # GroupNorm groups; every level width must be divisible by it
    z_channels: int = 4  # latent channels c, also the codebook vector dimension
    num_codes: int = 256  # codebook size |Z|
    beta: float = 0.25  # commitment weight
    use_ema: bool = False  # codebook learned by EMA of assigned encoder outputs instead of by gradient
    ema_decay: float = 0.99
    dead_code_threshold: int = 0  # restart a code after this many training calls without use (0 = never)
    kmeans_iters: int = 0  # >0: on the first training batch, initialise the codebook by k-means (this many iters)
    chunk_size: int = 1024  # latent vectors per chunk of the nearest-code search (bounds memory)

    def __post_init__(self):
        self.channel_mult = tuple(self.channel_mult)  # a list after a checkpoint round trip
        widths = [self.channels * m for m in self.channel_mult]
        if not self.channel_mult or any(w % self.norm_groups for w in widths):
            raise ValueError(
                f"every level width {widths} must be divisible by norm_groups={self.norm_groups}; "
                "change channels, channel_mult or norm_groups."
            )

    @property
    def downsample_factor(self) -> int:
        """f: image side / latent side."""
        return 2 ** (len(self.channel_mult) - 1)

    @classmethod
    def tiny(cls) -> "VQConfig":
        """32x32 shapes, f = 4 (8x8x4 latents), 256 codes, 0.23M parameters.

        Training recipe (with VQGANLossConfig.tiny(): L1 + VQ loss, no perceptual or GAN term):
        1200 steps, batch 32 of fresh `sample_batch` shapes, Adam(lr=2e-3, betas=(0.5, 0.9)) with cosine decay
        to 0. Measured (bench/results/recipe_search.md, train_speed.md): held-out PSNR 32-35 dB, 256/256 codes
        in use, every colour, shape and position of 720 fresh renders read back right through D(E(x)).
        """
        return cls(
            resolution=32,
            channels=16,
            channel_mult=(1, 2, 2),
            num_res_blocks=1,
            norm_groups=8,
            z_channels=4,
            num_codes=256,
            use_ema=True,
            ema_decay=0.99,
            dead_code_threshold=20,
            kmeans_iters=10,
        )

    @classmethod
    def f8_8192(cls) -> "VQConfig":
        """The 3090 preset: 256x256 images, f = 8 (32x32x4 latents), 8192 codes, as the Flickr8k student report's LDM.

        Widths follow LDM's VQ-f8 model (ch 128, mult 1,2,2,4, two ResBlocks per level), without its
        attention layer. Not tuned here: a starting point for VQGANLossConfig.f8_8192() on a GPU.
        """
        return cls(
            resolution=256,
            channels=128,
            channel_mult=(1, 2, 2, 4),
            num_res_blocks=2,
            norm_groups=32,
            z_channels=4,
            num_codes=8192,
            use_ema=True,
            ema_decay=0.99,
            dead_code_threshold=100,
            kmeans_iters=10,
        )


# ----------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------
class Encoder(nn.Module):
    """x [B, in_channels, H, W] -> z [B, z_channels, H/f, W/f]."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        widths = [cfg.channels * m for m in cfg.channel_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)
        blocks, ch = [], widths[0]
        for level, width in enumerate(widths):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(ch, width, norm_groups=cfg.norm_groups, zero_init=False))
                ch = width
            if level < len(widths) - 1:
                blocks.append(Downsample(ch))
        self.down = nn.Sequential(*blocks)
        self.mid = nn.Sequential(ResBlock(ch, ch, norm_groups=cfg.norm_groups, zero_init=False),
                                 ResBlock(ch, ch, norm_groups=cfg.norm_groups, zero_init=False))
        self.norm_out = nn.GroupNorm(cfg.norm_groups, ch)
        self.conv_out = nn.Conv2d(ch, cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.down(self.conv_in(x)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """z_q [B, z_channels, h, w] -> x [B, in_channels, h*f, w*f]."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        widths = [cfg.channels * m for m in cfg.channel_mult]
        ch = widths[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, ch, 3, padding=1)
        self.mid = nn.Sequential(ResBlock(ch, ch, norm_groups=cfg.norm_groups, zero_init=False),
                                 ResBlock(ch, ch, norm_groups=cfg.norm_groups, zero_init=False))
        blocks = []
        for level in reversed(range(len(widths))):
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResBlock(ch, widths[level], norm_groups=cfg.norm_groups, zero_init=False))
                ch = widths[level]
            if level > 0:
                blocks.append(Upsample(ch))
        self.up = nn.Sequential(*blocks)
        self.norm_out = nn.GroupNorm(cfg.norm_groups, ch)
        self.conv_out = nn.Conv2d(ch, cfg.in_channels, 3, padding=1)

    def forward(self, z_q: torch.Tensor) -> torch.Tensor:
        h = self.up(self.mid(self.conv_in(z_q)))
        return self.conv_out(F.silu(self.norm_out(h)))


# ----------------------------------------------------------------------------------------------------------
# Vector quantisation
# ----------------------------------------------------------------------------------------------------------
def nearest_code_indices(z_flat: torch.Tensor, codebook: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """k(n) = argmin_k ||z_n - e_k||^2 for z_flat [N, D], codebook [K, D] -> LongTensor [N].

    ||z - e||^2 = ||z||^2 - 2 z.e + ||e||^2, evaluated for `chunk_size` rows of z at a time so the
    distance matrix never exceeds [chunk_size, K] (8192 codes x a 256x256 batch would not fit otherwise).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of rows, got {chunk_size}.")
    with torch.no_grad():
        e_sq = codebook.pow(2).sum(dim=1)  # ||e_k||^2  [K]
        indices = []
        for z in z_flat.split(chunk_size):
            dist = z.pow(2).sum(dim=1, keepdim=True) - 2 * z @ codebook.t() + e_sq  # [chunk, K]
            indices.append(dist.argmin(dim=1))
        return torch.cat(indices)


def codebook_stats(counts: torch.Tensor) -> tuple:
    """Code-usage statistics from counts [K] (how often each code was picked in a batch).

    perplexity = exp(H(p)), H(p) = -sum_k p_k log p_k with p_k = counts_k / sum(counts): the effective
    number of codes in use (K for uniform use, 1 when one code takes everything).
    usage = fraction of codes picked at least once.
    Returns (perplexity, usage) as 0-dim float tensors.
    """
    p = counts.float() / counts.sum().clamp(min=1)
    entropy = -(p * torch.log(p.clamp(min=1e-12))).sum()  # p log p -> 0 as p -> 0
    return entropy.exp(), (counts > 0).float().mean()


class VectorQuantizer(nn.Module):
    """Nearest-codebook quantisation with a straight-through gradient (VQ-VAE, van den Oord et al. 2017).

    forward(z_e [B, D, h, w]) -> (z_q [B, D, h, w], loss 0-dim, info dict):
      k = argmin_k ||z_e - e_k||^2,  z_q = e_k
      straight-through: z_q <- z_e + sg[z_q - z_e]  (forward value z_q, gradient d/dz_q copied to z_e)
      loss = ||sg[z_e] - z_q||^2 + beta ||z_e - sg[z_q]||^2     (squared norms as means over elements)
             codebook term (moves codes)   commitment term (moves the encoder)
      Note: taming-transformers' legacy quantizer computed beta ||sg[z_e] - z_q||^2 + ||z_e - sg[z_q]||^2,
      i.e. beta on the codebook term instead of the commitment term; we follow the paper.
    With use_ema the codebook is not a gradient parameter: the codebook term is dropped and each code
    becomes the running mean of the encoder outputs assigned to it,
      N_k <- decay N_k + (1 - decay) n_k,   m_k <- decay m_k + (1 - decay) sum_{i: k(i)=k} z_i,
      e_k = m_k / N~_k,  N~_k = (N_k + eps) / (sum_j N_j + K eps) * sum_j N_j  (Laplace smoothing, no /0)
    so loss = beta ||z_e - sg[z_q]||^2 only.
    In training mode only: optional k-means initialisation of the codebook on the first batch, EMA
    updates, and dead-code restarts (a code unused for `dead_code_threshold` calls is moved onto a random
    encoder output of the current batch, so it can start winning assignments again).
    info: indices LongTensor [B, h, w], perplexity and usage 0-dim tensors (see `codebook_stats`).
    """

    def __init__(
        self,
        num_codes: int,
        dim: int,
        beta: float = 0.25,
        use_ema: bool = False,
        ema_decay: float = 0.99,
        dead_code_threshold: int = 0,
        kmeans_iters: int = 0,
        chunk_size: int = 1024,
        eps: float = 1e-5,
    ):
        super().__init__()
        self.num_codes, self.dim, self.beta = num_codes, dim, beta
        self.use_ema, self.ema_decay, self.eps = use_ema, ema_decay, eps
        self.dead_code_threshold, self.kmeans_iters, self.chunk_size = dead_code_threshold, kmeans_iters, chunk_size
        codebook = torch.empty(num_codes, dim).uniform_(-1.0 / num_codes, 1.0 / num_codes)
        self.codebook = nn.Parameter(codebook, requires_grad=not use_ema)  # e_k = codebook[k]  [K, D]
        if use_ema:
            self.register_buffer("ema_cluster_size", torch.ones(num_codes))  # N_k
            self.register_buffer("ema_embed_sum", codebook.clone())  # m_k
        self.register_buffer("unused_calls", torch.zeros(num_codes, dtype=torch.long))
        self.register_buffer("initialized", torch.tensor(kmeans_iters == 0))

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Token ids of latents z [B, D, h, w] -> LongTensor [B, h, w]."""
        b, _, h, w = z.shape
        z_flat = rearrange(z, "b d h w -> (b h w) d")
        indices = nearest_code_indices(z_flat, self.codebook, self.chunk_size)
        return rearrange(indices, "(b h w) -> b h w", b=b, h=h, w=w)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Codebook vectors of token ids [B, h, w] -> z_q [B, D, h, w] (rebuild latents from image tokens)."""
        if indices.dtype != torch.long or indices.dim() != 3:
            raise ValueError(
                f"indices must be a LongTensor [B, h, w] of token ids, got {indices.dtype} {tuple(indices.shape)}."
            )
        return rearrange(F.embedding(indices, self.codebook), "b h w d -> b d h w")

    def forward(self, z_e: torch.Tensor) -> tuple:
        if z_e.dim() != 4 or z_e.shape[1] != self.dim:
            raise ValueError(f"z_e must be [B, {self.dim}, h, w], got {tuple(z_e.shape)}.")
        z_flat = rearrange(z_e, "b d h w -> (b h w) d")
        if self.training and not bool(self.initialized):
            self._kmeans_init(z_flat.detach())
        indices = self.nearest(z_e)  # [B, h, w]
        z_q = self.lookup(indices)  # e_k(i), carries the gradient to the codebook
        commitment = F.mse_loss(z_e, z_q.detach())  # ||z_e - sg[z_q]||^2
        if self.use_ema:
            loss = self.beta * commitment  # the codebook term is replaced by the EMA update below
        else:
            codebook_loss = F.mse_loss(z_q, z_e.detach())  # ||sg[z_e] - z_q||^2
            loss = codebook_loss + self.beta * commitment
        z_q_st = z_e + (z_q - z_e).detach()  # straight-through: value z_q, gradient identity to z_e

        counts = torch.bincount(indices.flatten(), minlength=self.num_codes)  # n_k  [K]
        if self.training:
            with torch.no_grad():
                if self.use_ema:
                    self._ema_update(z_flat.detach(), indices.flatten(), counts)
                if self.dead_code_threshold > 0:
                    self._restart_dead_codes(z_flat.detach(), counts)
        perplexity, usage = codebook_stats(counts)
        return z_q_st, loss, {"indices": indices, "perplexity": perplexity, "usage": usage}

    def _kmeans_init(self, z_flat: torch.Tensor) -> None:
        """Lloyd's k-means on one batch of encoder outputs z_flat [N, D], started from random samples."""
        with torch.no_grad():
            centers = z_flat[torch.randint(len(z_flat), (self.num_codes,), device=z_flat.device)]
            for _ in range(self.kmeans_iters):
                assign = nearest_code_indices(z_flat, centers, self.chunk_size)
                sums = torch.zeros_like(centers).index_add_(0, assign, z_flat)
                counts = torch.bincount(assign, minlength=self.num_codes)
                centers = torch.where((counts > 0)[:, None], sums / counts.clamp(min=1)[:, None], centers)
            self.codebook.copy_(centers)
            if self.use_ema:
                self.ema_cluster_size.fill_(1.0)
                self.ema_embed_sum.copy_(centers)
            self.initialized.fill_(True)

    def _ema_update(self, z_flat: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor) -> None:
        d = self.ema_decay
        embed_sum = torch.zeros_like(self.ema_embed_sum).index_add_(0, indices, z_flat)  # sum of z assigned to k
        self.ema_cluster_size.mul_(d).add_(counts.float(), alpha=1 - d)  # N_k <- d N_k + (1 - d) n_k
        self.ema_embed_sum.mul_(d).add_(embed_sum, alpha=1 - d)  # m_k <- d m_k + (1 - d) sum z
        n = self.ema_cluster_size.sum()
        smoothed = (self.ema_cluster_size + self.eps) / (n + self.num_codes * self.eps) * n  # Laplace smoothing
        self.codebook.copy_(self.ema_embed_sum / smoothed[:, None])  # e_k = m_k / N~_k

    def _restart_dead_codes(self, z_flat: torch.Tensor, counts: torch.Tensor) -> None:
        self.unused_calls.add_(1).masked_fill_(counts > 0, 0)
        dead = (self.unused_calls >= self.dead_code_threshold).nonzero().flatten()
        if len(dead) == 0:
            return
        picks = torch.randint(len(z_flat), (len(dead),), device=z_flat.device)
        self.codebook[dead] = z_flat[picks]
        if self.use_ema:
            self.ema_cluster_size[dead] = 1.0
            self.ema_embed_sum[dead] = z_flat[picks]
        self.unused_calls[dead] = 0


# ----------------------------------------------------------------------------------------------------------
# The autoencoder
# ----------------------------------------------------------------------------------------------------------
class VQVAE(nn.Module):
    """Encoder + VectorQuantizer + Decoder, with the latent scale factor used by the diffusion model.

    encode(x [B, 3, H, W]) -> z [B, c, H/f, W/f]       continuous, unscaled (diffusion trains on z * scale_factor)
    quantize(z)            -> (z_q, vq_loss, info)
    decode(z)              -> x                          snaps z to the codebook, then decodes
    decode_indices(ids [B, h, w]) -> x                   images from image tokens
    forward(x)             -> (x_rec, vq_loss, info)
    """

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantizer = VectorQuantizer(
            cfg.num_codes,
            cfg.z_channels,
            beta=cfg.beta,
            use_ema=cfg.use_ema,
            ema_decay=cfg.ema_decay,
            dead_code_threshold=cfg.dead_code_threshold,
            kmeans_iters=cfg.kmeans_iters,
            chunk_size=cfg.chunk_size,
        )
        self.register_buffer("scale_factor", torch.tensor(1.0))

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the decoder's final conv: where VQGAN's adaptive GAN weight compares gradients."""
        return self.decoder.conv_out.weight

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        f = self.cfg.downsample_factor
        if x.dim() != 4 or x.shape[1] != self.cfg.in_channels or x.shape[2] % f or x.shape[3] % f:
            raise ValueError(
                f"x must be images [B, {self.cfg.in_channels}, H, W] in [-1, 1] with H and W divisible by "
                f"f={f}, got shape {tuple(x.shape)}."
            )
        return self.encoder(x)

    def quantize(self, z: torch.Tensor) -> tuple:
        return self.quantizer(z)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents z [B, c, h, w] -> images [B, 3, h*f, w*f] in about [-1, 1].

        z is snapped to its nearest codes with the straight-through trick, so gradients still reach z (for
        losses on decoded samples); no codebook statistics or updates happen here.
        """
        z_q = self.quantizer.lookup(self.quantizer.nearest(z))
        return self.decoder(z + (z_q - z).detach())

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Image tokens [B, h, w] -> images [B, 3, h*f, w*f]."""
        return self.decoder(self.quantizer.lookup(indices))

    def forward(self, x: torch.Tensor) -> tuple:
        z_q, vq_loss, info = self.quantize(self.encode(x))
        return self.decoder(z_q), vq_loss, info

    @torch.no_grad()
    def compute_scale_factor(self, batches: Iterable[torch.Tensor]) -> float:
        """scale_factor = 1 / std(z) over all latents of `batches` (iterable of x [B, 3, H, W]); stored and returned.

        LDM rescales the latents of its KL autoencoders so the diffusion model sees roughly unit variance,
        z_diffusion = z * scale_factor (0.18215 in SD v1); its VQ configs have no factor. Rescaling VQ latents
        too is minildm's own choice: every preset then meets the unit variance the noise schedule assumes.
        """
        total, total_sq, n = 0.0, 0.0, 0
        for x in batches:
            z = self.encode(x).double()
            total, total_sq, n = total + z.sum().item(), total_sq + z.pow(2).sum().item(), n + z.numel()
        if n < 2:
            raise ValueError("compute_scale_factor needs at least one batch of images to measure std(z).")
        var = total_sq / n - (total / n) ** 2  # std(z)^2 = E[z^2] - E[z]^2
        self.scale_factor.fill_(1.0 / max(var, 1e-12) ** 0.5)
        return float(self.scale_factor)
