"""Stage 1: train the first stage with the VQGAN losses (LDM section 3 / the lecture's autoencoder).

The preset picks the regulariser: the VQ-VAE (`preset.vq`, the default) or, when `preset.kl` is set, the
KL-regularised autoencoder of LDM / Stable Diffusion (autoencoder/kl.py). Each step has two halves with two
optimisers:
    generator:      L = L1 + w_p * perceptual + R + lambda_adaptive * w_d * hinge_g    (GAN part after disc_start)
                    R = VQ loss, or (w_kl / 3HW) KL(q(z|x) || N(0, I)) per image      (autoencoder/losses.py)
    discriminator:  L_D = mean(relu(1 - D(x))) + mean(relu(1 + D(x_rec)))              (only after disc_start)
After training: the latent scale factor 1 / std(z) (so the diffusion model sees latents of unit variance;
KL: of posterior samples), and a summary on held-back shapes (or on a fixed draw of a folder's images): PSNR,
and codebook usage and perplexity (VQ) or the mean KL per image and posterior std (KL).
The KL model's training draws z = mu + sigma n with n from the step's own generator, so a resumed run
repeats an unbroken one exactly.

Batches come from procedural shapes (the default) or from a fixed set of images, e.g. a folder loaded by
minildm/data/folder.py. Mixed precision (CUDA only): encoder, decoder and losses under autocast, the vector
quantiser in fp32. Under torchrun every rank trains on its slice of each batch (see train/distributed.py).
"""
from __future__ import annotations

import math
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from minildm.autoencoder.kl import AutoencoderKL, DiagonalGaussian
from minildm.autoencoder.losses import VQGANLoss
from minildm.autoencoder.vqvae import VQVAE
from minildm.checkpoint import CheckpointError
from minildm.config import Preset
from minildm.data import shapes
from minildm.train import distributed
from minildm.progress import step_rng
from minildm.train.common import Checkpoint, autocast, fit, grad_scaler, scaled_step
from minildm.viz import plot_curves, save_grid


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """PSNR in dB of images in [0, 1]: 10 log10(1 / MSE)."""
    mse = (x.clamp(0, 1) - y.clamp(0, 1)).pow(2).mean().item()
    return 10 * math.log10(1 / max(mse, 1e-12))


@torch.no_grad()
def evaluate_autoencoder(model: VQVAE, images: torch.Tensor, batch_size: int = 256) -> dict:
    """PSNR, codebook usage and perplexity over held-back images [N, 3, H, W] in [-1, 1]."""
    model.eval()
    recs, counts = [], torch.zeros(model.cfg.num_codes)
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size]
        z_q, _, info = model.quantize(model.encode(x))
        recs.append(model.decoder(z_q))
        counts += torch.bincount(info["indices"].flatten().cpu(), minlength=model.cfg.num_codes)
    rec = torch.cat(recs)
    p = counts / counts.sum()
    perplexity = torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum()).item()
    return {"psnr": psnr((rec.cpu() + 1) / 2, (images.cpu() + 1) / 2), "usage": (counts > 0).float().mean().item(),
            "codes_used": int((counts > 0).sum()), "perplexity": perplexity}


@torch.no_grad()
def evaluate_kl_autoencoder(model: AutoencoderKL, images: torch.Tensor, batch_size: int = 256) -> dict:
    """PSNR of D(mu) (the posterior mean, as at sampling time), mean KL per image and mean posterior sigma."""
    model.eval()
    recs, kls, stds = [], [], []
    for i in range(0, len(images), batch_size):
        q = model.encode(images[i:i + batch_size])
        recs.append(model.decode(q.mode()))
        kls.append(q.kl())
        stds.append(q.std.mean(dim=(1, 2, 3)))
    rec = torch.cat(recs)
    return {"psnr": psnr((rec.cpu() + 1) / 2, (images.cpu() + 1) / 2), "kl": torch.cat(kls).mean().item(),
            "posterior_std": torch.cat(stds).mean().item()}


def held_back_shapes(preset: Preset, n: int) -> torch.Tensor:
    """Fresh shapes of every combination, drawn from a seed training never uses: [n, 3, H, W] in [-1, 1]."""
    images, _ = shapes.sample_batch(n, step_rng(preset.vq_train.seed, 0, stream=2), split="all", size=preset.image_size)
    return images


class MixedPrecisionKL(nn.Module):
    """AutoencoderKL.forward for training: (x, generator) -> (x_rec, mean KL per image, {"posterior": q}), encoder
    and decoder under autocast, the posterior (exp of the log-variance, the KL sum) in fp32; z = mu + sigma n
    with n from `generator` (reproducible batches on resume)."""

    def __init__(self, model: AutoencoderKL, device: torch.device, precision: str):
        super().__init__()
        self.model, self.device, self.precision = model, device, precision

    def forward(self, x: torch.Tensor, generator: torch.Generator) -> tuple:
        m = self.model
        with autocast(self.device, self.precision):
            moments = m.quant_conv(m.encoder(x))
        q = DiagonalGaussian(moments.float())
        with autocast(self.device, self.precision):
            return m.decode(q.sample(generator)), q.kl().mean(), {"posterior": q}


