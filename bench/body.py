"""BoLID body identity on a trained body run: identity retrieval from c_body, and the body shape of generated people.

    python train.py --stage body                          # runs/body, about 2 hours on 2 CPU cores
    python bench/lesson_numbers.py lesson15_body          # these tables at the defaults, for lesson 15's README
    python bench/body.py --run runs/body [--samples 16] [--steps 50]      # the same for other settings, printed

How each setting of the body stage was chosen (the experiments behind BodyStageConfig) is written up in
bench/results/body.md. Everything here uses people the
run never saw (identity numbers after its training identities) and fresh views of them (random stream 5).

- retrieval: each of 20 unseen identities gets a gallery c_body (mu of 4 views) and queries (mu of 4 other
  views as one set, and each of those views alone); a query is right when its nearest gallery c_body
  (Euclidean) is its own identity. Repeated with all 20 people in the same clothes and skin, so only the
  body shape can tell them apart.
- body shape of generated people: for every identity and pose prompt in EVAL_POSES (limbs near the image
  plane, so 2-D lengths are fair), --samples images from the text-only base model (ldm.pt; the body stage
  fine-tunes its own copy of the UNet), from the base model told the person's build and shirt in words
  (build_phrases: "long legs", "short torso"; only thirds of each range, never numbers) and from the body
  stream (body_lambda = 1, c_body from the gallery views, no reference image, the pose caption alone). The run's
  keypoint regressor reads each image; limb_ratios gives arm / torso and leg / torso; per identity the
  ratios are averaged over its images and compared with the identity's true ratios (mean absolute error over
  both ratios, then over identities), and the slope of those per-identity means against the truth shows
  whether the images follow each body at all. The same regressor on real renders of the identities in those
  poses gives the floor (and, by its slope, how much of the true spread of proportions the regressor can
  see). Pose prompts hold when `pose_holds` reads the prompted arms (up / out / down) back from the
  regressor's keypoints.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from einops import rearrange  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from machine import machine  # noqa: E402  (bench/machine.py)
from minildm.adapters.body import ADAPTER_FILE, VAE_FILE, load_body_prompter, set_body_lambdas  # noqa: E402
from minildm.adapters.body_vae import load_body_vae  # noqa: E402
from minildm.checkpoint import load_checkpoint  # noqa: E402
from minildm.data.bodies import build_phrases, identity, pose_caption, random_view, shirt_name  # noqa: E402
from minildm.data.body_measure import LIMB_RATIOS, limb_ratios, pose_holds, true_limb_ratios  # noqa: E402
from minildm.data.body_render import render_body  # noqa: E402
from minildm.pipeline import LatentDiffusion  # noqa: E402
from minildm.viz import save_grid  # noqa: E402

EVAL_POSES = ("standing", "raising the left arm", "raising the right arm", "raising both arms")
TEXT_ONLY, BODY_STREAM = "text only (the base model)", "body stream (body_lambda = 1, no reference)"
GALLERY, QUERY = 4, 4  # views per identity
SAME_CLOTHES = dict(shirt=(200, 50, 50), trousers=(45, 50, 80), skin=(214, 160, 120))


def render(shape, views, size) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views of one body -> (images [n, 3, H, W] in [-1, 1], keypoints [n, 17, 2], visible [n, 17])."""
    out = [render_body(shape, v, size) for v in views]
    images = torch.from_numpy(np.stack([o[0] for o in out])).float() / 127.5 - 1
    return (rearrange(images, "n h w c -> n c h w"), torch.from_numpy(np.stack([o[1] for o in out])),
            torch.from_numpy(np.stack([o[2] for o in out])))


