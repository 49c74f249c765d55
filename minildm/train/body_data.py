"""The body stage's rendered people: the base model's and the adapter's training views and captions, and the
views the keypoint regressor and the body VAE learn from (each group of further people from its own seed, so
none of them is ever one of the stage's unseen test people)."""
from __future__ import annotations

import numpy as np
import torch
from einops import rearrange

from minildm.data.bodies import build_phrases, pose_caption, shape_vector, shirt_name
from minildm.data.body_render import VIEW_KEYS, BodiesDataset, render_identities


def described_caption(shape, pose_name: str, keep: float, rng: np.random.Generator) -> str:
    """The base model's caption of one view: the pose, and each of the person's build_phrases and their shirt
    colour kept with probability `keep` ("a person with long legs in a red shirt raising both arms")."""
    build = [phrase for phrase in build_phrases(shape) if rng.random() < keep]
    return pose_caption(pose_name, build, shirt_name(shape) if rng.random() < keep else None)


def render_stage_data(cfg) -> dict:
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


def encoder_views(cfg) -> tuple[dict, torch.Tensor]:
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


def regressor_views(cfg, everything: dict) -> dict:
    """The keypoint regressor's training views [N, ...]: every view of encoder_views (`everything`) and 4 views
    of each of cfg.regressor_people more people (seed + 2: never the stage's test people either)."""
    views = [flat_views(everything)]
    if cfg.regressor_people:
        views.append(flat_views(render_identities(BodiesDataset(cfg.regressor_people, 4, cfg.image_size, cfg.seed + 2))))
    return {k: torch.cat([v[k] for v in views]) for k in VIEW_KEYS}


def vae_views(cfg, everything: dict, shapes: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """The body VAE's training views {key: [I, V, ...]} and shape_vector [I, S]: encoder_views (`everything`,
    `shapes`) and cfg.vae_people more people in the same V views (seed + 3: never the stage's test people)."""
    if not cfg.vae_people:
        return everything, shapes
    people = BodiesDataset(cfg.vae_people, everything["image"].shape[1], cfg.image_size, cfg.seed + 3)
    views = render_identities(people)
    more = torch.from_numpy(np.stack([shape_vector(s) for s in people.shapes]))
    return {k: torch.cat([everything[k], views[k]]) for k in VIEW_KEYS}, torch.cat([shapes, more])


def flat_views(views: dict) -> dict:
    """{key: [I, V, ...]} -> {key: [I * V, ...]}."""
    return {k: rearrange(v, "i v ... -> (i v) ...") for k, v in views.items()}
