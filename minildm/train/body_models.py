"""Step (b) of the body stage: the keypoint regressor (the measuring network) and the body VAE (eqs. 11-13),
each trained through the one loop (train/common.py: fit), resumable and Ctrl-C safe."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from minildm.adapters.body_vae import BodyVAE, BodyVAEConfig
from minildm.adapters.keypoint_regressor import KeypointRegressor
from minildm.data.body_render import VIEW_KEYS
from minildm.progress import LossLog, step_rng
from minildm.train.body_data import flat_views
from minildm.train.common import Checkpoint, fit


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
    views = {k: v.to(device) for k, v in (flat_views(views) if views["image"].dim() == 5 else views).items()}
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

    ckpt = Checkpoint(path, "keypoint-regressor", lambda: {"model": model.state_dict(), "num_keypoints": model.num_keypoints},
                      lambda saved: model.load_state_dict(saved["model"]))
    run = fit(step_loss, torch.optim.Adam(model.parameters(), lr=lr), steps, ckpt, lr=lr, warmup=steps // 10,
              resume=resume, desc="keypoint regressor", show_progress=show_progress, device=device)
    return model.eval(), run.log, run.finished


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

    ckpt = Checkpoint(path, "body-vae", lambda: {"model": vae.state_dict(), "config": asdict(cfg),
                                                 "num_identities": num_identities, "seed": seed},
                      lambda saved: vae.load_state_dict(saved["model"]))
    run = fit(step_loss, torch.optim.Adam(vae.parameters(), lr=lr), steps, ckpt, lr=lr, resume=resume,
              desc="body VAE", show_progress=show_progress, device=device)
    return vae.eval(), run.log, run.finished