def retrieval(encode, shapes: list, size: int, seed: int) -> tuple[float, float]:
    """(top-1 of sets of QUERY views, top-1 of single views) among len(shapes) identities.

    encode: (images [n, 3, H, W], keypoints [n, 17, 2], visible [n, 17]) -> c_body [1, D] of those n views."""
    gallery, query_sets, query_singles = [], [], []
    for i, shape in enumerate(shapes):
        rng = np.random.default_rng([seed, 5, i])
        images, kp, vis = render(shape, [random_view(rng) for _ in range(GALLERY + QUERY)], size)
        gallery.append(encode(images[:GALLERY], kp[:GALLERY], vis[:GALLERY]))
        query_sets.append(encode(images[GALLERY:], kp[GALLERY:], vis[GALLERY:]))
        query_singles += [encode(images[j:j + 1], kp[j:j + 1], vis[j:j + 1]) for j in range(GALLERY, GALLERY + QUERY)]
    gallery, query_sets, query_singles = torch.cat(gallery), torch.cat(query_sets), torch.cat(query_singles)
    n = len(shapes)
    top1_sets = (torch.cdist(query_sets, gallery).argmin(1) == torch.arange(n)).float().mean().item()
    top1_single = (torch.cdist(query_singles, gallery).argmin(1) == torch.arange(n).repeat_interleave(QUERY)).float().mean().item()
    return top1_sets, top1_single


def retrieval_table(encode, n_train: int, identities: int, size: int, seed: int) -> dict:
    """{row name: (top-1 of sets, top-1 of single views)} for unseen people, the same in one outfit, and
    training people in fresh views."""
    shapes = [identity(n_train + k, seed) for k in range(identities)]
    return {"unseen people": retrieval(encode, shapes, size, seed),
            "unseen people, all in the same clothes and skin": retrieval(
                encode, [replace(s, **SAME_CLOTHES) for s in shapes], size, seed),
            "training people, fresh views": retrieval(encode, [identity(i, seed) for i in range(identities)],
                                                      size, seed + 1)}


def retrieval_lines(ret: dict, identities: int) -> list[str]:
    return ["| identities | top-1, set of 4 views | top-1, single view |", "|---|---|---|",
            *[f"| {name} ({identities}) | **{a:.2f}** | {b:.2f} |" for name, (a, b) in ret.items()]]


