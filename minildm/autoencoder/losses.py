"""VQGAN training losses for the autoencoder: reconstruction + perceptual + PatchGAN hinge loss.

LDM's autoencoder is a VQGAN (Esser et al. 2021): a VQ-VAE trained not only to reproduce pixels (L1) but
to look right, with a perceptual loss (distances between deep features) and an adversarial loss from a
patch discriminator. The generator (encoder + quantiser + decoder) minimises

  L_G = l1 ||x - x_rec||_1 + p d_perc(x, x_rec) + codebook_weight L_VQ + lambda_adapt disc_weight L_GAN
  lambda_adapt = ||grad_{W_last} L_rec|| / (||grad_{W_last} L_GAN|| + 1e-4)     (W_last: decoder's last layer)

and the discriminator minimises the hinge loss. The GAN terms switch on at step `disc_start`: a
discriminator that starts on blurry early reconstructions wins too easily and its gradients are noise.

The KL-regularised autoencoder (kl.py) trains with the same terms, its regulariser in place of L_VQ. LDM's
loss (Rombach et al. 2022, arXiv:2112.10752, sec. 3.1 and appendix G: "a low-weighted KL term"; the weight
w_kl = 1e-6 and the form below are from the CompVis code's LPIPSWithDiscriminator and kl-f8 config) sums
the reconstruction over the N = 3HW pixel values of each image and averages over the batch:

  L = 1/B sum_b [ sum_pixels (|x - x_rec| + p d_perc) / e^s + N s ]  +  w_kl 1/B sum_b KL_b  +  lambda_adapt w_d L_GAN
  KL_b = KL(q(z|x_b) || N(0, I)) = 1/2 sum_(c,h,w) (mu^2 + sigma^2 - 1 - log sigma^2)

Divided by N (Adam ignores a constant factor; lambda_adapt rebalances the GAN term whatever the scale), with
the learned scalar log-variance s left at its initial 0, this is the per-element form the VQ path uses:

  L / N = l1 mean|x - x_rec| + p d_perc + (w_kl / N) mean_b KL_b + lambda_adapt w_d L_GAN

so kl_weight 1e-6 means LDM's balance at any image size (1e-6 on a per-pixel mean would be N times stronger).

Perceptual loss without downloads: LPIPS compares features of an ImageNet-trained VGG16. We cannot download
weights, so by default the feature network is the VGG16 layer layout with fixed, seeded random weights.
This is a documented compromise. Random convolutional features already measure multi-scale structure
(edges, blobs, colour layout) rather than single pixels: untrained networks with random weights are a
baseline in the LPIPS paper (Zhang et al. 2018), where they land around the classic low-level metrics
while trained features do clearly better, and random conv features are known to be enough for texture
synthesis (He et al. 2016; Ustyuzhaninov et al. 2017). So: a decent, cheap structural metric, not LPIPS.
A user who has torchvision's VGG16 weights can pass `vgg16_path` for real VGG16 features (LPIPS without
its learned per-channel weights).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

# torchvision's VGG16 `features`: numbers are 3x3 conv widths (each followed by ReLU), "M" is a 2x2 max-pool.
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
VGG16_TAPS = (3, 8, 15, 22, 29)  # indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in `features`
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PerceptualLoss(nn.Module):
    """LPIPS-like distance with a frozen VGG16-layout feature network (seeded random or user-loaded weights).

    d(x, y) = sum_l mean_{h,w} || f^_l(x) - f^_l(y) ||_2^2,  f^_l = f_l / ||f_l||_2 over channels,
    taken at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (LPIPS without its learned per-channel weights).
    forward(x, y [B, 3, H, W] in [-1, 1]) -> 0-dim tensor, the batch mean of d.

    width scales every conv's channel count (1.0 = real VGG16; small widths make a cheap CPU metric).
    seed fixes the random weights, so every construction gives the same network.
    vgg16_path: a torchvision-format VGG16 state dict (only `features.*` is used); needs width = 1.0.
    """

    def __init__(self, width: float = 1.0, seed: int = 0, vgg16_path: Optional[str] = None):
        super().__init__()
        if vgg16_path is not None and width != 1.0:
            raise ValueError(f"a VGG16 state dict needs width=1.0 (the real layer sizes), got width={width}.")
        layers, in_ch = [], 3
        for v in VGG16_LAYOUT:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                out_ch = max(1, round(v * width))
                layers += [nn.Conv2d(in_ch, out_ch, 3, padding=1), nn.ReLU()]
                in_ch = out_ch
        self.features = nn.Sequential(*layers)  # same indices as torchvision's vgg16().features[:30]
        if vgg16_path is None:
            self._random_init(seed)
        else:
            self._load_vgg16(vgg16_path)
        self.requires_grad_(False)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def _random_init(self, seed: int) -> None:
        """He-normal weights w ~ N(0, 2 / fan_in), zero biases, from a private generator (global RNG untouched)."""
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in self.features:
                if isinstance(layer, nn.Conv2d):
                    fan_in = layer.weight[0].numel()
                    layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * (2.0 / fan_in) ** 0.5)
                    layer.bias.zero_()

    def _load_vgg16(self, path: str) -> None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            features = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
            self.features.load_state_dict(features)
        except (OSError, RuntimeError, AttributeError, KeyError) as error:
            raise ValueError(
                f"could not load VGG16 weights from {path!r} ({type(error).__name__}): pass a torchvision VGG16 "
                "state dict saved with torch.save(vgg16.state_dict(), path)."
            ) from error

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(
                f"x and y must be images [B, 3, H, W] of the same shape, got {tuple(x.shape)} and {tuple(y.shape)}."
            )
        h_x = ((x + 1) / 2 - self.mean) / self.std  # [-1, 1] -> ImageNet-normalised input
        h_y = ((y + 1) / 2 - self.mean) / self.std
        dist = x.new_zeros(())
        for index, layer in enumerate(self.features):
            h_x, h_y = layer(h_x), layer(h_y)
            if index in VGG16_TAPS:
                f_x = h_x / (h_x.pow(2).sum(dim=1, keepdim=True) + 1e-10).sqrt()  # f^ = f / ||f|| over channels
                f_y = h_y / (h_y.pow(2).sum(dim=1, keepdim=True) + 1e-10).sqrt()
                dist = dist + (f_x - f_y).pow(2).sum(dim=1).mean()  # mean over batch and (h, w)
        return dist


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017): a stack of strided 4x4 convs whose output is a map of real/fake logits,
    one per overlapping image patch, so the discriminator judges local texture rather than whole images.

    x [B, 3, H, W] -> logits [B, 1, H', W'] (H' = H / 2^num_layers - 2, e.g. 30x30 for 256 and 3 layers).
    Layers: conv(s2) + LeakyReLU(0.2); (num_layers - 1) x [conv(s2) + norm + LeakyReLU]; conv(s1) + norm +
    LeakyReLU; conv(s1) -> 1 channel. Norm is GroupNorm(1, C) (per-sample, no batch statistics), so real and
    fake batches can be scored in separate calls; taming uses BatchNorm here.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, num_layers: int = 3):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}.")
        layers = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        ch = channels
        for n in range(1, num_layers + 1):
            out_ch = channels * min(2**n, 8)
            stride = 2 if n < num_layers else 1
            layers += [
                nn.Conv2d(ch, out_ch, 4, stride=stride, padding=1, bias=False),
                nn.GroupNorm(1, out_ch),
                nn.LeakyReLU(0.2),
            ]
            ch = out_ch
        layers.append(nn.Conv2d(ch, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*layers)
        for module in self.modules():  # DCGAN-style init: conv weights ~ N(0, 0.02)
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """L_D = E[max(0, 1 - D(x))] + E[max(0, 1 + D(x_rec))]  (taming halves this sum; only a scale)."""
    return F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean()


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """L_GAN = -E[D(x_rec)]: the generator raises the discriminator's score of its reconstructions."""
    return -logits_fake.mean()


