"""Stage "ip-adapter": teach a frozen text-to-image run to follow image prompts (Ye et al. 2023, arXiv:2308.06721).

Everything of the base run stays frozen (autoencoder, prompt encoder tau_theta, UNet eps_theta) and so does
the CLIP that reads the image prompt. Only the image projection W_p (+ LayerNorm) and the new W'_k, W'_v of
every cross-attention layer train (adapters/ip_adapter.py has the decoupled attention itself):

    e   = CLIP_img(x)                        the image prompt is the training image itself (as in the paper)
    c_i = LayerNorm(W_p e)   [B, 4, d]       e = 0 when the image is dropped
    c_t = tau_theta(y)                       y = "" when the text is dropped
    drop text only, image only, both: p = 0.05 each (classifier-free guidance over both conditions)
    partial captions: y stays the full caption with p = 0.1, or is cut to "a red circle", "on the left" or ""
    with p = 0.1, 0.5, 0.3 (`caption_mix`); with "on the left" the image prompt is another render of the same
    colour and shape, at any position
    loss = || eps - eps_theta(z_t, t, cat[c_t, c_i]) ||^2,     z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps

The file ip_adapter.pt holds only W_p, the LayerNorm and W'_k, W'_v (a few percent of the UNet: the paper's
22M against SD's ~860M), plus the adapter config and a fingerprint of the CLIP it was trained with.

Partial captions are our addition. With the full caption the text alone already says everything about a
shapes image, so the image branch gets a gradient only from the 5% + 5% of samples whose text is dropped:
the paper's 1M steps make that enough, our few hundred steps do not (400 steps left image-only prompts at
chance). Cutting the caption to the attributes the image must then supply ("a red circle": the position is
up to the image; "on the left": colour and shape are; "": all three) teaches the image tokens to fill in
whatever the text leaves out, the situation of an image prompt with no text or with a short text. When the
text names the position, the image prompt is a render of the same colour and shape at a random position, so
the adapter learns that a position in the text overrides the one in the image ("on the left" + a red square
on the right -> a red square on the left), while an image prompt alone still gives its own position.

Why most cuts keep the position: the frozen prompt encoder was trained on full captions only, and its features
of a position phrase carry a "ghost" colour (the text "on the left" alone draws purple squares 16/16). The
image branch's output is added to the text branch's and cannot see which text it is added to, so it has to
learn a colour signal strong enough to win against the ghost of every position phrase. With the three cuts
equally likely (position phrases in 25% of the samples) the adapter settled for what suits the empty text:
image-only prompts held (0.92), but a red square + "on the left" came out yellow (0.19 at best, even after
4000 steps). With position phrases in half the samples: 0.94 at lambda = 1.5 (at commit 04f5cbe; today's
numbers: python bench/lesson_numbers.py lesson14_ip_adapter, quoted in lesson 14).
Full captions (the paper's only case) stay at 10%: they teach the image branch little on shapes, but without
them an image prompt + its full caption drifted (CLIP-T 0.80 in a 1500-step run without them, 0.93 with them
at 4000 steps).

At sampling time (`ImagePrompter`, adapters/image_prompt.py) the image tokens are appended after the text context of both halves of
classifier-free guidance: the conditional half gets the image prompt's tokens, the unconditional half the
tokens of a zero embedding (the learned "no image" of training), with the empty prompt.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from einops import rearrange

from minildm.adapters.image_prompt import ADAPTER_FILE, CLIP_FILE, ImagePrompter, clip_fingerprint
from minildm.adapters.ip_adapter import (ImageProjection, IPAdapterConfig, drop_conditions, ip_adapter_parameters,
                                         ip_adapter_state_dict, load_ip_adapter, new_ip_adapter)
from minildm.clip import CLIP, load_clip
from minildm.config import count_parameters
from minildm.data import shapes
from minildm.diffusion.ddpm import diffusion_loss
from minildm.pipeline import LatentDiffusion
from minildm.progress import step_rng
from minildm.train.clip import train_clip_stage
from minildm.train.common import Checkpoint, fit, stop_requested
from minildm.train.ldm import GRID_PROMPTS, encode_latent_cache
from minildm.viz import plot_curves, save_grid


@dataclass
class IPAdapterTrainConfig:
    steps: int = 4000
    batch_size: int = 32
    lr: float = 4e-3  # peak, warm-up then cosine to 0 (the paper: 1e-4 constant for 1M steps at batch 64)
    warmup: int = 50
    weight_decay: float = 0.01  # as the paper (AdamW)
    num_tokens: int = 4  # N image tokens
    drop_prob: float = 0.05  # text only, image only, both: each with this probability
    # probabilities of the text a sample keeps: (full caption, colour + shape, position, "") where the last three
    # are `shapes.partial_captions` (not in the paper, see above)
    caption_mix: tuple[float, float, float, float] = (0.1, 0.1, 0.5, 0.3)
    cache_size: int = 2048  # SEEN shapes rendered once, encoded to latents and CLIP embeddings
    preview_steps: int = 25  # DDIM steps of the preview grid samples/ip_adapter.png (0 = no preview)
    seed: int = 0

    def __post_init__(self):
        self.caption_mix = tuple(float(p) for p in self.caption_mix)
        if len(self.caption_mix) != 4 or min(self.caption_mix) < 0 or abs(sum(self.caption_mix) - 1) > 1e-6:
            raise ValueError("caption_mix holds 4 probabilities (full caption, colour + shape, position, empty) "
                             f"that sum to 1, got {self.caption_mix}.")


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------
def parameter_counts(pipe: LatentDiffusion, projection: ImageProjection) -> tuple[int, int]:
    """(trainable adapter parameters, parameters of the frozen UNet without the adapter)."""
    trainable = sum(p.numel() for p in ip_adapter_parameters(pipe.unet, projection))
    return trainable, count_parameters(pipe.unet) - (trainable - count_parameters(projection))


@torch.no_grad()
def encode_clip_cache(clip: CLIP, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Images [N, 3, H, W] in [-1, 1] -> CLIP image embeddings e [N, d_img] (the frozen encoder, run once)."""
    return torch.cat([clip.encode_image(images[i:i + batch_size].to(clip.device)).cpu()
                      for i in range(0, len(images), batch_size)])


