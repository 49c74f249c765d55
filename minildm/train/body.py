"""Stage "body": BoLID (seed 002) on procedural people, in four steps that each save a checkpoint.

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
stand-in for the paper's CLIP image encoder. Every step draws its batch from step_rng, so Ctrl-C saves and
--resume continues each step where it stopped.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from einops import rearrange

from minildm.adapters.body import (BODY, VIEW_KEYS, BodyAdapterConfig, BodyProjection, BodyVAE, BodyVAEConfig,
                                   KeypointRegressor, body_adapter_parameters, body_context, bolid_loss,
                                   new_body_adapter, predicted_x0_image, render_identities,
                                   set_body_lambdas)
from minildm.adapters.ip_adapter import IP, ImageProjection, drop_conditions, ip_adapter_state_dict, load_ip_adapter
from minildm.autoencoder.vqvae import VQConfig
from minildm.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from minildm.config import AutoencoderTrainConfig, LDMTrainConfig, Preset, micro
from minildm.data.bodies import build_phrases, identity, pose_caption, POSE_NAMES, random_view, shape_vector, shirt_name
from minildm.data.body_render import BodiesDataset, render_body
from minildm.modules.unet import UNetConfig
from minildm.pipeline import LatentDiffusion
from minildm.text.encoder import TextEncoderConfig
from minildm.train.common import GracefulInterrupt, LossLog, learning_rate, progress, step_rng
from minildm.train.ip_adapter import load_image_file
from minildm.viz import plot_curves, save_grid

REGRESSOR_FILE, VAE_FILE, ADAPTER_FILE = "keypoint_regressor.pt", "body_vae.pt", "body_adapter.pt"
REFERENCE_VIEWS = 4  # views of an identity rendered for sample.py --body-id and the previews


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
    """Every number of the body stage. Identities 0 .. num_identities-1 train; higher indices are unseen people."""
    name: str = "body"
    image_size: int = 32
    num_identities: int = 120
    views_per_identity: int = 12  # training targets of the base LDM and the adapter
    # Each base caption says each of the person's build words and their shirt colour with this probability
    # ("a person with long legs in a red shirt standing"). An adapter can only steer what the frozen UNet
    # already draws from its context: with pose-only captions the UNet's cross-attention had never carried
    # build or colour, the body stream moved eps by ~1% and samples of different people came out the same.
    # With these captions: ~4%, and knowing the right c_body lowers L_diff by ~9% at t = 250-750 (3-4% before).
    # The adapter itself trains on the pose captions alone: the body, not words, must carry the build.
    caption_keep: float = 0.5
    reference_views: int = 6  # further views per identity: c_body sets and reference images only
    seed: int = 0
    base: Preset = field(default_factory=body_base_preset)
    # (b) keypoint regressor and body VAE (both on every rendered view of the training people and of
    # encoder_identities further people: more bodies to learn proportions from)
    encoder_identities: int = 480
    # the regressor also gets regressor_people more people in 4 views each: with only the 600 above it read
    # arm / torso and leg / torso of new people at 0.38x / 0.12x their true spread (it saw everyone as
    # average); with 4000 more, 0.46x / 0.24x (0.61x / 0.37x with KeypointRegressor's peak window)
    regressor_people: int = 4000
    # 400 steps left it worse than guessing the average body; 3000 read 0.61x / 0.37x of the true spread of
    # arm / torso and leg / torso on unseen people; 9000 read 0.94x / 0.94x (error on real renders 0.147 ->
    # 0.037; 0.92x / 0.91x and 0.039 with the f = 2 base's round trips, bench/results/body.md). It was
    # undertrained, not too coarse: 64x64 heatmaps did not help.
    regressor_steps: int = 9000
    regressor_batch: int = 32
    regressor_lr: float = 2e-3
    vae: BodyVAEConfig = field(default_factory=lambda: BodyVAEConfig(
        image_size=32, channels=(32, 64, 128), feature_dim=256, latent_dim=64, keypoint_sigma=1.5, weight_alpha=0.25,
        beta_kl=0.01, shape_weight=10.0))  # beta_kl: see lessons/15_body_vae/README.md (beta = 1 collapses the
    # posterior); shape_weight: BodyVAE.loss (without it c_body told people apart mostly by their clothes)
    # the body VAE also gets vae_people more people (seed + 3) in as many views as the training people. Its
    # shape head's correlation with the true torso / arm / leg lengths of unseen people (4 views each): 1200
    # steps on the 600 people above 0.84 / 0.90 / 0.90; 6000 steps 0.93 / 0.90 / 0.95; 6000 steps with 1500 more
    # people 0.97 / 0.95 / 0.97. A ridge fit from c_body to the limb ratios (on 120 people, as the adapter has)
    # then misses unseen people's arm / torso and leg / torso by 0.069 / 0.085 instead of 0.116 / 0.163
    # (the average body: 0.221 / 0.283). Retrieval of unseen people from one view: 0.74 -> 0.95. With the
    # 4000-step adapter the body stream's shape error did not move with it (0.193 against 0.195); see adapter_steps.
    vae_people: int = 1500
    vae_steps: int = 6000
    vae_batch: int = 16
    vae_views_per_set: int = 3
    vae_held_out: int = 1  # of each set: rebuilt, not encoded (BodyVAE.loss)
    vae_lr: float = 3e-3
    # (c) the body adapter
    # lr 4e-3 as minildm's IP-Adapter recipe (IPAdapterTrainConfig), twice its steps. The body stream's shape
    # error on the f = 2 base: 1000 steps at lr 1e-3 0.243, 4000 at 4e-3 0.195 (both with the earlier 1200-step
    # body VAE); with this VAE, 4000 steps 0.193 and 0.171 (two trainings, only the random stream differs) and
    # 8000 steps 0.154 (a second training 0.178), poses holding in 93% instead of 90%. Longer no longer pays:
    # 12000 steps 0.168, 16000 steps 0.151 (slopes 0.42 / 0.52, poses 91%). All with the UNet frozen; with it
    # fine-tuning (unet_lr_scale) 8000 steps take ~60 min of one core.
    adapter_steps: int = 8000
    # > 0: the base UNet fine-tunes with the adapter at this fraction of adapter_lr (BoLID fine-tunes the model on
    # people grouped by identity; IP-Adapter keeps it frozen: 0). Frozen, the body stream's shape error stayed
    # at 0.56-0.66 of the text-only model's over four trainings, following 40-50% of the true spread of
    # proportions: the UNet, trained on captions that barely carried the build, had not learnt to draw a build
    # it is told. Fine-tuned at 0.1 on the same base, VAE and seeds: 0.46 (0.123 against 0.154), slopes
    # 0.83 / 0.81 instead of 0.39 / 0.47, poses holding in 96%; ~25% slower steps. The fine-tuned UNet goes
    # into body_adapter.pt; ldm.pt stays the base (the bench's text-only rows).
    unet_lr_scale: float = 0.1
    adapter_batch: int = 32
    adapter_lr: float = 4e-3
    set_size: int = 4  # views per c_body
    sets_per_identity: int = 8  # c_body of this many random sets per identity, cached
    body_tokens: int = 4
    ref_tokens: int = 4
    drop_prob: float = 0.05
    ref_prob: float = 0.5
    alpha_id: float = 0.05
    beta_clip: float = 0.0
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


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------
def described_caption(shape, pose_name: str, keep: float, rng: np.random.Generator) -> str:
    """The base model's caption of one view: the pose, and each of the person's build_phrases and their shirt
    colour kept with probability `keep` ("a person with long legs in a red shirt raising both arms")."""
    build = [phrase for phrase in build_phrases(shape) if rng.random() < keep]
    return pose_caption(pose_name, build, shirt_name(shape) if rng.random() < keep else None)


def render_stage_data(cfg: BodyStageConfig) -> dict:
    """The training identities rendered once: targets {key: [I, V, ...]}, references {key: [I, R, ...]},
    captions [I * V] (target k = identity k // V, view k % V) of the base model (pose + some words for build
    and shirt, `described_caption`) and pose_captions [I * V] of the adapter (the pose only)."""
    data = BodiesDataset(cfg.num_identities, cfg.views_per_identity + cfg.reference_views, cfg.image_size, cfg.seed)
    views = render_identities(data)
    V = cfg.views_per_identity
    targets = [(i, data.view(i, v).name) for i in range(cfg.num_identities) for v in range(V)]
    rng = np.random.default_rng([cfg.seed, 7])
    return {"targets": {k: x[:, :V] for k, x in views.items()}, "references": {k: x[:, V:] for k, x in views.items()},
            "captions": [described_caption(data.shapes[i], pose, cfg.caption_keep, rng) for i, pose in targets],
            "pose_captions": [pose_caption(pose) for _, pose in targets]}


def encoder_views(cfg: BodyStageConfig) -> tuple[dict, torch.Tensor]:
    """Every view of the training people and of cfg.encoder_identities further people, for the keypoint
    regressor and the body VAE: ({key: [I, V, ...]} with V = training + reference views, shape_vector [I, S]).

    The further people are drawn with another seed (seed + 1), so they are never the stage's unseen test
    people (identities num_identities, num_identities + 1, ... of the stage's seed, see bench/body.py);
    neither the base model nor the adapter sees them.
    """
    V = cfg.views_per_identity + cfg.reference_views
    people = [BodiesDataset(cfg.num_identities, V, cfg.image_size, cfg.seed)]
    if cfg.encoder_identities:
        people.append(BodiesDataset(cfg.encoder_identities, V, cfg.image_size, cfg.seed + 1))
    views = [render_identities(data) for data in people]
    shapes = torch.from_numpy(np.stack([shape_vector(s) for data in people for s in data.shapes]))
    return {k: torch.cat([v[k] for v in views]) for k in VIEW_KEYS}, shapes


def regressor_views(cfg: BodyStageConfig, everything: dict) -> dict:
    """The keypoint regressor's training views [N, ...]: every view of encoder_views (`everything`) and 4 views
    of each of cfg.regressor_people more people (seed + 2: never the stage's test people either)."""
    views = [_flat(everything)]
    if cfg.regressor_people:
        views.append(_flat(render_identities(BodiesDataset(cfg.regressor_people, 4, cfg.image_size, cfg.seed + 2))))
    return {k: torch.cat([v[k] for v in views]) for k in VIEW_KEYS}


def vae_views(cfg: BodyStageConfig, everything: dict, shapes: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """The body VAE's training views {key: [I, V, ...]} and shape_vector [I, S]: encoder_views (`everything`,
    `shapes`) and cfg.vae_people more people in the same V views (seed + 3: never the stage's test people)."""
    if not cfg.vae_people:
        return everything, shapes
    people = BodiesDataset(cfg.vae_people, everything["image"].shape[1], cfg.image_size, cfg.seed + 3)
    views = render_identities(people)
    more = torch.from_numpy(np.stack([shape_vector(s) for s in people.shapes]))
    return {k: torch.cat([everything[k], views[k]]) for k in VIEW_KEYS}, torch.cat([shapes, more])


def identity_views(index: int, n: int = REFERENCE_VIEWS, size: int = 32, seed: int = 0) -> dict:
    """Identity `index` (of the stage's seed) in n fixed random views: {image [n, 3, H, W] in [-1, 1],
    keypoints [n, 17, 2], visible [n, 17]}. Indices past the training identities are people never seen."""
    if index < 0:
        raise ValueError(f"--body-id must be a non-negative identity number, got {index}.")
    rng = np.random.default_rng([seed, 3, index])
    shape = identity(index, seed)
    rendered = [render_body(shape, random_view(rng), size) for _ in range(n)]
    image = torch.from_numpy(np.stack([r[0] for r in rendered])).float() / 127.5 - 1
    return {"image": rearrange(image, "n h w c -> n c h w"),
            "keypoints": torch.from_numpy(np.stack([r[1] for r in rendered])),
            "visible": torch.from_numpy(np.stack([r[2] for r in rendered]))}


def load_view_folder(folder: str | Path, size: int) -> torch.Tensor:
    """Every PNG in a folder -> [n, 3, size, size] in [-1, 1] (central square, resized)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"--body-views {folder} is not a folder: give a folder of PNG views of one person.")
    files = sorted(folder.glob("*.png"))
    if not files:
        raise ValueError(f"--body-views {folder} has no .png file: put a few PNG views of one person in it.")
    return torch.cat([load_image_file(f, size) for f in files])


# ----------------------------------------------------------------------------------------------------------
# The loop the small models share: resumable, Ctrl-C safe
# ----------------------------------------------------------------------------------------------------------
def fit(params: list, steps: int, step_loss, lr: float, desc: str, state: dict, path: Path | None = None,
        kind: str = "", resume: bool = False, show_progress: bool = True, warmup: int = 0) -> tuple[LossLog, bool]:
    """Adam over `params` for `steps` steps of `step_loss(step) -> (loss, logs dict)`; -> (log, finished).

    params: a list of tensors, or of parameter groups {"params": [...], "lr_scale": s} whose learning rate is
    s times the schedule's (the body adapter fine-tunes the UNet at a tenth of the adapter's rate).

    state: {"save": () -> dict of the models' weights, "load": (dict) -> None}. With a path, the weights,
    optimiser, step and log are written there atomically at the end or on Ctrl-C, and resume=True continues
    from that file. Learning rate: linear warm-up, then cosine to 0.
    """
    opt = torch.optim.Adam(params, lr=lr)
    log, step = LossLog(), 0
    if resume and path is not None and path.is_file():
        saved = load_checkpoint(path, kind)
        state["load"](saved)
        opt.load_state_dict(saved["optimizer"])
        log.load(saved["log"])
        step = saved["step"]
    bar = progress(steps, step, desc, show_progress)
    with GracefulInterrupt() as interrupt:
        while step < steps and not interrupt.requested:
            for group in opt.param_groups:
                group["lr"] = group.get("lr_scale", 1.0) * learning_rate(step, steps, lr, warmup)
            loss, logs = step_loss(step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            log.add(step, **logs)
            bar.update(1)
            bar.set_postfix(log.postfix())
    bar.close()
    if path is not None:
        save_checkpoint(path, kind, {**state["save"](), "optimizer": opt.state_dict(), "step": step, "log": log.state()})
    return log, not interrupt.requested


def _done(path: Path, kind: str, steps: int) -> bool:
    """A finished checkpoint of this step already exists (what --resume skips)."""
    return path.is_file() and load_checkpoint(path, kind).get("step", 0) >= steps


def _flat(views: dict) -> dict:
    return {k: rearrange(v, "i v ... -> (i v) ...") for k, v in views.items()}


def train_keypoint_regressor(views: dict, steps: int = 400, batch_size: int = 32, lr: float = 2e-3, seed: int = 0,
                             device="cpu", path: Path | None = None, resume: bool = False, show_progress: bool = True,
                             autoencoder: torch.nn.Module | None = None,
                             noise: float = 0.1) -> tuple[KeypointRegressor, LossLog, bool]:
    """Train a KeypointRegressor on rendered views ({image, keypoints, visible} [N, ...] or [I, V, ...]).

    -> (model in eval mode, log, finished). Loss: KeypointRegressor.loss (heatmap cross-entropy and
    pixel error on visible keypoints + visibility cross-entropy).
    The regressor mostly reads *generated* people, which come out of the autoencoder's decoder: blurrier
    edges, shifted colours. So with an autoencoder, half of every batch is the renders after a round trip
    through it (x -> D(E(x)), computed once), and every image gets Gaussian pixel noise of a random
    standard deviation in [0, noise] (on the [-1, 1] scale)."""
    views = {k: v.to(device) for k, v in (_flat(views) if views["image"].dim() == 5 else views).items()}
    if autoencoder is not None:
        with torch.no_grad():
            views["decoded"] = torch.cat([autoencoder.decode(autoencoder.encode(x)).clamp(-1, 1)
                                          for x in views["image"].split(256)])
    torch.manual_seed(seed)
    model = KeypointRegressor().to(device).train()

    def step_loss(step):
        rng = step_rng(seed, step)
        idx = torch.from_numpy(rng.integers(len(views["image"]), size=batch_size)).to(device)
        images = views["image"][idx]
        if autoencoder is not None:  # the first half of the batch as the decoder would draw it
            half = batch_size // 2
            images = torch.cat([views["decoded"][idx[:half]], images[half:]])
        std = torch.from_numpy(rng.uniform(0, noise, size=(batch_size, 1, 1, 1))).float().to(device)
        images = images + std * torch.from_numpy(rng.standard_normal(images.shape)).float().to(device)
        return model.loss(images, views["keypoints"][idx], views["visible"][idx])

    state = {"save": lambda: {"model": model.state_dict(), "num_keypoints": model.num_keypoints},
             "load": lambda s: model.load_state_dict(s["model"])}
    log, finished = fit(list(model.parameters()), steps, step_loss, lr, "keypoint regressor", state, path,
                        "keypoint-regressor", resume, show_progress, warmup=steps // 10)
    return model.eval(), log, finished


def train_body_vae(cfg: BodyVAEConfig, views: dict, steps: int = 500, batch_size: int = 16, views_per_set: int = 2,
                   lr: float = 3e-3, seed: int = 0, device="cpu", path: Path | None = None, resume: bool = False,
                   show_progress: bool = True, held_out: int = 0,
                   shapes: torch.Tensor | None = None) -> tuple[BodyVAE, LossLog, bool]:
    """Train a BodyVAE on sets of views; -> (model in eval mode, log with recon/kl/loss, finished).

    views: render_identities output (I identities x V views); shapes [I, S]: each person's shape_vector
    (needed when cfg.shape_weight > 0). Each step takes batch_size random identities and views_per_set
    distinct random views of each (a set) and minimises BodyVAE.loss (the negative ELBO + the shape head).
    Sets of 2 views already teach the encoder to pool; any number works when encoding. held_out of the
    views_per_set views are only rebuilt, never encoded (BodyVAE.loss)."""
    num_identities, num_views = views["image"].shape[:2]
    if not 1 <= views_per_set <= num_views:
        raise ValueError(f"views_per_set must be between 1 and the {num_views} rendered views, got {views_per_set}.")
    views = {k: views[k].to(device) for k in VIEW_KEYS}
    torch.manual_seed(seed)
    vae = BodyVAE(cfg).to(device).train()

    def step_loss(step):
        rng = step_rng(seed, step)
        ids = torch.from_numpy(rng.integers(num_identities, size=batch_size))[:, None]                   # [B, 1]
        picks = torch.from_numpy(np.stack([rng.permutation(num_views)[:views_per_set] for _ in range(batch_size)]))
        shape = None if shapes is None else shapes[ids[:, 0]].to(device)
        return vae.loss(*(views[k][ids, picks] for k in VIEW_KEYS), held_out=held_out, shape=shape)    # [B, V', ...]

    state = {"save": lambda: {"model": vae.state_dict(), "config": asdict(cfg), "num_identities": num_identities,
                              "seed": seed},
             "load": lambda s: vae.load_state_dict(s["model"])}
    log, finished = fit(list(vae.parameters()), steps, step_loss, lr, "body VAE", state, path, "body-vae", resume,
                        show_progress)
    return vae.eval(), log, finished


def load_regressor(path: Path, device="cpu") -> KeypointRegressor:
    state = load_checkpoint(path, "keypoint-regressor")
    model = KeypointRegressor(state["num_keypoints"])
    model.load_state_dict(state["model"])
    return model.to(device).eval().requires_grad_(False)


def load_body_vae(path: Path, device="cpu") -> BodyVAE:
    state = load_checkpoint(path, "body-vae")
    vae = BodyVAE(BodyVAEConfig(**{**state["config"], "channels": tuple(state["config"]["channels"])}))
    vae.load_state_dict(state["model"])
    return vae.to(device).eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------------
# Body prompts at sampling time
# ----------------------------------------------------------------------------------------------------------
class BodyPrompter:
    """The frozen body VAE and regressor + the trained projections: views of a person -> the
    `extra_tokens` (cat[c_ref, c_b] after the text) of `LatentDiffusion.generate`."""

    def __init__(self, vae: BodyVAE, regressor: KeypointRegressor, body_projection: BodyProjection,
                 ref_projection: ImageProjection, seed: int = 0):
        self.vae, self.regressor = vae.eval(), regressor.eval()
        self.seed = seed  # the run's data seed: identity N of --body-id is identity(N, seed)
        self.body_projection, self.ref_projection = body_projection.eval(), ref_projection.eval()

    @property
    def device(self) -> torch.device:
        return self.body_projection.proj.weight.device

    @torch.no_grad()
    def keypoints(self, images: torch.Tensor, keypoints=None, visible=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The given keypoints, or the regressor's when None: images [n, 3, H, W] -> ([n, 17, 2], [n, 17])."""
        if keypoints is not None:
            return keypoints.to(self.device), visible.to(self.device)
        return self.regressor.predict(images.to(self.device))

    @torch.no_grad()
    def c_body(self, images: torch.Tensor, keypoints=None, visible=None) -> torch.Tensor:
        """Views of ONE person [n, 3, H, W] in [-1, 1] (keypoints [n, 17, 2] or None: the regressor finds them)
        -> c_body = mu [1, D] (the posterior mean: no sampling noise at inference)."""
        size = self.vae.cfg.image_size
        if images.dim() != 4 or images.shape[1:] != (3, size, size):
            raise ValueError(f"body views must be [n, 3, {size}, {size}] images, got {tuple(images.shape)}.")
        kp, vis = self.keypoints(images, keypoints, visible)
        mu, _ = self.vae.encode(images.to(self.device)[None], kp[None], vis[None])
        return mu

    @torch.no_grad()
    def extra_tokens(self, c_body: torch.Tensor | None, ref_image: torch.Tensor | None = None):
        """c_body [N or 1, D] or None (no body: the learned "no body" tokens), ref_image [1, 3, H, W] or None
        -> (cond [N or 1, n_ref + n_b, d], uncond [1, n_ref + n_b, d]); uncond = no reference, no body."""
        D = self.body_projection.d_img
        no_body = self.body_projection(torch.zeros(1, D, device=self.device))  # c_body = 0: learned "no body"
        no_ref = torch.zeros(1, self.ref_projection.num_tokens, self.ref_projection.d_ctx, device=self.device)
        body = no_body if c_body is None else self.body_projection(c_body.to(self.device))
        if ref_image is None:
            ref = no_ref.expand(body.shape[0], -1, -1)  # zero tokens: the ref_lambda term vanishes
        else:
            kp, vis = self.regressor.predict(ref_image.to(self.device))
            ref = self.ref_projection(self.vae.view_features(ref_image.to(self.device), kp, vis))
            ref = ref.expand(body.shape[0], -1, -1)
            body = body.expand(ref.shape[0], -1, -1)
        return torch.cat([ref, body], dim=1), torch.cat([no_ref, no_body], dim=1)


def load_unet_weights(unet_weights: dict, saved: dict, path: Path) -> None:
    """Copy a fine-tuned UNet's weights {name: tensor} into the tensors unet_weights names (in place)."""
    if set(saved) != set(unet_weights) or any(saved[n].shape != w.shape for n, w in unet_weights.items()):
        raise CheckpointError(f"{path} holds a UNet fine-tuned from another base model: train the body stage "
                              "again for this run's ldm.pt.")
    with torch.no_grad():
        for name, w in unet_weights.items():
            w.copy_(saved[name])


def load_body_prompter(pipe: LatentDiffusion, run_dir: str | Path, body_lambda: float = 1.0,
                       ref_lambda: float = 1.0) -> BodyPrompter:
    """Install the run's body adapter into pipe.unet (body_lambda, ref_lambda) and load its VAE and regressor."""
    run_dir = Path(run_dir)
    if not (run_dir / ADAPTER_FILE).is_file():
        raise CheckpointError(f"no body adapter in {run_dir}: train one with python train.py --stage body "
                              "(it writes runs/body) and pass --run runs/body.")
    state = load_checkpoint(run_dir / ADAPTER_FILE, "body-adapter")
    if "unet" in state:  # the stage fine-tuned the UNet with the adapter (before the adapter renames its layers)
        load_unet_weights(dict(pipe.unet.named_parameters()), state["unet"], run_dir / ADAPTER_FILE)
    device = pipe.device
    vae, regressor = load_body_vae(run_dir / VAE_FILE, device), load_regressor(run_dir / REGRESSOR_FILE, device)
    body_projection = new_body_adapter(pipe.unet, BodyAdapterConfig(**state["config"]))
    ref_projection = ImageProjection(vae.cfg.feature_dim, pipe.unet.cfg.context_dim, state["config"]["ref_tokens"])
    load_ip_adapter(pipe.unet, body_projection, state["body"])
    load_ip_adapter(pipe.unet, ref_projection.to(device), state["ref"])
    set_body_lambdas(pipe.unet, ref_lambda, body_lambda)
    return BodyPrompter(vae, regressor, body_projection, ref_projection, state["train_config"]["seed"])


# ----------------------------------------------------------------------------------------------------------
# (c) the adapter
# ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def c_body_sets(vae: BodyVAE, references: dict, set_size: int, sets: int, seed: int) -> torch.Tensor:
    """c_body = mu [I, sets, D] of `sets` random subsets of `set_size` reference views of every identity."""
    I, R = references["image"].shape[:2]
    rng = step_rng(seed, 0, stream=4)
    mus = []
    for _ in range(sets):
        picks = torch.from_numpy(np.stack([rng.permutation(R)[:set_size] for _ in range(I)]))
        ids = torch.arange(I)[:, None]
        mus.append(vae.encode(*(references[k][ids, picks] for k in ("image", "keypoints", "visible")))[0])
    return torch.stack(mus, 1)


def _clip_text_embeddings(cfg: BodyStageConfig, captions: list[str], device):
    """(clip, text embeddings [N, d]) for L_clip, or (None, None) when beta_clip = 0."""
    if cfg.beta_clip == 0:
        return None, None
    from minildm.clip import load_clip

    if not cfg.clip_path or not Path(cfg.clip_path).is_file():
        raise ValueError("beta_clip > 0 needs a CLIP trained on body captions in clip_path; minildm has none yet "
                         "(its CLIP knows only shapes captions): set beta_clip = 0.")
    clip, tokenizer = load_clip(cfg.clip_path, device)
    clip.requires_grad_(False)
    with torch.no_grad():
        return clip, clip.encode_text(tokenizer.encode(captions).to(device))


def train_body_adapter(pipe: LatentDiffusion, vae: BodyVAE, regressor: KeypointRegressor, data: dict,
                       cfg: BodyStageConfig, run_dir: Path, device, base_dir: Path, resume: bool = False,
                       show_progress: bool = True) -> tuple[BodyPrompter, bool]:
    """Train the body-condition module on the frozen base; writes RUN/body_adapter.pt -> (prompter, finished)."""
    from minildm.train.ldm import encode_latent_cache

    torch.manual_seed(cfg.seed)
    targets, references = _flat(data["targets"]), data["references"]
    z0_all = encode_latent_cache(pipe.autoencoder, targets["image"], device=device, show_progress=show_progress)
    tokens_all = pipe.tokenizer.encode(data["pose_captions"])  # the body, not words, must carry the build
    empty = pipe.tokenizer.encode([""])
    mu_sets = c_body_sets(vae, references, cfg.set_size, cfg.sets_per_identity, cfg.seed)
    with torch.no_grad():  # reference features of every reference view [I, R, F] (regressor keypoints, as at sampling)
        ref_flat = _flat(references)["image"].to(device)
        kp, vis = regressor.predict(ref_flat)
        ref_feats = rearrange(vae.view_features(ref_flat, kp, vis), "(i r) f -> i r f", r=cfg.reference_views)
    clip, text_emb = _clip_text_embeddings(cfg, data["pose_captions"], device)

    adapter_cfg = BodyAdapterConfig(latent_dim=vae.cfg.latent_dim, context_dim=pipe.unet.cfg.context_dim,
                                    body_tokens=cfg.body_tokens, ref_tokens=cfg.ref_tokens)
    # The base UNet's own weights, by their names before the adapter wraps its attention layers (the wrappers
    # keep the same tensors, so these names still reach them afterwards).
    unet_weights = dict(pipe.unet.named_parameters())
    body_projection = new_body_adapter(pipe.unet, adapter_cfg)                 # installs the streams, freezes the UNet
    ref_projection = ImageProjection(vae.cfg.feature_dim, adapter_cfg.context_dim, cfg.ref_tokens).to(device)
    params = body_adapter_parameters(pipe.unet, body_projection, ref_projection)
    groups = [{"params": params}]
    if cfg.unet_lr_scale > 0:  # see BodyStageConfig.unet_lr_scale
        for w in unet_weights.values():
            w.requires_grad_(True)
        groups.append({"params": list(unet_weights.values()), "lr_scale": cfg.unet_lr_scale})
    print(f"body adapter: {sum(p.numel() for p in params):,} trainable parameters; "
          + (f"the UNet's {sum(w.numel() for w in unet_weights.values()):,} fine-tune at {cfg.unet_lr_scale} x lr; "
             if cfg.unet_lr_scale > 0 else "frozen UNet, ")
          + f"frozen prompt encoder, autoencoder, body VAE and regressor; L = L_diff + {cfg.alpha_id} L_id + "
          f"{cfg.beta_clip} L_clip")
    V, B, schedule = cfg.views_per_identity, cfg.adapter_batch, pipe.schedule

    def step_loss(step):
        rng = step_rng(cfg.seed, step)
        idx = rng.integers(len(z0_all), size=B)
        ids = torch.from_numpy(idx // V)
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        drop_text, drop_body = drop_conditions(B, cfg.drop_prob, gen)
        tokens = torch.where(drop_text[:, None], empty, tokens_all[idx])          # y = "" when the text is dropped
        pick = torch.from_numpy(rng.integers(cfg.sets_per_identity, size=B))
        c_body = torch.where(drop_body[:, None], 0.0, mu_sets[ids, pick]).to(device)  # a dropped body: c_body = 0
        e_ref = ref_feats[ids.to(device), torch.from_numpy(rng.integers(cfg.reference_views, size=B)).to(device)]
        ref_present = (torch.rand(B, generator=gen) < cfg.ref_prob).to(device)
        with torch.no_grad():
            c_t, mask = pipe.text_encoder(tokens.to(device))                       # frozen tau_theta(y)
        context = body_context(pipe.unet, c_t, body_projection(c_body), ref_projection(e_ref), ref_present)
        t = torch.randint(0, schedule.num_timesteps, (B,), generator=gen).to(device)
        z0 = z0_all[torch.from_numpy(idx)].to(device)
        eps = torch.randn(z0.shape, generator=gen).to(device)
        z_t = schedule.q_sample(z0, t, eps)                                        # property 1
        eps_hat = pipe.unet(z_t, t, context, mask)
        x0_image = (predicted_x0_image(schedule, pipe.autoencoder, z_t, t, eps_hat)
                    if cfg.alpha_id > 0 or cfg.beta_clip > 0 else None)
        return bolid_loss(eps_hat, eps, x0_image, cfg.alpha_id, cfg.beta_clip, regressor,
                          targets["keypoints"][idx].to(device), targets["visible"][idx].to(device), clip,
                          None if text_emb is None else text_emb[torch.from_numpy(idx).to(device)])  # eq. 14

    def save():
        state = {"body": ip_adapter_state_dict(pipe.unet, body_projection, BODY),
                 "ref": ip_adapter_state_dict(pipe.unet, ref_projection, IP), "config": asdict(adapter_cfg),
                 "train_config": asdict(cfg), "base": str(base_dir)}
        if cfg.unet_lr_scale > 0:  # the fine-tuned UNet; ldm.pt keeps the base
            state["unet"] = {name: w.detach().clone() for name, w in unet_weights.items()}
        return state

    def load(state):
        load_ip_adapter(pipe.unet, body_projection, state["body"])
        load_ip_adapter(pipe.unet, ref_projection, state["ref"])
        if "unet" in state:
            load_unet_weights(unet_weights, state["unet"], run_dir / ADAPTER_FILE)

    body_projection.train()
    ref_projection.train()
    log, finished = fit(groups, cfg.adapter_steps, step_loss, cfg.adapter_lr, "body adapter",
                        {"save": save, "load": load}, run_dir / ADAPTER_FILE, "body-adapter", resume, show_progress,
                        warmup=min(20, cfg.adapter_steps // 10))
    plot_curves({k: log.history[k] for k in ("diff", "id", "clip") if k in log.history}, run_dir / "body_adapter_loss.png",
                title="body adapter: eq. 14 terms")
    return BodyPrompter(vae, regressor, body_projection, ref_projection, cfg.seed), finished


def preview(pipe: LatentDiffusion, prompter: BodyPrompter, cfg: BodyStageConfig, path: Path) -> None:
    """Identities 0-3 (rows; first column: one of their reference views) in four prompted poses."""
    poses = ["standing", "raising the left arm", "raising both arms", "holding both arms out"]
    rows = []
    for i in range(4):
        views = identity_views(i, REFERENCE_VIEWS, cfg.image_size, cfg.seed)
        cond, uncond = prompter.extra_tokens(prompter.c_body(views["image"], views["keypoints"], views["visible"]))
        images = pipe.generate([pose_caption(p) for p in poses], steps=cfg.preview_steps, guidance_scale=3.0, seed=i,
                               extra_tokens=(cond, uncond))
        rows.append(torch.cat([(views["image"][:1].to(images) + 1) / 2, images]))
    save_grid(torch.cat(rows), path, nrow=len(poses) + 1, upscale=4)


# ----------------------------------------------------------------------------------------------------------
# The whole stage
# ----------------------------------------------------------------------------------------------------------
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

        images = _flat(data["targets"])["image"]
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
