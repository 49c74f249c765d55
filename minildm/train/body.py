"""Stage "body": BoLID (Kazachkov & Filatov) on procedural people, in four steps that each save a checkpoint.

    (a) base       autoencoder.pt, ldm.pt   a text-to-image model of people from captions of the pose and, at
                                            random, the build and shirt ("a person with long legs in a red shirt
                                            raising the left arm"), trained by the ordinary autoencoder and ldm
                                            stages on rendered bodies (skipped with --base RUN)
    (b) regressor  keypoint_regressor.pt    a small CNN that finds the 17 keypoints (L_id, --body-views, bench)
        body VAE   body_vae.pt              sets of keypoint-weighted views -> mu, logvar -> c_body (eqs. 11-13)
    (c) adapter    body_adapter.pt          the body-condition module in the UNet's cross-attention layers:
                                            Z' = A(Q,K_t,V_t) + lambda_ref A(Q,K_ref,V_ref) + lambda_b A(Q,K_b,V_b)
                                            while the UNet fine-tunes at a tenth of the adapter's lr (its copy
                                            goes into body_adapter.pt; ldm.pt stays the base); prompt encoder frozen

The adapter's objective is eq. 14, L = L_diff + alpha_id L_id + beta_clip L_clip, with each term switched
off by a weight of 0:
    c_body   = mu of a set of `set_size` OTHER views of the target's identity (reference views, never a
               training target, so c_body cannot leak the target's pose). The posterior mean, as at sampling,
               not a draw z = mu + sigma eps: sigma (~0.53) is nearly as large as the spread of mu between
               people (~0.60), and an adapter trained on such noisy bodies learns to follow them only in part
               (measured: a gain within the bench's spread between trainings, lessons/15_body_vae/README.md)
    c_ref    = ImageProjection(view features of another view of the same person), present with p = ref_prob;
               a missing reference gives zero tokens (its term vanishes exactly)
    drop text only, body only, both: p = drop_prob each (a dropped body is c_body = 0 before the projection:
               the learned "no body" tokens, the unconditional half of classifier-free guidance)
    L_id     = sum_k ||regressor(x0_hat)_k - p_k||^2 over the target's visible keypoints, x0_hat the decoded
               property-3 guess of the clean image
    L_clip   is off (beta_clip = 0): minildm's small CLIP is trained on shapes captions and knows no pose
               words; `beta_clip > 0` with a body CLIP in `clip_path` switches it on.
The reference image's encoder is the frozen body VAE's per-view conv net (BodyVAE.view_features), our
stand-in for the paper's CLIP image encoder. Every step trains through the one loop (train/common.py: fit),
so Ctrl-C saves and --resume continues each step where it stopped.

Files: this one (the presets and the whole stage), train/body_data.py (the rendered people of each step),
train/body_models.py (b), train/body_adapter.py (c).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from minildm.adapters.body import ADAPTER_FILE, REGRESSOR_FILE, VAE_FILE
from minildm.adapters.body_vae import BodyVAEConfig, load_body_vae
from minildm.adapters.keypoint_regressor import load_regressor
from minildm.autoencoder.vqvae import VQConfig
from minildm.checkpoint import load_checkpoint, save_checkpoint
from minildm.config import AutoencoderTrainConfig, LDMTrainConfig, Preset, micro
from minildm.data.bodies import POSE_NAMES
from minildm.modules.unet import UNetConfig
from minildm.pipeline import LatentDiffusion
from minildm.text.encoder import TextEncoderConfig
from minildm.train.body_adapter import preview, train_body_adapter
from minildm.train.body_data import encoder_views, flat_views, regressor_views, render_stage_data, vae_views
from minildm.train.body_models import train_body_vae, train_keypoint_regressor
from minildm.viz import plot_curves


def body_base_preset() -> Preset:
    """The base text-to-image model of people: 32x32 bodies, a VQ-VAE with f = 2 (16x16x4 latents), a small UNet.

    Why f = 2 and not the shapes' f = 4: a person's build is a matter of a limb being 10-20% longer, one to
    three pixels at 32x32. Through the tiny f = 4 autoencoder (8x8x4 latents, 256 codes) that is less than a
    latent cell, and the round trip D(E(x)) already blurs a third of it away: the keypoint regressor reads
    the limb ratios of the bench's people off D(E(x)) with error 0.114 (0.037 off the renders themselves), so
    no model drawing in those latents could follow a body more closely than that. With f = 2 (same widths,
    one level fewer): 0.051, and 34.1 dB PSNR on those people instead of 29.9. Eight latent channels at
    f = 4 with 1024 codes gave 0.121.
    The UNet runs at 16x16, 8x8 and 4x4 with attention only at the two coarse levels: attention over 256
    positions made a training step ~5x slower.

    Steps: 2400 x 32 autoencoder steps (the shapes recipe is 1200 x 32; thin limbs need longer) and 6000 x 32
    LDM steps (as many samples as the shapes preset's 3000 x 64). Captions are up to 19 words ("a person with
    long arms and short legs and long torso in a purple shirt raising the right arm"), hence max_len 24.
    """
    return Preset(
        name="body", image_size=32, vq=replace(VQConfig.tiny(), channel_mult=(1, 2)),
        vq_train=AutoencoderTrainConfig(steps=2400, batch_size=32, image_every=0, save_every=100, eval_images=128),
        text=TextEncoderConfig(vocab_size=0, max_len=24, dim=64, depth=1, heads=4, dim_head=16),
        unet=UNetConfig(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                        attention_levels=(1, 2), heads=4, dim_head=16, context_dim=64, norm_groups=16),
        ldm=LDMTrainConfig(steps=6000, batch_size=32, lr=2e-3, warmup=50, sample_every=0, save_every=100),
    )


@dataclass
class BodyStageConfig:
    """Every number of the body stage. Identities 0 .. num_identities-1 train; higher indices are unseen people.

    One line of why per field; how each value was measured is in bench/results/body.md (how the body stage's
    settings were chosen); what today's values give: `python bench/lesson_numbers.py lesson15_body`."""
    name: str = "body"
    image_size: int = 32
    num_identities: int = 120
    views_per_identity: int = 12  # training targets of the base LDM and the adapter
    # each build word and the shirt colour kept in a base caption with this probability: the base UNet must
    # learn to draw a build it is told, or no adapter can steer it (the adapter trains on pose captions alone)
    caption_keep: float = 0.5
    reference_views: int = 6  # further views per identity: c_body sets and reference images only
    seed: int = 0
    base: Preset = field(default_factory=body_base_preset)
    # (b) keypoint regressor and body VAE: every view of the training people and of this many more people
    encoder_identities: int = 480
    regressor_people: int = 4000  # more people (4 views each) for the regressor: with fewer it sees everyone as average
    regressor_steps: int = 9000  # fewer steps under-read the spread of limb ratios of unseen people
    regressor_batch: int = 32
    regressor_lr: float = 2e-3
    vae: BodyVAEConfig = field(default_factory=lambda: BodyVAEConfig(
        image_size=32, channels=(32, 64, 128), feature_dim=256, latent_dim=64, keypoint_sigma=1.5, weight_alpha=0.25,
        beta_kl=0.01, shape_weight=10.0))  # beta_kl 1 collapses the posterior; shape_weight: c_body follows the body
    vae_people: int = 1500  # more people for the body VAE: its shape head tracks unseen people's limbs better
    vae_steps: int = 6000
    vae_batch: int = 16
    vae_views_per_set: int = 3
    vae_held_out: int = 1  # of each set: rebuilt, not encoded (BodyVAE.loss)
    vae_lr: float = 3e-3
    # (c) the body adapter
    adapter_steps: int = 8000  # twice the IP-Adapter recipe's steps; longer did not pay
    # > 0: the base UNet fine-tunes with the adapter at this fraction of adapter_lr (BoLID fine-tunes the model;
    # frozen, the UNet followed only part of the body it was told). Its copy goes into body_adapter.pt.
    unet_lr_scale: float = 0.1
    adapter_batch: int = 32
    adapter_lr: float = 4e-3  # as minildm's IP-Adapter recipe (IPAdapterTrainConfig)
    set_size: int = 4  # views per c_body
    sets_per_identity: int = 8  # c_body of this many random sets per identity, cached
    body_tokens: int = 4
    ref_tokens: int = 4
    drop_prob: float = 0.05
    ref_prob: float = 0.5
    alpha_id: float = 0.05
    beta_clip: float = 0.0  # off: minildm's CLIP knows shapes captions, no pose words
    clip_path: str = ""  # a CLIP trained on body captions (needed only when beta_clip > 0)
    preview_steps: int = 25  # DDIM steps of samples/body.png (0 = none)


def body_stage_config(name: str = "body") -> BodyStageConfig:
    """"body" (the default: about 2 hours of one core of a busy shared machine: autoencoder 7, LDM 30,
    regressor 16, VAE 11, adapter with the UNet fine-tuning 62) or
    "micro" (seconds: tests and smoke runs, noise)."""
    if name in ("body", "tiny"):
        return BodyStageConfig()
    if name != "micro":
        raise ValueError(f"the body stage has the presets body (default) and micro, got '{name}'.")
    base = micro()
    base.name = "body-micro"
    base.text = replace(base.text, max_len=24)
    base.vq_train = replace(base.vq_train, steps=3, batch_size=8, eval_images=8)
    base.ldm = replace(base.ldm, steps=3, batch_size=8)
    return BodyStageConfig(
        name="body-micro", num_identities=3, views_per_identity=3, reference_views=3, base=base, encoder_identities=2,
        regressor_people=2, vae_people=2,
        regressor_steps=3, regressor_batch=8, vae=BodyVAEConfig(image_size=32, channels=(8, 16), feature_dim=16,
                                                                latent_dim=8, keypoint_sigma=1.5, beta_kl=0.01,
                                                                shape_weight=10.0),
        vae_steps=3, vae_batch=4, adapter_steps=3, adapter_batch=8, set_size=2, sets_per_identity=2, preview_steps=2)


def _done(path: Path, kind: str, steps: int) -> bool:
    """A finished checkpoint of this step already exists (what --resume skips)."""
    return path.is_file() and load_checkpoint(path, kind).get("step", 0) >= steps


def train_body_stage(run_dir: str | Path, device: torch.device, cfg: BodyStageConfig | None = None,
                     base_dir: str | Path | None = None, resume: bool = False, show_progress: bool = True) -> bool:
    """(a) base LDM on bodies (unless base_dir), (b) keypoint regressor and body VAE, (c) the adapter, into run_dir.

    With resume, a step whose checkpoint is finished is skipped and an unfinished one continues.
    Returns True when every step finished (False after Ctrl-C: run again with --resume)."""
    cfg = cfg or BodyStageConfig()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    data = render_stage_data(cfg)
    print(f"bodies: {cfg.num_identities} identities x ({cfg.views_per_identity} training + {cfg.reference_views} "
          f"reference) views at {cfg.image_size}x{cfg.image_size}, poses: {', '.join(POSE_NAMES)}")
    timings = {}

    train_base = base_dir is None
    base_dir = run_dir if train_base else Path(base_dir)
    if train_base:  # (a) the base model of people
        from minildm.train.autoencoder import train_autoencoder
        from minildm.train.ldm import train_ldm

        images = flat_views(data["targets"])["image"]
        t0 = time.time()
        if not (resume and _done(run_dir / "autoencoder.pt", "autoencoder", cfg.base.vq_train.steps)):
            train_autoencoder(cfg.base, run_dir, device, resume=resume, images=images, show_progress=show_progress)
        if not _done(run_dir / "autoencoder.pt", "autoencoder", cfg.base.vq_train.steps):
            return False
        if not (resume and _done(run_dir / "ldm.pt", "ldm", cfg.base.ldm.steps)):
            train_ldm(cfg.base, run_dir, device, resume=resume, data=(images, data["captions"]),
                      show_progress=show_progress)
        if not _done(run_dir / "ldm.pt", "ldm", cfg.base.ldm.steps):
            return False
        timings["base"] = time.time() - t0
    pipe = LatentDiffusion.load(base_dir, device)
    missing = sorted({w for c in data["captions"] for w in c.split()} - set(pipe.tokenizer.words))
    if missing:
        raise ValueError(f"the base run {base_dir} does not know the caption words {missing}: give --base a run trained "
                         "on bodies (or leave --base out to train one).")

    everything, shapes = encoder_views(cfg)
    t0 = time.time()
    path = run_dir / REGRESSOR_FILE
    if not (resume and _done(path, "keypoint-regressor", cfg.regressor_steps)):
        _, _, finished = train_keypoint_regressor(regressor_views(cfg, everything), cfg.regressor_steps,
                                                  cfg.regressor_batch, cfg.regressor_lr, cfg.seed, device, path,
                                                  resume, show_progress, pipe.autoencoder)
        if not finished:
            return False
    regressor = load_regressor(path, device)
    path = run_dir / VAE_FILE
    if not (resume and _done(path, "body-vae", cfg.vae_steps)):
        views, vae_shapes = vae_views(cfg, everything, shapes)
        _, log, finished = train_body_vae(cfg.vae, views, cfg.vae_steps, cfg.vae_batch, cfg.vae_views_per_set,
                                          cfg.vae_lr, cfg.seed, device, path, resume, show_progress, cfg.vae_held_out,
                                          vae_shapes)
        plot_curves({k: log.history[k] for k in ("recon", "kl", "shape") if k in log.history},
                    run_dir / "body_vae_loss.png", title="body VAE: reconstruction, KL and shape head")
        if not finished:
            return False
    vae = load_body_vae(path, device)
    timings["regressor+vae"] = time.time() - t0

    t0 = time.time()
    prompter, finished = train_body_adapter(pipe, vae, regressor, data, cfg, run_dir, device, base_dir, resume,
                                            show_progress)
    timings["adapter"] = time.time() - t0
    if not finished:
        return False
    if cfg.preview_steps:
        preview(pipe, prompter, cfg, run_dir / "samples" / "body.png")
    state = load_checkpoint(run_dir / ADAPTER_FILE, "body-adapter")
    save_checkpoint(run_dir / ADAPTER_FILE, "body-adapter", {**state, "seconds": {**timings,
                                                                                  "total": time.time() - start}})
    print("body stage: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in timings.items()))
    return True
