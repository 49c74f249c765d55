"""LatentDiffusion: autoencoder + prompt encoder + UNet + sampler -> images.

    prompts --Tokenizer--> tokens --tau_theta--> context [B, L, d]
    z_T ~ N(0, I) [B, c, h, w] --(DDIM or DDPM, guided eps from the UNet)--> z_0
    image = D(z_0 / scale_factor)      (a VQ-VAE's decoder quantises z_0 onto the codebook first; a KL one
                                        decodes it as it is)

A run directory written by `python train.py` holds `autoencoder.pt` and `ldm.pt`; `LatentDiffusion.load`
reads both (EMA weights by default) and `generate` returns images in [0, 1].
`LatentDiffusion.from_stable_diffusion` builds the same class from Stable Diffusion v1.x weights (a KL
autoencoder, CLIP's text transformer and SD's UNet); `generate(init_images=..., strength=...)` is SDEdit's
image-to-image (Meng et al. 2022, arXiv:2108.01073): encode, noise to the strength's timestep, denoise.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn as nn
from einops import rearrange

from minildm.autoencoder.kl import AutoencoderKL, DiagonalGaussian, KLConfig
from minildm.autoencoder.vqvae import VQConfig, VQVAE
from minildm.checkpoint import CheckpointError, fits, load_checkpoint
from minildm.diffusion.ddim import ddim_sample, ddim_timesteps
from minildm.diffusion.ddpm import as_eps_fn, ddpm_sample, gaussian_noise, seeded_generators
from minildm.diffusion.guidance import cfg_model_fn
from minildm.diffusion.schedule import NoiseSchedule
from minildm.modules.attention_maps import AttentionMaps
from minildm.modules.unet import UNet, UNetConfig
from minildm.text.encoder import PromptEncoder, TextEncoderConfig
from minildm.text.tokenizer import Tokenizer

SAMPLERS = ("ddim", "ddpm")


def load_autoencoder(run_dir: str | Path, device="cpu") -> VQVAE | AutoencoderKL:
    """The trained first stage of a run (frozen, eval mode), with its latent scale factor: the VQ-VAE or the KL
    autoencoder, whichever the file's "first_stage" entry names (files without one hold a VQ-VAE). `.fingerprint`
    is the checkpoint's (what a diffusion model trained on these latents records)."""
    path = Path(run_dir) / "autoencoder.pt"
    state = load_checkpoint(path, "autoencoder")
    first_stage = state.get("first_stage", "vq")
    if first_stage not in ("vq", "kl"):
        raise CheckpointError(f"{path} holds a first stage of type '{first_stage}'; this minildm reads 'vq' and 'kl'.")
    with fits(state):
        if first_stage == "kl":
            model = AutoencoderKL(KLConfig(**{**state["config"], "scale_factor": float(state["scale_factor"])}))
        else:
            model = VQVAE(VQConfig(**state["config"]))
        model.load_state_dict(state["model"])
    model.fingerprint = state.get("fingerprint")
    return model.to(device).eval().requires_grad_(False)


