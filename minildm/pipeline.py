"""LatentDiffusion: autoencoder + prompt encoder + UNet + sampler -> images.

    prompts --Tokenizer--> tokens --tau_theta--> context [B, L, d]
    z_T ~ N(0, I) [B, c, h, w] --(DDIM or DDPM, guided eps from the UNet)--> z_0
    image = D(z_0 / scale_factor)      (the decoder quantises z_0 onto the codebook first)

A run directory written by `python train.py` holds `autoencoder.pt` and `ldm.pt`; `LatentDiffusion.load`
reads both (EMA weights by default) and `generate` returns images in [0, 1].
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from minildm.autoencoder.vqvae import VQConfig, VQVAE
from minildm.checkpoint import CheckpointError, load_checkpoint
from minildm.diffusion.ddim import ddim_sample
from minildm.diffusion.ddpm import as_eps_fn, ddpm_sample
from minildm.diffusion.guidance import cfg_model_fn
from minildm.diffusion.schedule import NoiseSchedule
from minildm.modules.unet import UNet, UNetConfig
from minildm.text.encoder import PromptEncoder, TextEncoderConfig
from minildm.text.tokenizer import Tokenizer

SAMPLERS = ("ddim", "ddpm")


def load_autoencoder(run_dir: str | Path, device="cpu") -> VQVAE:
    """The trained first stage of a run (frozen, eval mode), with its latent scale factor."""
    state = load_checkpoint(Path(run_dir) / "autoencoder.pt", "autoencoder")
    model = VQVAE(VQConfig(**state["config"]))
    model.load_state_dict(state["model"])
    return model.to(device).eval().requires_grad_(False)


class LatentDiffusion(nn.Module):
    """The whole text-to-image model; see the module docstring for the data flow."""

    def __init__(self, autoencoder: VQVAE, tokenizer: Tokenizer, text_encoder: PromptEncoder, unet: UNet,
                 schedule: NoiseSchedule, image_size: int, prediction: str = "eps"):
        super().__init__()
        self.autoencoder, self.tokenizer, self.text_encoder, self.unet = autoencoder, tokenizer, text_encoder, unet
        self.schedule, self.image_size, self.prediction = schedule, image_size, prediction

    @classmethod
    def load(cls, run_dir: str | Path, device: str | torch.device = "cpu", use_ema: bool = True) -> "LatentDiffusion":
        run_dir = Path(run_dir)
        if not (run_dir / "ldm.pt").is_file():
            raise CheckpointError(f"no trained model in {run_dir}: run python train.py first (or pass --run).")
        state = load_checkpoint(run_dir / "ldm.pt", "ldm")
        text_encoder = PromptEncoder(TextEncoderConfig(**state["text_config"]))
        unet = UNet(UNetConfig(**state["unet_config"]))
        denoiser = nn.ModuleDict({"text_encoder": text_encoder, "unet": unet})
        denoiser.load_state_dict(state["ema" if use_ema else "model"])
        model = cls(load_autoencoder(run_dir), Tokenizer.from_state(state["tokenizer"]), text_encoder, unet,
                    NoiseSchedule(**state["schedule"]), state["image_size"], state.get("prediction", "eps"))
        return model.to(device).eval().requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def latent_shape(self) -> tuple[int, int, int]:
        f = self.autoencoder.cfg.downsample_factor
        return (self.autoencoder.cfg.z_channels, self.image_size // f, self.image_size // f)

    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """list of B prompts -> (context [B, L, d], mask [B, L])."""
        return self.text_encoder(self.tokenizer.encode(prompts).to(self.device))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents [B, c, h, w] -> images [B, 3, H, W] in [0, 1]."""
        x = self.autoencoder.decode(z / self.autoencoder.scale_factor)
        return ((x + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def generate(self, prompts: list[str] | str, steps: int = 50, guidance_scale: float = 3.0, sampler: str = "ddim",
                 eta: float = 0.0, seed: int = 0, progress: bool = False, return_trajectory: bool = False,
                 return_attention: bool = False, extra_tokens: tuple[torch.Tensor, torch.Tensor] | None = None):
        """prompts -> images [N, 3, H, W] in [0, 1]. Same seed and prompts -> same images.

        guidance_scale: the CFG scale s of eps_u + s (eps_c - eps_u) (1 = plain conditional model, 0 = unconditional).
        sampler "ddim" uses `steps` steps (eta = 0 deterministic, eta = 1 DDPM-like); "ddpm" always walks all T.
        return_trajectory adds the decoded x_t along the way; return_attention adds the cross-attention maps
        of the last step, averaged over heads and layers at the finest attended resolution, [N, L, h', w'].
        extra_tokens: optional (cond [N or 1, n, d], uncond [1, n, d]) appended after the text context of the
        conditional and the unconditional half (IP-Adapter's image tokens: the UNet's decoupled cross-attention
        splits them off by count; the text mask still covers the text only).
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        T = self.schedule.num_timesteps
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler '{sampler}': use one of {', '.join(SAMPLERS)}.")
        if not 1 <= steps <= T:
            raise ValueError(f"steps must be between 1 and T = {T}, got {steps}.")
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0 (1 = no guidance, 3 is typical), got {guidance_scale}.")
        if not 0 <= eta <= 1:
            raise ValueError(f"eta must lie in [0, 1] (0 = deterministic DDIM, 1 = DDPM-like), got {eta}.")
        if not prompts:
            raise ValueError("give at least one prompt (the empty prompt \"\" samples unconditionally).")

        generator = torch.Generator(device="cpu").manual_seed(seed)
        x_T = torch.randn((len(prompts), *self.latent_shape()), generator=generator).to(self.device)
        context_c, mask_c = self.encode_prompts(prompts)
        context_u, mask_u = self.encode_prompts([""])
        if extra_tokens is not None:  # both halves have max_len text tokens, so cfg_model_fn pads nothing after them
            extra_c, extra_u = extra_tokens
            if extra_c.shape[0] not in (1, len(prompts)) or extra_u.shape[0] != 1:
                raise ValueError(f"extra_tokens must be (cond [1 or {len(prompts)}, n, d], uncond [1, n, d]), "
                                 f"got {tuple(extra_c.shape)} and {tuple(extra_u.shape)}.")
            context_c = torch.cat([context_c, extra_c.to(context_c).expand(len(prompts), -1, -1)], dim=1)
            context_u = torch.cat([context_u, extra_u.to(context_u)], dim=1)
        model_fn = cfg_model_fn(self.unet, context_c, mask_c, context_u, mask_u, guidance_scale)
        eps_fn = as_eps_fn(model_fn, self.schedule, self.prediction)

        cross = [m for name, m in self.unet.named_modules() if name.endswith("attn2")]
        for m in cross:
            m.store_attention = return_attention
        try:
            if sampler == "ddim":
                out = ddim_sample(eps_fn, self.schedule, x_T, steps, eta, generator=generator, progress=progress,
                                  return_trajectory=return_trajectory)
            else:
                out = ddpm_sample(eps_fn, self.schedule, x_T, generator=generator, progress=progress,
                                  return_trajectory=return_trajectory)
        finally:
            for m in cross:
                m.store_attention = False
        z0, trajectory = out if return_trajectory else (out, None)
        images = self.decode(z0)
        extras = {}
        if return_trajectory:
            extras["trajectory"] = [self.decode(z) for z in trajectory]
        if return_attention:
            extras["attention"] = self._attention_maps(cross, len(prompts), guidance_scale)
        return (images, extras) if extras else images

    @staticmethod
    def _attention_maps(cross: list[nn.Module], n: int, guidance_scale: float) -> torch.Tensor:
        """Mean cross-attention probabilities per prompt token at the finest attended resolution: [n, L, h, w]."""
        from einops import rearrange

        maps = [m.last_attention for m in cross if getattr(m, "last_attention", None) is not None]
        finest = max(a.shape[2] for a in maps)
        maps = [a[-n:] for a in maps if a.shape[2] == finest]  # the conditional half of the CFG batch
        probs = torch.stack(maps).mean(dim=(0, 2))  # [n, N = h*w, L], averaged over layers and heads
        side = int(round(finest ** 0.5))
        return rearrange(probs, "b (h w) l -> b l h w", h=side, w=side)
