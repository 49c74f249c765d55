"""Lesson 15: BoLID's body VAE (Kazachkov & Filatov). Gaussian keypoint weighting (eqs. 11-13) for several sigma and
alpha, one person in several views, and a short training of the body VAE whose latent c_body should
separate people (PCA of the latents, coloured by identity).

    python lessons/15_body_vae/lesson.py            (about 2-3 minutes on a CPU)
    python lessons/15_body_vae/lesson.py --quick    (seconds; the VAE barely trains)

Figures go to lessons/15_body_vae/out/. Your exercises.py functions are used once you have filled them in;
until then the library's versions are.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from einops import rearrange  # noqa: E402

from lessons.common import QUICK, ROOT, exercises_of, load_module, out_dir  # noqa: E402
from lessons.grading import mine_or_reference  # noqa: E402
from minildm.adapters.body_vae import BodyVAEConfig, keypoint_gaussians  # noqa: E402
from minildm.data.bodies import COCO_KEYPOINTS, View, identity, pose_caption, random_view  # noqa: E402
from minildm.data.body_render import BodiesDataset, pose_keypoints, render_body, render_identities  # noqa: E402
from minildm.train.body_models import train_body_vae  # noqa: E402

OUT = out_dir(__file__)
SIGMAS = (1.5, 3.0, 6.0)  # pixels, on 64x64 people
ALPHAS = (0.0, 0.25, 0.5, 1.0)
# The body VAE of section 3: 32x32 people (sigma halves with the size), a small network, a 16-d c_body.
VAE_CFG = BodyVAEConfig(image_size=32, channels=(16, 32, 64), feature_dim=128, latent_dim=16, keypoint_sigma=1.5,
                        weight_alpha=0.25, beta_kl=0.01)
NUM_IDS, TRAIN_VIEWS, HELD_OUT = (6, 6, 2) if QUICK else (12, 16, 4)  # identities; rendered views of each
STEPS = 15 if QUICK else 600


def load_exercises() -> dict:
    exercises = exercises_of(__file__)
    reference = load_module(Path(__file__).with_name("grade.py")).REFERENCE
    fns = {name: mine_or_reference(exercises, name, ref) for name, ref in reference.items()}
    for name, fn in fns.items():
        print(f"  {name:<26} {'yours' if fn is not reference[name] else 'library (exercise not filled in yet)'}")
    return fns


def show(ax, image: torch.Tensor, title: str = "") -> None:
    """image [3, H, W] in [-1, 1] (a model image; weighting pulls it toward 0, i.e. mid-grey)."""
    ax.imshow(rearrange((image.clamp(-1, 1) + 1) / 2, "c h w -> h w c").numpy(), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=7)


def as_model_image(image: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] from render_body -> [3, H, W] in [-1, 1]."""
    return torch.from_numpy(rearrange(image, "h w c -> c h w").astype(np.float32)) / 127.5 - 1


print("exercises:")
fns = load_exercises()
weights_fn, weight_image_fn = fns["gaussian_keypoint_weights"], fns["weight_image"]

# --- 1. Weighting maps for several sigma and alpha (eqs. 11-13) --------------------------------------------
person = identity(3)
image, kp, vis = render_body(person, View.from_pose("raising the left arm", yaw=0.5), 64)
image, kp, vis = as_model_image(image), torch.from_numpy(kp), torch.from_numpy(vis)
fig, axes = plt.subplots(len(SIGMAS), 2 + len(ALPHAS), figsize=(1.6 * (2 + len(ALPHAS)), 1.75 * len(SIGMAS)))
for r, sigma in enumerate(SIGMAS):
    W = weights_fn(kp, vis, 64, 64, sigma)  # W_norm [64, 64]
    show(axes[r, 0], image, "image + visible keypoints" if r == 0 else "")
    axes[r, 0].scatter(kp[vis, 0], kp[vis, 1], s=4, c="yellow", edgecolors="black", linewidths=0.3)
    axes[r, 1].imshow(W.numpy(), cmap="gray", vmin=0, vmax=1)
    axes[r, 1].set(xticks=[], yticks=[])
    axes[r, 1].set_title(f"W_norm, sigma = {sigma}", fontsize=7)
    for c, alpha in enumerate(ALPHAS):
        show(axes[r, 2 + c], weight_image_fn(image, W, alpha), f"I_w, alpha = {alpha}")