def adaptive_weight(
    rec_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor, max_weight: float = 1e4
) -> torch.Tensor:
    """lambda = ||grad_{W_last} L_rec|| / (||grad_{W_last} L_GAN|| + 1e-4), clamped to [0, max_weight], detached.

    Balances the GAN gradient against the reconstruction gradient at the decoder's last layer W_last, so
    neither term drowns the other whatever their raw scales. Both losses must still have their graphs.
    """
    grad_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    grad_gan = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    return (grad_rec.norm() / (grad_gan.norm() + 1e-4)).clamp(0.0, max_weight).detach()


@dataclass
class VQGANLossConfig:
    l1_weight: float = 1.0
    perceptual_weight: float = 1.0
    perceptual_width: float = 1.0  # channel scale of the VGG16-layout feature network (1.0 = real VGG16)
    perceptual_seed: int = 0
    vgg16_path: Optional[str] = None  # optional torchvision VGG16 state dict for a real perceptual metric
    codebook_weight: float = 1.0
    kl_weight: float = 1e-6  # KL autoencoder only: w_kl on the KL per image, against the L1 summed over the image
    disc_weight: float = 0.5  # multiplies the adaptive weight
    disc_start: int = 10_000  # generator step at which the GAN terms switch on
    disc_channels: int = 64
    disc_layers: int = 3

    @classmethod
    def tiny(cls) -> "VQGANLossConfig":
        """Tiny preset (32x32 shapes on a CPU): L1 + VQ loss only, GAN off (disc_weight = 0). Flat-coloured
        shapes need neither texture nor sharpening, the PSNR target is pixel-exact, and on a CPU every extra
        network costs steps. To try the GAN, set disc_weight (e.g. 0.5) and a disc_start inside the run."""
        return cls(perceptual_weight=0.0, perceptual_width=0.125, disc_weight=0.0, disc_channels=16, disc_layers=2)

    @classmethod
    def f8_8192(cls) -> "VQGANLossConfig":
        """3090 preset (256x256): L1 + perceptual (full-width VGG16 layout; pass vgg16_path for real VGG16
        features) + GAN from step 30k, about half of the seed project's 60 Flickr8k epochs. Untuned."""
        return cls(
            perceptual_weight=1.0,
            perceptual_width=1.0,
            disc_weight=0.75,
            disc_start=30_000,
            disc_channels=64,
            disc_layers=3,
        )