class LatentDiffusion(nn.Module):
    """The whole text-to-image model; see the module docstring for the data flow."""

    def __init__(self, autoencoder: VQVAE | AutoencoderKL, tokenizer: Tokenizer, text_encoder: PromptEncoder,
                 unet: UNet, schedule: NoiseSchedule, image_size: int, prediction: str = "eps"):
        super().__init__()
        self.autoencoder, self.tokenizer, self.text_encoder, self.unet = autoencoder, tokenizer, text_encoder, unet
        self.schedule, self.image_size, self.prediction = schedule, image_size, prediction
        # DDIM conventions: minildm's models use "trailing" and land on clean data (t_prev = -1);
        # SD v1 uses "leading" + offset 1 and lands on abar_0 (t_prev = 0), see from_stable_diffusion
        self.ddim = {"spacing": "trailing", "offset": 1, "final_timestep": -1}
        self.fingerprint: str | None = None  # ldm.pt's, set by load: what adapters trained on this model record

    @classmethod
    def from_stable_diffusion(cls, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                              tokenizer=None) -> "LatentDiffusion":
        """Stable Diffusion v1.x (a .safetensors / .ckpt file or a diffusers folder) on minildm's modules.

        tokenizer: a callable (list[str], max_length=77) -> LongTensor [B, 77], needed when no vocab.json /
        merges.txt sit next to a single file. Raises SDLoadError with one sentence for anything else.
        """
        from minildm.stable_diffusion import load_components

        parts = load_components(path, tokenizer)
        sched = parts["scheduler"]
        schedule = NoiseSchedule(sched["num_train_timesteps"], "scaled_linear", sched["beta_start"], sched["beta_end"])
        model = cls(parts["autoencoder"], parts["tokenizer"], parts["text_encoder"], parts["unet"], schedule,
                    image_size=512, prediction="eps")
        model.ddim = {"spacing": sched["timestep_spacing"], "offset": sched["steps_offset"],
                      "final_timestep": -1 if sched["set_alpha_to_one"] else 0}
        for part in (model.autoencoder, model.text_encoder, model.unet):  # not the schedule: its float64 tables stay
            part.to(device=device, dtype=dtype)
        model.schedule.to(device)
        return model.eval().requires_grad_(False)

    @classmethod
    def load(cls, run_dir: str | Path, device: str | torch.device = "cpu", use_ema: bool = True) -> "LatentDiffusion":
        run_dir = Path(run_dir)
        if not (run_dir / "ldm.pt").is_file():
            raise CheckpointError(f"no trained model in {run_dir}: run python train.py first (or pass --run).")
        state = load_checkpoint(run_dir / "ldm.pt", "ldm")
        autoencoder = load_autoencoder(run_dir)
        if state.get("autoencoder_fingerprint") not in (None, autoencoder.fingerprint):
            raise CheckpointError(f"{run_dir / 'ldm.pt'} was trained on another autoencoder than "
                                  f"{run_dir / 'autoencoder.pt'} (retrained or resumed since, or copied from another "
                                  "run): put back the autoencoder.pt of its run, or train the ldm stage again.")
        with fits(state):
            text_encoder = PromptEncoder(TextEncoderConfig(**state["text_config"]))
            unet = UNet(UNetConfig(**state["unet_config"]))
            denoiser = nn.ModuleDict({"text_encoder": text_encoder, "unet": unet})
            denoiser.load_state_dict(state["ema" if use_ema else "model"])
            model = cls(autoencoder, Tokenizer.from_state(state["tokenizer"]), text_encoder, unet,
                        NoiseSchedule(**state["schedule"]), state["image_size"], state.get("prediction", "eps"))
        model.fingerprint = state.get("fingerprint")  # what an adapter trained on this model records
        return model.to(device).eval().requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def size_multiple(self) -> int:
        """Image heights and widths must be multiples of this: the autoencoder's f times the UNet's downsampling
        (64 for Stable Diffusion v1: f = 8, three halvings)."""
        return self.autoencoder.cfg.downsample_factor * 2 ** (len(self.unet.cfg.channel_mult) - 1)

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        f = self.autoencoder.cfg.downsample_factor
        height, width = height or self.image_size, width or self.image_size
        if height % self.size_multiple or width % self.size_multiple:
            raise ValueError(f"height and width must be multiples of {self.size_multiple} (autoencoder f = {f} "
                             f"times the UNet's downsampling), got {height}x{width}.")
        return (self.autoencoder.cfg.z_channels, height // f, width // f)

    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """list of B prompts -> (context [B, L, d], mask [B, L] or None = attend to every position)."""
        return self.text_encoder(self.tokenizer.encode(prompts).to(self.device))

    def encode_images(self, images: torch.Tensor,
                      generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] -> scaled latents z_0 * scale_factor (a posterior sample for KL, its
        noise from `generator`, or one generator per image: see ddpm.gaussian_noise)."""
        z = self.autoencoder.encode(images.to(self.device, self.dtype) * 2 - 1)
        z = z.mean + z.std * gaussian_noise(z.mean, generator) if isinstance(z, DiagonalGaussian) else z
        return z * self.autoencoder.scale_factor

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents [B, c, h, w] -> images [B, 3, H, W] in [0, 1]."""
        x = self.autoencoder.decode(z / self.autoencoder.scale_factor)
        return ((x + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def generate(self, prompts: list[str] | str, steps: int = 50, guidance_scale: float = 3.0, sampler: str = "ddim",
                 eta: float = 0.0, seed: int | list[int] = 0, progress: bool = False, return_trajectory: bool = False,
                 return_attention: bool = False, extra_tokens: tuple[torch.Tensor, torch.Tensor] | None = None,
                 height: int | None = None, width: int | None = None, negative_prompts: list[str] | str | None = None,
                 latents: torch.Tensor | None = None, init_images: torch.Tensor | None = None, strength: float = 0.8):
        """prompts -> images [N, 3, H, W] in [0, 1]. Same seed and prompt -> same image.

        seed: image i is drawn from its own generator, seeded seed + i (or seed[i] for a list of N seeds), so
        an image depends on its prompt and its seed only, never on the other images of the batch: image i
        alone, generate([prompts[i]], seed=seed + i), is the same picture. Seeds lie in [0, ddpm.MAX_SEED = 2**32 - 1].

        guidance_scale: the CFG scale s of eps_u + s (eps_c - eps_u) (1 = plain conditional model, 0 = unconditional).
        sampler "ddim" uses `steps` steps (eta = 0 deterministic, eta = 1 DDPM-like); "ddpm" always walks all T.
        return_trajectory adds the decoded x_t along the way; return_attention adds the cross-attention maps
        of the last step, averaged over heads and layers at the finest attended resolution, [N, L, h', w']
        (recorded by attention_maps.AttentionMaps; they are the prompts' maps, so guidance_scale must not be 0).
        extra_tokens: optional (cond [N or 1, n, d], uncond [1, n, d]) appended after the text context of the
        conditional and the unconditional half (IP-Adapter's image tokens: the UNet's decoupled cross-attention
        splits them off by count; the text mask still covers the text only).
        height, width: image size (default image_size); negative_prompts: the unconditional half's text, one
        for all or one per prompt (default ""); latents: the starting noise x_T [N, c, height/f, width/f].
        init_images [N, 3, H, W] in [0, 1], H and W multiples of `size_multiple` (they set height and width):
        image-to-image (DDIM only). z_0 = E(x) * scale_factor, then
        x_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) n at the (steps - int(steps * strength))-th DDIM timestep
        (Property 1), and DDIM runs the remaining int(steps * strength) steps: strength 1 ignores the image.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        T = self.schedule.num_timesteps
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler '{sampler}': use one of {', '.join(SAMPLERS)}.")
        if not 1 <= steps <= T:
            raise ValueError(f"steps must be between 1 and T = {T}, got {steps}.")
        if not math.isfinite(guidance_scale) or guidance_scale < 0:
            raise ValueError(f"guidance_scale must be a finite number >= 0 (1 = no guidance, 3 is typical), got "
                             f"{guidance_scale}.")
        if not 0 <= eta <= 1:
            raise ValueError(f"eta must lie in [0, 1] (0 = deterministic DDIM, 1 = DDPM-like), got {eta}.")
        if not prompts:
            raise ValueError("give at least one prompt (the empty prompt \"\" samples unconditionally).")
        if return_attention and guidance_scale == 0:
            raise ValueError("return_attention needs guidance_scale > 0: at 0 the UNet runs only the negative prompt, "
                             "so there are no maps of the prompts to return.")

        negative = [negative_prompts] if isinstance(negative_prompts, str) else list(negative_prompts or [""])
        if len(negative) not in (1, len(prompts)):
            raise ValueError(f"give one negative prompt or one per prompt ({len(prompts)}), got {len(negative)}.")

        generator = seeded_generators(seed, len(prompts))  # one per image
        if init_images is not None:  # the images set the size (height, width may repeat it)
            if init_images.ndim != 4 or init_images.shape[0] != len(prompts) or init_images.shape[1] != 3:
                raise ValueError(f"init_images must be [{len(prompts)}, 3, H, W] in [0, 1] (one per prompt), "
                                 f"got {tuple(init_images.shape)}.")
            size = tuple(init_images.shape[2:])
            if (height or size[0], width or size[1]) != size:
                raise ValueError(f"init_images are {size[0]}x{size[1]} but height x width asks for {height}x{width}: "
                                 "resize the images (data/images.read_image with crop=False) or leave height and "
                                 "width out.")
            height, width = size
        shape = (len(prompts), *self.latent_shape(height, width))
        skip = 0
        if init_images is not None:  # SDEdit: start from the noised latents of the given images
            if sampler != "ddim" or not 0 < strength <= 1 or int(steps * strength) < 1:
                raise ValueError(f"image-to-image needs sampler ddim and 0 < strength <= 1 with int(steps * strength) "
                                 f">= 1, got {sampler}, strength {strength}, steps {steps}.")
            z0 = self.encode_images(init_images, generator)
            skip = steps - int(steps * strength)
            t_start = int(ddim_timesteps(T, steps, self.ddim["spacing"], self.ddim["offset"])[skip])
            noise = gaussian_noise(torch.empty(z0.shape), generator).to(self.device, self.dtype)
            x_T = self.schedule.q_sample(z0, t_start, noise).to(self.dtype)  # x_t = sqrt(abar) z_0 + sqrt(1 - abar) n
        elif latents is not None:
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents must be x_T of shape {shape}, got {tuple(latents.shape)}.")
            x_T = latents.to(self.device, self.dtype)
        else:
            x_T = gaussian_noise(torch.empty(shape), generator).to(self.device, self.dtype)
        context_c, mask_c = self.encode_prompts(prompts)
        context_u, mask_u = self.encode_prompts(negative)
        if extra_tokens is not None:  # both halves have max_len text tokens, so cfg_model_fn pads nothing after them
            extra_c, extra_u = extra_tokens
            if extra_c.shape[0] not in (1, len(prompts)) or extra_u.shape[0] != 1:
                raise ValueError(f"extra_tokens must be (cond [1 or {len(prompts)}, n, d], uncond [1, n, d]), "
                                 f"got {tuple(extra_c.shape)} and {tuple(extra_u.shape)}.")
            context_c = torch.cat([context_c, extra_c.to(context_c).expand(len(prompts), -1, -1)], dim=1)
            context_u = torch.cat([context_u, extra_u.to(context_u).expand(context_u.shape[0], -1, -1)], dim=1)
        model_fn = cfg_model_fn(self.unet, context_c, mask_c, context_u, mask_u, guidance_scale)
        eps_fn = as_eps_fn(model_fn, self.schedule, self.prediction)

        # return_attention: record every cross-attention layer's maps, keeping each layer's latest (the last step)
        maps = AttentionMaps(self.unet, keep_last=True) if return_attention else nullcontext()
        with maps:
            if sampler == "ddim":
                out = ddim_sample(eps_fn, self.schedule, x_T, steps, eta, generator=generator, progress=progress,
                                  return_trajectory=return_trajectory, skip_steps=skip, **self.ddim)
            else:
                out = ddpm_sample(eps_fn, self.schedule, x_T, generator=generator, progress=progress,
                                  return_trajectory=return_trajectory)
        z0, trajectory = out if return_trajectory else (out, None)
        images = self.decode(z0)
        extras = {}
        if return_trajectory:
            extras["trajectory"] = [self.decode(z) for z in trajectory]
        if return_attention:
            extras["attention"] = self._finest_maps(maps, len(prompts))
        return (images, extras) if extras else images

    @staticmethod
    def _finest_maps(maps: AttentionMaps, n: int) -> torch.Tensor:
        """Mean cross-attention probabilities per prompt token at the finest attended resolution, [n, L, h, w],
        from the last step's records P [B, H, h*w, L] of every layer: the mean over layers and heads at once."""
        finest = max(probs.shape[2] for _, probs in maps.records)
        probs = [p[-n:] for _, p in maps.records if p.shape[2] == finest]  # the conditional half of the CFG batch
        mean = torch.stack(probs).mean(dim=(0, 2))  # [n, N = h*w, L], averaged over layers and heads
        side = int(round(finest ** 0.5))
        return rearrange(mean, "b (h w) l -> b l h w", h=side, w=side)