fig.suptitle("eqs. 11-13: I_w = I (alpha + (1 - alpha) W_norm), W = max_i exp(-d_i^2 / 2 sigma^2) "
             "(hidden keypoints left out)", fontsize=8)
fig.tight_layout()
fig.savefig(OUT / "weighting.png", dpi=130)
plt.close(fig)
print(f"1. weighting maps, sigma in {SIGMAS} px, alpha in {ALPHAS} -> out/weighting.png "
      f"({int(vis.sum())} of 17 keypoints visible at yaw 0.5)")

# Why the max: five face keypoints crowd together; summing bumps makes the face outshine the rest of the body.
bumps = keypoint_gaussians(kp, vis, 64, 64, 4.0)  # w_i [17, 64, 64]
W_max, W_sum = weights_fn(kp, vis, 64, 64, 4.0), bumps.sum(0) / bumps.sum(0).max()
fig, axes = plt.subplots(1, 2, figsize=(4.4, 2.4))
for ax, W, title in ((axes[0], W_max, "max (eq. 12)"), (axes[1], W_sum, "sum, then normalised")):
    ax.imshow(W.numpy(), cmap="gray", vmin=0, vmax=1)
    ax.set(xticks=[], yticks=[])
    ax.set_title(title, fontsize=8)
fig.tight_layout()
fig.savefig(OUT / "max_vs_sum.png", dpi=130)
plt.close(fig)
visible_kp = kp[vis]
gaps = torch.cdist(visible_kp, visible_kp) + torch.eye(len(visible_kp)) * 1e9
lone = int(gaps.min(dim=1).values.argmax())  # the visible keypoint farthest from its nearest neighbour
name = [n for n, v in zip(COCO_KEYPOINTS, vis) if v][lone]
x, y = (int(round(v)) for v in visible_kp[lone].tolist())
print(f"   max vs sum at sigma 4: weight on the lone {name} {W_max[y, x]:.2f} (max) vs {W_sum[y, x]:.2f} (sum) "
      "-> out/max_vs_sum.png")

# --- 2. One identity in several views: what the body VAE reads --------------------------------------------
rng = np.random.default_rng(0)
views = [random_view(rng) for _ in range(6)]
fig, axes = plt.subplots(2, len(views), figsize=(1.45 * len(views), 3.4))
for c, view in enumerate(views):
    img, kp_v, vis_v = render_body(person, view, 64)
    img, kp_v, vis_v = as_model_image(img), torch.from_numpy(kp_v), torch.from_numpy(vis_v)
    show(axes[0, c], img, f"{view.name}\nyaw {math.degrees(view.yaw):+.0f} deg")
    axes[0, c].scatter(kp_v[vis_v, 0], kp_v[vis_v, 1], s=3, c="yellow", edgecolors="black", linewidths=0.3)
    show(axes[1, c], weight_image_fn(img, weights_fn(kp_v, vis_v, 64, 64, 3.0), 0.25))
axes[0, 0].set_ylabel("view", fontsize=7)
axes[1, 0].set_ylabel("I_w (sigma 3, alpha 0.25)", fontsize=7)
fig.suptitle("one identity (the same body shape and clothes) in six views, and the weighted views the VAE reads",
             fontsize=8)
fig.tight_layout()
fig.savefig(OUT / "identity_views.png", dpi=130)
plt.close(fig)
print(f"2. one identity in {len(views)} views -> out/identity_views.png")

# --- 3. A short training of the body VAE, and its latent space --------------------------------------------
data = BodiesDataset(NUM_IDS, TRAIN_VIEWS + HELD_OUT, size=VAE_CFG.image_size, seed=0)
rendered = render_identities(data)  # [I, V, ...]: the first TRAIN_VIEWS views train, the rest are held out
train = {k: v[:, :TRAIN_VIEWS] for k, v in rendered.items()}
held = {k: v[:, TRAIN_VIEWS:] for k, v in rendered.items()}
print(f"3. training the body VAE: {NUM_IDS} identities x {TRAIN_VIEWS} views at {VAE_CFG.image_size} px, "
      f"sets of 2 views, {STEPS} steps, beta_kl = {VAE_CFG.beta_kl}")