class MixedPrecisionVQVAE(nn.Module):
    """VQVAE.forward for training: x -> (x_rec, vq_loss, info), encoder and decoder under autocast, the
    vector quantiser in fp32 (bf16 distances pick wrong nearest codes, and the EMA sums need fp32).
    One module, so that DistributedDataParallel can wrap the whole forward pass."""

    def __init__(self, model: VQVAE, device: torch.device, precision: str):
        super().__init__()
        self.model, self.device, self.precision = model, device, precision

    def forward(self, x: torch.Tensor) -> tuple:
        with autocast(self.device, self.precision):
            z = self.model.encode(x)
        z_q, vq_loss, info = self.model.quantize(z.float())
        with autocast(self.device, self.precision):
            return self.model.decoder(z_q), vq_loss, info


def train_autoencoder(preset: Preset, run_dir: str | Path, device: torch.device, resume: bool = False,
                      steps: int | None = None, batch_size: int | None = None, show_progress: bool = True,
                      images=None, precision: str = "fp32", compile: bool = False) -> Path:
    """Train the VQ-VAE (the KL autoencoder if preset.kl is set); writes run_dir/autoencoder.pt, grids and plots;
    returns the checkpoint path.

    images: None trains on fresh procedural shapes every step; otherwise a fixed set [N, 3, H, W] in [-1, 1]
    (a float tensor, or a folder's Uint8Images) from which every step draws its batch.
    precision: fp32, bf16 or fp16 (mixed precision on CUDA only); compile: torch.compile encoder and decoder.
    batch_size is per process: under torchrun the global batch is world_size * batch_size.
    """
    cfg = preset.vq_train
    steps = steps or cfg.steps
    batch_size = batch_size or cfg.batch_size
    run_dir = Path(run_dir)
    ckpt_path = run_dir / "autoencoder.pt"
    torch.manual_seed(cfg.seed)
    world, main = distributed.world_size(), distributed.is_main()

    if images is None:  # procedural shapes: every step renders fresh ones
        def draw(n: int, rng, split: str = "train") -> torch.Tensor:
            return shapes.sample_batch(n, rng, split=split, size=preset.image_size)[0]
    else:  # a fixed set of images (a folder): every step draws n of them, with replacement
        if tuple(images.shape[1:]) != (3, preset.image_size, preset.image_size):
            raise ValueError(f"images must be [N, 3, {preset.image_size}, {preset.image_size}] for the "
                             f"{preset.name} preset, got {tuple(images.shape)}.")

        def draw(n: int, rng, split: str = "train") -> torch.Tensor:
            return images[torch.from_numpy(rng.integers(len(images), size=n))]

    first_stage = "kl" if preset.kl is not None else "vq"
    # a copy of the KL config: compute_scale_factor writes the measured scale into it, not into the preset
    model = (AutoencoderKL(replace(preset.kl)) if first_stage == "kl" else VQVAE(preset.vq)).to(device)
    losses = VQGANLoss(cfg.loss).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(losses.discriminator.parameters(), lr=cfg.disc_lr, betas=(0.5, 0.9))

    def weights() -> dict:
        distributed.check_in_sync(model)  # every rank; raises if the replicas drifted apart
        return {"first_stage": first_stage, "config": asdict(model.cfg), "preset": preset.name,
                "model": model.state_dict(),
                "discriminator": losses.discriminator.state_dict(), "optimizer_d": opt_d.state_dict(),
                "scale_factor": float(model.scale_factor), "summary": {}}

    def load(saved: dict) -> None:
        saved_stage = saved.get("first_stage", "vq")  # files from before the KL option hold a VQ-VAE
        if saved_stage != first_stage:
            raise CheckpointError(f"{ckpt_path} holds a {saved_stage.upper()} autoencoder but this run trains a "
                                  f"{first_stage.upper()} one: resume with the --autoencoder it was started with, "
                                  "or train into another --out.")
        model.load_state_dict(saved["model"])
        losses.discriminator.load_state_dict(saved["discriminator"])
        opt_d.load_state_dict(saved["optimizer_d"])

    fixed = draw(8, step_rng(cfg.seed, 0, stream=1), split="all").to(device)

    def reconstruction_grid(step: int) -> None:
        if not main:
            return
        model.eval()
        with torch.no_grad():
            rec = model(fixed, sample=False)[0] if first_stage == "kl" else model(fixed)[0]
        save_grid((torch.cat([fixed, rec]) + 1) / 2, run_dir / "samples" / f"autoencoder_step{step:06d}.png",
                  nrow=len(fixed), upscale=2)
        model.train()

    if compile:  # the convolutional halves; the quantiser's data-dependent code stays eager
        model.encoder.compile()
        model.decoder.compile()
    wrapper = MixedPrecisionKL if first_stage == "kl" else MixedPrecisionVQVAE
    net = distributed.wrap(wrapper(model, device, precision), device)
    scaler_d = grad_scaler(device, precision)
    batch = {}  # this step's x and x_rec, for the discriminator's half of the step

    def loss_fn(step: int):
        # the global batch of world * batch_size images; this rank keeps its slice
        rng = step_rng(cfg.seed, step)
        x = distributed.shard(draw(batch_size * world, rng)).to(device)
        if first_stage == "kl":  # n of z = mu + sigma n: this step's own generator, different on every rank
            gen = torch.Generator().manual_seed(int(rng.integers(2**62)) + distributed.rank())
            x_rec, kl, _ = net(x, gen)
            with autocast(device, precision):
                loss, logs = losses.generator_loss(x, x_rec, kl, step, model.last_layer, regularizer="kl")
            batch.update(x=x, x_rec=x_rec)
            return loss, logs
        x_rec, vq_loss, info = net(x)
        with autocast(device, precision):
            loss, logs = losses.generator_loss(x, x_rec, vq_loss, step, model.last_layer)
        batch.update(x=x, x_rec=x_rec)
        return loss, {**logs, "perplexity": float(info["perplexity"]), "usage": float(info["usage"])}

    def discriminator_step(step: int) -> dict:
        if first_stage == "vq":
            distributed.broadcast_state(model.quantizer)  # codebook EMA and restarts saw only this rank's batch
        if not losses.disc_active(step):
            return {}
        with autocast(device, precision):
            loss_d, logs_d = losses.discriminator_loss(batch["x"], batch["x_rec"].detach(), step)
        opt_d.zero_grad(set_to_none=True)
        scaled_step(scaler_d, loss_d, opt_d,
                    before_step=lambda: distributed.average_gradients(losses.discriminator.parameters()))
        return logs_d

    def scale_and_summary(step: int) -> dict:
        """The scale factor 1 / std(z) (the diffusion model trains on z * scale_factor, of unit variance) and
        the summary on held-back images."""
        model.eval()
        with torch.no_grad():
            data = [draw(256, step_rng(cfg.seed, i, stream=3)).to(device) for i in range(4)]
            if first_stage == "kl":  # 1 / std of posterior samples z ~ q(z|x), drawn from a fixed generator
                model.compute_scale_factor(data, torch.Generator().manual_seed(cfg.seed))
            else:
                model.scale_factor.fill_(model.compute_scale_factor(data))
        eval_images = (held_back_shapes(preset, cfg.eval_images) if images is None
                       else draw(cfg.eval_images, step_rng(cfg.seed, 0, stream=2)))  # a folder has no held-back split
        evaluate = evaluate_kl_autoencoder if first_stage == "kl" else evaluate_autoencoder
        summary.update(evaluate(model, eval_images.to(device)), scale_factor=float(model.scale_factor), steps=step)
        return {"summary": summary}

    summary = {}
    model.train()
    run = fit(loss_fn, opt, steps, Checkpoint(ckpt_path, "autoencoder", weights, load, every=cfg.save_every),
              lr=cfg.lr, resume=resume, desc="autoencoder", show_progress=show_progress, device=device,
              scaler=grad_scaler(device, precision), after_step=discriminator_step, log_every=cfg.log_every,
              postfix=("l1", "kl") if first_stage == "kl" else ("l1", "perplexity", "usage"),
              on_step=lambda step: reconstruction_grid(step) if cfg.image_every and step % cfg.image_every == 0
              and step < steps else None, finish=scale_and_summary)  # the last step's grid: below
    path = ckpt_path
    reconstruction_grid(run.step)
    distributed.barrier()  # the next stage reads autoencoder.pt on every rank
    if not main:
        return path
    h = run.log.history
    curves = ("l1", "perceptual", "vq", "kl", "gan", "d_loss")
    plot_curves({k: h[k] for k in curves if any(v > 0 for _, v in h.get(k, []))}, run_dir / "autoencoder_loss.png",
                title="autoencoder losses", marks={"disc_start": cfg.loss.disc_start} if cfg.loss.disc_start < steps else None)
    where = "held-back shapes" if images is None else "training images"
    stopped = " | stopped early, --resume continues" if run.interrupted else ""
    if first_stage == "kl":
        tqdm.write(f"KL autoencoder: PSNR {summary['psnr']:.2f} dB on {where} | KL per image {summary['kl']:.1f} | "
                   f"posterior std {summary['posterior_std']:.3g} | latent scale factor {summary['scale_factor']:.4f}"
                   + stopped)
        return path
    plot_curves({"codebook usage": h["usage"], "perplexity / num_codes": [(s, v / preset.vq.num_codes) for s, v in h["perplexity"]]},
                run_dir / "codebook_usage.png", title="codebook usage (fraction of codes per batch)", logy=False)
    tqdm.write(
        f"autoencoder: PSNR {summary['psnr']:.2f} dB on {where} | codes in use {summary['codes_used']}"
        f"/{preset.vq.num_codes} ({summary['usage']:.0%}) | perplexity {summary['perplexity']:.1f} | "
        f"latent scale factor {summary['scale_factor']:.4f}" + stopped
    )
    return path
