"""Step (c) of the body stage: the body-condition module on the frozen base (BoLID's eq. 14), trained through
the one loop (train/common.py: fit) with the UNet fine-tuning beside it at `unet_lr_scale` x the lr."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from einops import rearrange

from minildm.adapters.body import (ADAPTER_FILE, BODY, BodyAdapterConfig, BodyPrompter, body_adapter_parameters, body_context,
                                   bolid_loss, load_unet_weights, new_body_adapter, predicted_x0_image)
from minildm.adapters.body_vae import BodyVAE
from minildm.adapters.ip_adapter import IP, ImageProjection, drop_conditions, ip_adapter_state_dict, load_ip_adapter
from minildm.adapters.keypoint_regressor import KeypointRegressor
from minildm.data.bodies import pose_caption
from minildm.data.body_render import REFERENCE_VIEWS, identity_views
from minildm.pipeline import LatentDiffusion
from minildm.progress import step_rng
from minildm.train.body_data import flat_views
from minildm.train.common import Checkpoint, fit
from minildm.train.ldm import encode_latent_cache
from minildm.viz import plot_curves, save_grid


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


def _clip_text_embeddings(cfg, captions: list[str], device):
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
                       cfg, run_dir: Path, device, base_dir: Path, resume: bool = False,
                       show_progress: bool = True) -> tuple[BodyPrompter, bool]:
    """Train the body-condition module on the frozen base; writes RUN/body_adapter.pt -> (prompter, finished)."""
    torch.manual_seed(cfg.seed)
    targets, references = flat_views(data["targets"]), data["references"]
    z0_all = encode_latent_cache(pipe.autoencoder, targets["image"], device=device, show_progress=show_progress)
    tokens_all = pipe.tokenizer.encode(data["pose_captions"])  # the body, not words, must carry the build
    empty = pipe.tokenizer.encode([""])
    mu_sets = c_body_sets(vae, references, cfg.set_size, cfg.sets_per_identity, cfg.seed)
    with torch.no_grad():  # reference features of every reference view [I, R, F] (regressor keypoints, as at sampling)
        ref_flat = flat_views(references)["image"].to(device)
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
    run = fit(step_loss, torch.optim.Adam(groups, lr=cfg.adapter_lr), cfg.adapter_steps,
              Checkpoint(run_dir / ADAPTER_FILE, "body-adapter", save, load), lr=cfg.adapter_lr,
              warmup=min(20, cfg.adapter_steps // 10), resume=resume, desc="body adapter", show_progress=show_progress,
              device=device)
    plot_curves({k: run.log.history[k] for k in ("diff", "id", "clip") if k in run.log.history},
                run_dir / "body_adapter_loss.png", title="body adapter: eq. 14 terms")
    return BodyPrompter(vae, regressor, body_projection, ref_projection, cfg.seed), run.finished


def preview(pipe: LatentDiffusion, prompter: BodyPrompter, cfg, path: Path) -> None:
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