class VQGANLoss(nn.Module):
    """The VQGAN objective split into the generator step and the discriminator step.

    generator_loss(x, x_rec, reg, step, last_layer, regularizer) -> (L_G, logs)   (backward into the autoencoder)
        reg: the VQ loss (regularizer "vq") or the batch mean of KL(q(z|x) || N(0, I)) per image ("kl")
    discriminator_loss(x, x_rec, step) -> (L_D, logs)                     (backward into self.discriminator)
    Before `disc_start` the GAN terms have weight 0 (check `disc_active(step)` to skip the discriminator step).
    From `disc_start` on, generator_loss needs the graph of x_rec (the adaptive weight differentiates through
    last_layer), so call it inside the training step, not under torch.no_grad(). logs are dicts of python floats.
    """

    def __init__(self, cfg: VQGANLossConfig):
        super().__init__()
        self.cfg = cfg
        self.perceptual = PerceptualLoss(cfg.perceptual_width, cfg.perceptual_seed, cfg.vgg16_path)
        self.discriminator = PatchDiscriminator(3, cfg.disc_channels, cfg.disc_layers)

    def disc_active(self, step: int) -> bool:
        return step >= self.cfg.disc_start and self.cfg.disc_weight > 0

    def generator_loss(
        self, x: torch.Tensor, x_rec: torch.Tensor, reg: torch.Tensor, step: int, last_layer: torch.Tensor,
        regularizer: str = "vq",
    ) -> tuple:
        cfg = self.cfg
        l1 = (x - x_rec).abs().mean()  # ||x - x_rec||_1 (per element)
        perceptual = self.perceptual(x, x_rec) if cfg.perceptual_weight > 0 else x.new_zeros(())
        rec_loss = cfg.l1_weight * l1 + cfg.perceptual_weight * perceptual
        if regularizer == "kl":  # (w_kl / N) mean_b KL_b, N = 3HW values per image (module docstring)
            loss = rec_loss + cfg.kl_weight / x[0].numel() * reg
        else:
            loss = rec_loss + cfg.codebook_weight * reg
        logs = {"l1": l1.item(), "perceptual": perceptual.item(), regularizer: reg.item()}
        if self.disc_active(step):
            gan_loss = hinge_g_loss(self.discriminator(x_rec))
            d_weight = cfg.disc_weight * adaptive_weight(rec_loss, gan_loss, last_layer)  # disc_weight * lambda_adapt
            loss = loss + d_weight * gan_loss
            logs.update(gan=gan_loss.item(), d_weight=d_weight.item())
        logs["loss"] = loss.item()
        return loss, logs

    def discriminator_loss(self, x: torch.Tensor, x_rec: torch.Tensor, step: int) -> tuple:
        logits_real = self.discriminator(x.detach())
        logits_fake = self.discriminator(x_rec.detach())
        factor = 1.0 if self.disc_active(step) else 0.0  # GAN off before disc_start
        loss = factor * hinge_d_loss(logits_real, logits_fake)
        logs = {
            "d_loss": loss.item(),
            "logits_real": logits_real.mean().item(),
            "logits_fake": logits_fake.mean().item(),
        }
        return loss, logs