def reference_images(size: int, seed: int = 0) -> torch.Tensor:
    """The GRID_PROMPTS combinations rendered once (jittered): fixed image prompts for previews, [8, 3, size, size]."""
    rng = step_rng(seed, 0, stream=1)
    combos = [shapes.parse_caption(p) for p in GRID_PROMPTS]
    images = np.stack([shapes.render(*combo, size=size, rng=rng) for combo in combos])  # uint8 [8, H, W, 3]
    return torch.from_numpy(rearrange(images, "b h w c -> b c h w").copy()).float() / 127.5 - 1.0


POSITION_ONLY = 2  # the index of "on the left" in caption_choices (and in caption_mix)


def caption_choices(color: str, shape: str, position: str) -> list[str]:
    """The texts a training sample can keep, in the order of IPAdapterTrainConfig.caption_mix:
    ["a red circle on the left", "a red circle", "on the left", ""] (the caption, then `shapes.partial_captions`)."""
    return [shapes.caption(color, shape, position), *shapes.partial_captions(color, shape, position)]


def train_ip_adapter(base_dir: str | Path, device: torch.device, out_dir: str | Path | None = None,
                     cfg: IPAdapterTrainConfig | None = None, show_progress: bool = True, resume: bool = False) -> Path:
    """Train an IP-Adapter on the frozen run `base_dir`; writes OUT/ip_adapter.pt (OUT = out_dir or base_dir).
    Ctrl-C saves the adapter so far; resume=True continues it.

    The CLIP is OUT/clip.pt; when there is none, the "clip" stage trains it first.
    """
    cfg = cfg or IPAdapterTrainConfig()
    base_dir = Path(base_dir)
    out_dir = Path(out_dir or base_dir)
    torch.manual_seed(cfg.seed)
    pipe = LatentDiffusion.load(base_dir, device)  # frozen: eval mode, requires_grad False everywhere
    if not (out_dir / CLIP_FILE).is_file():
        print(f"no CLIP in {out_dir}: training one first (stage clip)")
        train_clip_stage(out_dir, device, seed=cfg.seed, show_progress=show_progress)
        if stop_requested():  # Ctrl-C in the CLIP's training: the adapter does not start on a half-trained one
            return out_dir / ADAPTER_FILE
    clip, _ = load_clip(out_dir / CLIP_FILE, device)
    clip.requires_grad_(False)

    start_wall, start_cpu = time.time(), time.process_time()  # the stage's time: caches + training steps
    data = shapes.ShapesDataset(size=pipe.image_size, split="train", length=cfg.cache_size, seed=cfg.seed + 1,
                                cache=True)
    z0_all = encode_latent_cache(pipe.autoencoder, data.images, device=device)  # scaled latents z_0 [N, c, h, w]
    e_all = encode_clip_cache(clip, data.images)  # e [N, d_img]: the image prompt is the training image itself
    combos = [shapes.parse_caption(c) for c in data.captions]
    texts_all = torch.stack([pipe.tokenizer.encode(caption_choices(*combo)) for combo in combos])  # [N, 4, L]
    same_look = {}  # (colour, shape) -> cache indices of its renders, at every position
    for i, combo in enumerate(combos):
        same_look.setdefault(combo[:2], []).append(i)
    empty = pipe.tokenizer.encode([""])  # [1, L]

    def look_alike(i: int, rng: np.random.Generator) -> int:
        """A random cache index with the colour and shape of cache image i (any position, i itself included)."""
        group = same_look[combos[i][:2]]
        return group[rng.integers(len(group))]

    ip_cfg = IPAdapterConfig(d_img=clip.cfg.embed_dim, context_dim=pipe.unet.cfg.context_dim,
                             num_tokens=cfg.num_tokens, drop_prob=cfg.drop_prob)
    projection = new_ip_adapter(pipe.unet, ip_cfg)  # the UNet stays frozen; W'_k, W'_v start as W_k, W_v
    trainable, unet_params = parameter_counts(pipe, projection)
    print(f"IP-Adapter: {trainable:,} trainable parameters against the frozen UNet's {unet_params:,} "
          f"({100 * trainable / unet_params:.1f}%; the paper: 22M of ~860M, 2.6%)")
    opt = torch.optim.AdamW(ip_adapter_parameters(pipe.unet, projection), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def weights() -> dict:
        return {**ip_adapter_state_dict(pipe.unet, projection), "config": asdict(ip_cfg), "train_config": asdict(cfg),
                "clip_fingerprint": clip_fingerprint(clip), "base": str(base_dir),
                "ldm_fingerprint": pipe.fingerprint}  # the frozen base it learns to steer

    def load(saved: dict) -> None:
        if abs(saved["clip_fingerprint"] - clip_fingerprint(clip)) > 1e-3 * saved["clip_fingerprint"]:
            raise ValueError(f"{out_dir / ADAPTER_FILE} was trained with another CLIP: train again without --resume.")
        load_ip_adapter(pipe.unet, projection, saved)

    def loss_fn(step: int):
        rng = step_rng(cfg.seed, step)
        idx = torch.from_numpy(rng.integers(len(z0_all), size=cfg.batch_size))
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        drop_text, drop_image = drop_conditions(cfg.batch_size, cfg.drop_prob, gen)
        kept = torch.from_numpy(rng.choice(4, size=cfg.batch_size, p=cfg.caption_mix))  # [B], caption_choices
        tokens = texts_all[idx, kept]  # the full caption or one of its cuts
        # the image prompt: the training image itself, or, when the text is cut to its position, a render
        # of the same colour and shape at a random position (the text's position must win)
        prompt_idx = torch.tensor([look_alike(i, rng) if k == POSITION_ONLY else i
                                   for i, k in zip(idx.tolist(), kept.tolist())])
        tokens = torch.where(drop_text[:, None], empty, tokens)  # y = "" when the text is dropped
        e_img = torch.where(drop_image[:, None], 0.0, e_all[prompt_idx])  # e = 0 when the image is dropped
        with torch.no_grad():
            c_t, mask = pipe.text_encoder(tokens.to(device))  # frozen tau_theta(y)
        context = torch.cat([c_t, projection(e_img.to(device))], dim=1)  # cat[c_t, c_i]: text, then 4 image tokens
        t = torch.randint(0, pipe.schedule.num_timesteps, (cfg.batch_size,), generator=gen).to(device)
        eps = torch.randn(z0_all[idx].shape, generator=gen).to(device)
        loss = diffusion_loss(lambda x_t, t_: pipe.unet(x_t, t_, context, mask), pipe.schedule,
                              z0_all[idx].to(device), prediction=pipe.prediction, t=t, eps=eps)
        return loss, {"loss": loss.item()}

    def seconds(step: int) -> dict:  # training time, for the benchmark table
        return {"seconds": {"wall": time.time() - start_wall, "cpu": time.process_time() - start_cpu}}

    projection.train()
    run = fit(loss_fn, opt, cfg.steps, Checkpoint(out_dir / ADAPTER_FILE, "ip-adapter", weights, load,
                                                  keep_optimizer=False),
              lr=cfg.lr, warmup=cfg.warmup, resume=resume, desc="ip-adapter", show_progress=show_progress,
              device=device, postfix=("loss",), finish=seconds)
    path = out_dir / ADAPTER_FILE
    wall, cpu = time.time() - start_wall, time.process_time() - start_cpu
    print(f"trained {run.step} steps in {wall:.0f} s ({cpu:.0f} s of CPU time, all threads); saved {path}")
    plot_curves({"loss": run.log.history["loss"]}, out_dir / "ip_adapter_loss.png",
                title=f"IP-Adapter training loss ({pipe.prediction} MSE)")
    if run.interrupted or not cfg.preview_steps:
        return path
    prompts = reference_images(pipe.image_size, cfg.seed)
    prompter = ImagePrompter(clip, projection)
    generated = pipe.generate([""] * len(prompts), steps=cfg.preview_steps, guidance_scale=3.0, seed=0,
                              extra_tokens=prompter.extra_tokens(prompts))
    grid = torch.cat([(prompts + 1) / 2, generated])  # top row: the image prompts; bottom row: image-only samples
    save_grid(grid, out_dir / "samples" / "ip_adapter.png", nrow=len(prompts), upscale=2)
    return path