def read_bodies(regressor, images01: torch.Tensor, poses: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Images [N, 3, H, W] in [0, 1] -> (limb ratios [N, 2] (NaN: unmeasurable), pose held [N] bool)."""
    kp, vis = regressor.predict(images01 * 2 - 1)
    kp, vis = kp.cpu().numpy(), vis.cpu().numpy()
    ratios = np.stack([limb_ratios(k, v) for k, v in zip(kp, vis)])
    held = np.array([pose_holds(p, k, v) for p, k, v in zip(poses, kp, vis)])
    return ratios, held


def identity_means(ratios: np.ndarray, ids: np.ndarray, n: int) -> np.ndarray:
    """Per-identity mean of the measured ratios [n, 2] (NaN-aware: unmeasurable images are skipped)."""
    return np.stack([np.nanmean(ratios[ids == i], axis=0) for i in range(n)])


def shape_error(ratios: np.ndarray, ids: np.ndarray, truth: np.ndarray) -> tuple[float, float, float]:
    """(per-identity error of the mean ratios, per-image error, fraction of images measurable)."""
    per_id = np.nanmean(np.abs(identity_means(ratios, ids, len(truth)) - truth), axis=1)
    per_image = np.nanmean(np.abs(ratios - truth[ids]))
    return float(np.nanmean(per_id)), float(per_image), float(np.isfinite(ratios).all(axis=1).mean())


def spread_followed(ratios: np.ndarray, ids: np.ndarray, truth: np.ndarray) -> list[float]:
    """Least-squares slope of the per-identity mean ratio against the true ratio, one per LIMB_RATIOS:
    1 = the images follow every identity's proportions, 0 = the same body whoever was asked for. On real
    renders it says how much of the true spread the regressor can see at all."""
    means = identity_means(ratios, ids, len(truth))
    slopes = []
    for j in range(truth.shape[1]):
        ok = np.isfinite(means[:, j])
        x, y = truth[ok, j] - truth[ok, j].mean(), means[ok, j] - means[ok, j].mean()
        slopes.append(float((x * y).sum() / (x * x).sum()))  # cov(true, measured) / var(true)
    return slopes


def measure(run: Path, identities: int = 20, samples: int = 8, steps: int = 25, guidance: float = 3.0) -> str:
    """The run's description, the retrieval table and the body-shape table as markdown (what lesson 15 quotes,
    through `python bench/lesson_numbers.py lesson15_body`). Sample grids go to bench/out/body/."""
    run = Path(run)
    state = load_checkpoint(run / ADAPTER_FILE, "body-adapter")
    cfg = state["train_config"]
    base = LatentDiffusion.load(run)  # the text rows: ldm.pt exactly (the stage fine-tunes a copy of its UNet)
    pipe = LatentDiffusion.load(run)
    prompter = load_body_prompter(pipe, run)
    size, seed, n_train = pipe.image_size, cfg["seed"], cfg["num_identities"]
    shapes = [identity(n_train + k, seed) for k in range(identities)]

    # 1. identity retrieval from c_body
    ret = retrieval_table(prompter.c_body, n_train, identities, size, seed)

    # 2. body shape of generated people
    truth = np.stack([true_limb_ratios(s) for s in shapes])
    jobs = [(i, pose) for i in range(len(shapes)) for pose in EVAL_POSES for _ in range(samples)]
    ids = np.array([i for i, _ in jobs])
    poses = [pose for _, pose in jobs]
    c_body = []
    for i, s in enumerate(shapes):
        rng = np.random.default_rng([seed, 5, i])
        images, kp, vis = render(s, [random_view(rng) for _ in range(GALLERY)], size)
        c_body.append(prompter.c_body(images, kp, vis))
    c_body = torch.cat(c_body)[torch.from_numpy(ids)]
    rows = {}
    real = torch.cat([render(shapes[i], [random_view(np.random.default_rng([seed, 6, k]), pose)], size)[0]
                      for k, (i, pose) in enumerate(jobs)])
    rows["real renders (regressor floor)"] = read_bodies(prompter.regressor, (real + 1) / 2, poses)
    train_mean = np.stack([true_limb_ratios(identity(i, seed)) for i in range(n_train)]).mean(0)
    pose_only = [pose_caption(pose) for pose in poses]
    in_words = [pose_caption(pose, build_phrases(shapes[i]), shirt_name(shapes[i])) for i, pose in jobs]
    set_body_lambdas(pipe.unet, 0.0, 1.0)  # no reference image: ref_lambda = 0
    for name, (use_body, captions, file) in {
            TEXT_ONLY: (False, pose_only, "text"),
            "text with the person's build and shirt in words (the base model)": (False, in_words, "words"),
            BODY_STREAM: (True, pose_only, "body")}.items():
        images = []
        for b in tqdm(range(0, len(jobs), 64), desc=file, leave=False):
            sampling = dict(steps=steps, guidance_scale=guidance, seed=b)
            if use_body:
                tokens = prompter.extra_tokens(c_body[b:b + 64])
                images.append(pipe.generate(captions[b:b + 64], **sampling, extra_tokens=tokens))
            else:
                images.append(base.generate(captions[b:b + 64], **sampling))
        images = torch.cat(images)
        rows[name] = read_bodies(prompter.regressor, images, poses)
        save_grid(images[:len(EVAL_POSES) * samples * 4], ROOT / "bench" / "out" / "body" / f"{file}.png",
                  nrow=len(EVAL_POSES) * samples, upscale=3)

    errors = {name: shape_error(r, ids, truth) for name, (r, _) in rows.items()}
    held = {name: h.mean() for name, (_, h) in rows.items()}
    slopes = {name: spread_followed(r, ids, truth) for name, (r, _) in rows.items()}
    mean_body_error = float(np.mean(np.abs(truth - train_mean)))
    text_err, body_err = errors[TEXT_ONLY][0], errors[BODY_STREAM][0]
    seconds = state.get("seconds", {})
    lines = [
        f"Run: {cfg['num_identities']} training identities x ({cfg['views_per_identity']} training + "
        f"{cfg['reference_views']} reference) views at {size}x{size}; base `{cfg['base']['name']}` "
        f"(autoencoder {cfg['base']['vq_train']['steps']} steps, LDM {cfg['base']['ldm']['steps']} steps x batch "
        f"{cfg['base']['ldm']['batch_size']}); keypoint regressor {cfg['regressor_steps']} steps; body VAE "
        f"{cfg['vae_steps']} steps, c_body in R^{cfg['vae']['latent_dim']}, beta_kl {cfg['vae']['beta_kl']}; adapter "
        f"{cfg['adapter_steps']} steps x batch {cfg['adapter_batch']}"
        + (f" with the UNet fine-tuning at {cfg['unet_lr_scale']} x the adapter's lr"
           if cfg.get("unet_lr_scale") else "")
        + f", L = L_diff + {cfg['alpha_id']} L_id + "
        f"{cfg['beta_clip']} L_clip (L_clip off: no CLIP knows body captions). Training wall time: "
        + ", ".join(f"{k} {v / 60:.1f} min" for k, v in seconds.items()) + f". Measured on {machine()}.", "",
        f"Identity retrieval from c_body (nearest neighbour, chance 1/{identities}). Gallery: mu of {GALLERY} views "
        f"per identity; queries: mu of {QUERY} other views (a set) or of one view.", "",
        *retrieval_lines(ret, identities), "",
        f"Body shape of generated people: {identities} unseen identities x {len(EVAL_POSES)} pose prompts "
        f"({', '.join(EVAL_POSES)}) x {samples} samples = {len(jobs)} images per row; DDIM {steps} steps, guidance "
        f"{guidance:g} (unconditional half: empty text, no body). Error: |measured - true| of the limb ratios "
        f"({', '.join(LIMB_RATIOS)}), averaged. A model that always drew the average training body would score "
        f"{mean_body_error:.3f}.", "",
        "| images | shape error (identity mean) | shape error (per image) | slope vs truth (arm, leg) | measurable | "
        "pose prompt holds |",
        "|---|---|---|---|---|---|",
        *[f"| {name} | **{errors[name][0]:.3f}** | {errors[name][1]:.3f} | {slopes[name][0]:.2f}, {slopes[name][1]:.2f} | "
          f"{errors[name][2]:.2f} | {held[name]:.2f} |" for name in rows],
        "", "Slope vs truth: of the per-identity mean ratio against the true one (1: follows each body; 0: draws "
        "everyone alike; on real renders: how much of the true spread the regressor can see).",
        "", f"Body stream / text only, identity-mean error: **{body_err / text_err:.2f}** (target <= 0.5).",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", default="runs/body")
    p.add_argument("--identities", type=int, default=20)
    p.add_argument("--samples", type=int, default=8, help="generated images per identity and pose prompt "
                   "(8: 32 per identity; generated limb ratios scatter ~4x more than real ones, and with 16 images "
                   "the body / text ratio moved from 0.77 to 0.90 between two sets of seeds)")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps")
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--retrieval-only", action="store_true",
                   help="only the retrieval table, from RUN/body_vae.pt (no adapter needed)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    start = time.time()
    run = Path(args.run)
    missing = [f for f in ([VAE_FILE] if args.retrieval_only else [ADAPTER_FILE, VAE_FILE, "ldm.pt"])
               if not (run / f).is_file()]
    if missing:
        print(f"error: {run} has no {', '.join(missing)}: train it first with `python train.py --stage body "
              f"--out {run}`.", file=sys.stderr)
        return 2
    if args.retrieval_only:
        vae = load_body_vae(run / VAE_FILE)
        saved = load_checkpoint(run / VAE_FILE, "body-vae")
        ret = retrieval_table(lambda im, kp, vis: vae.encode(im[None], kp[None], vis[None])[0],
                              saved["num_identities"], args.identities, vae.cfg.image_size, saved["seed"])
        print("\n".join(retrieval_lines(ret, args.identities)))
    else:
        print(measure(run, args.identities, args.samples, args.steps, args.guidance))
        print("Samples: bench/out/body/text.png, words.png, body.png (first 4 identities, one row each).")
    print(f"({(time.time() - start) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