vae, history, _ = train_body_vae(VAE_CFG, train, steps=STEPS, batch_size=16, views_per_set=2, show_progress=not QUICK)

fig, ax = plt.subplots(figsize=(5, 3))
steps, recon = zip(*history.history["recon"])
ax.plot(steps, recon, lw=0.8, label="recon (sum of squares per view)")
ax.set(xlabel="step", ylabel="recon", yscale="log")
ax2 = ax.twinx()
ax2.plot(steps, [v for _, v in history.history["kl"]], lw=0.8, color="tab:red", label="KL (nats per set)")
ax2.set_ylabel("KL", color="tab:red")
fig.legend(fontsize=7, loc="upper right")
fig.tight_layout()
fig.savefig(OUT / "vae_loss.png", dpi=130)
plt.close(fig)


@torch.no_grad()
def encode(views: dict, idx) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu, logvar) [I, D] of the set of views `idx` of every identity."""
    return vae.encode(*(views[k][:, idx] for k in ("image", "keypoints", "visible")))


singles = torch.stack([encode(rendered, [v])[0] for v in range(TRAIN_VIEWS + HELD_OUT)], dim=1)  # [I, V, D]
held_sets, held_logvar = encode(held, list(range(HELD_OUT)))  # one set of all held-out views per identity
centroids = singles[:, :TRAIN_VIEWS].mean(dim=1)  # [I, D]: mean latent of each identity's training views
nearest = torch.cdist(rearrange(singles[:, TRAIN_VIEWS:], "i v d -> (i v) d"), centroids).argmin(dim=1)
truth = torch.arange(NUM_IDS).repeat_interleave(HELD_OUT)
acc_single = (nearest == truth).float().mean().item()
acc_set = (torch.cdist(held_sets, centroids).argmin(dim=1) == torch.arange(NUM_IDS)).float().mean().item()
print(f"   held-out views, nearest identity centroid: one view {acc_single:.2f}, a set of {HELD_OUT} views "
      f"{acc_set:.2f} (chance {1 / NUM_IDS:.2f})")

flat = rearrange(singles, "i v d -> (i v) d")
mean = flat.mean(dim=0)
_, _, V = torch.pca_lowrank(flat, q=2, center=True)  # principal directions [D, 2]
xy, xy_sets = (flat - mean) @ V, (held_sets - mean) @ V
colours = plt.cm.tab20(np.arange(NUM_IDS) % 20)
fig, ax = plt.subplots(figsize=(5, 4.2))
ax.scatter(xy[:, 0], xy[:, 1], s=10, c=np.repeat(colours, TRAIN_VIEWS + HELD_OUT, axis=0), alpha=0.7)
ax.scatter(xy_sets[:, 0], xy_sets[:, 1], s=140, c=colours, marker="*", edgecolors="black", linewidths=0.7)
ax.set(xlabel="PC 1", ylabel="PC 2",
       title=f"body-VAE mu, PCA to 2-D, coloured by identity\n(dots: single views; stars: a set of "
             f"{HELD_OUT} held-out views)")
ax.title.set_fontsize(8)
fig.tight_layout()
fig.savefig(OUT / "latent_pca.png", dpi=130)
plt.close(fig)
print("   -> out/latent_pca.png, out/vae_loss.png")

# Your reparameterize and kl_divergence on the trained encoder's output.
kl = fns["kl_divergence"](held_sets, held_logvar)
eps = torch.randn(held_sets.shape, generator=torch.Generator().manual_seed(0))
z = fns["reparameterize"](held_sets, held_logvar, eps)
sigma = (0.5 * held_logvar).exp()
print(f"   KL(q(c_body | held-out set) || N(0, I)): mean {kl.mean().item():.2f} nats per identity; "
      f"posterior std exp(logvar / 2) from {sigma.min().item():.3f} to {sigma.max().item():.3f}")

# Same pose, different c_body: the decoder draws the pose from its keypoints and the body from c_body.
pose_view = View.from_pose("holding both arms out", yaw=0.3)
pose = torch.from_numpy(pose_keypoints(pose_view, VAE_CFG.image_size))
shown = list(range(min(6, NUM_IDS)))
with torch.no_grad():
    decoded = vae.decode(z[shown], pose.expand(len(shown), -1, -1))
fig, axes = plt.subplots(2, len(shown), figsize=(1.3 * len(shown), 2.9))
for c, i in enumerate(shown):
    img, kp_i, vis_i = render_body(data.shapes[i], pose_view, VAE_CFG.image_size)
    show(axes[0, c], vae.weigh(as_model_image(img), torch.from_numpy(kp_i), torch.from_numpy(vis_i)),
         f"identity {i}: real")
    show(axes[1, c], decoded[c], "decode(z, pose)")
fig.suptitle("same pose, each identity's c_body from a held-out set (z = your reparameterize)", fontsize=8)
fig.tight_layout()
fig.savefig(OUT / "same_pose.png", dpi=130)
plt.close(fig)
print("   same pose decoded from each identity's c_body -> out/same_pose.png")

# --- 4. One identity in several prompted poses, with the trained body adapter ----------------------------
RUN = ROOT / "runs" / "body"
if QUICK:  # quick mode never reads runs/ (its output must not depend on what a user trained)
    print("4. skipped in --quick mode: without --quick, a trained body run (python train.py --stage body) shows "
          "one identity in several prompted poses (out/one_identity_poses.png).")
elif not (RUN / "body_adapter.pt").is_file():
    print(f"4. no trained body run in {RUN.relative_to(ROOT)}: `python train.py --stage body` makes one (about 2 "
          "CPU-hours: base model of people, regressor, body VAE, adapter); run this lesson again to see one "
          "identity in several prompted poses (out/one_identity_poses.png).")
else:
    from minildm.pipeline import LatentDiffusion
    from minildm.adapters.body import load_body_prompter
    from minildm.data.body_render import identity_views

    base = LatentDiffusion.load(RUN)  # ldm.pt: the text-only base model
    pipe = LatentDiffusion.load(RUN)
    prompter = load_body_prompter(pipe, RUN)  # the stage's UNet (fine-tuned with the adapter) + the body stream
    poses = ["standing", "raising the left arm", "raising the right arm", "raising both arms", "holding both arms out"]
    people = (1000, 1001)  # identity numbers the run never trained on
    rows = []
    with torch.no_grad():
        for who in people:
            views = identity_views(who, size=pipe.image_size, seed=prompter.seed)
            c_body = prompter.c_body(views["image"], views["keypoints"], views["visible"])
            captions = [pose_caption(p) for p in poses]
            body = pipe.generate(captions, steps=25, seed=0, extra_tokens=prompter.extra_tokens(c_body))
            text = base.generate(captions, steps=25, seed=0)  # the text-only base model, same noise
            rows.append((views["image"], body, text))
    fig, axes = plt.subplots(2 * len(rows), len(poses) + 1, figsize=(1.3 * (len(poses) + 1), 2.7 * len(rows)))
    axes = np.atleast_2d(axes)
    for r, (refs, body, text) in enumerate(rows):
        show(axes[2 * r, 0], refs[0], f"identity {people[r]}\n(1 of 4 views)")
        axes[2 * r + 1, 0].axis("off")
        for c, pose in enumerate(poses):
            show(axes[2 * r, c + 1], body[c] * 2 - 1, pose.replace("holding ", "").replace("raising ", "") + "\nbody stream")
            show(axes[2 * r + 1, c + 1], text[c] * 2 - 1, "text only")
    fig.suptitle("one person (c_body from 4 views) in prompted poses; same noise with the body stream off", fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT / "one_identity_poses.png", dpi=130)
    plt.close(fig)
    print(f"4. identities {people} in {len(poses)} prompted poses with the body adapter of {RUN.relative_to(ROOT)} "
          "(top) and without it (bottom) -> out/one_identity_poses.png")
