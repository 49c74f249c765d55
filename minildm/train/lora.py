"""Stage "lora" (lesson 13): teach a trained model a new word with LoRA, leaving its weights untouched.

The base run knows five places. Here it learns a sixth, "corner" ("a red circle in the corner", the top-left
corner): a word its tokenizer does not have, for a place its UNet never drew anything. Two things train,
everything else stays frozen:

1. One new row of the prompt encoder's token table per new word (adapters/new_words.py, as in textual inversion):
       E' = [E ; e_corner]        E [V, d] frozen, e_corner [1, d] trainable
   The tokenizer gets the word as id V. e_corner starts at the mean of the rows of its kind's words (the
   positions for "corner", the colours for "orange", ...): "some place" rather than a random vector.
2. LoRA on every attention projection of the UNet (to_q, to_k, to_v, to_out of attn1 and attn2):
       W' = W + (alpha / r) B A   (minildm/adapters/lora.py)

Why both? A new word needs an id and a vector, so the embedding row is unavoidable; but a frozen UNet cannot
draw something it never learned, whatever vector it is given, so its attention layers get low-rank updates.
We do not put LoRA on the prompt encoder: the new row is the only text-side change, so every prompt without
the new word is encoded exactly as by the base model.

What LoRA on the UNet cannot do: draw what the frozen autoencoder cannot decode. The tiny VQ-VAE was trained
on six colours and three shapes only; an orange shape comes back red from it and a diamond comes back round,
so no adapter of the UNet can make either (`first_stage_accuracy` measures this before training starts and
warns). A known shape in a new place survives the autoencoder, so "corner" is the default concept.

Data (`concept_training_set`): half of every batch shows the concept (every colour x shape, captions
"a red circle in the corner"); the other half shows the base's own training prompts ("prior preservation",
as in DreamBooth), so the update does not drift the old words. Captions are dropped to "" with p = 0.1 as in
the base training, which keeps the unconditional branch that classifier-free guidance needs.
Loss: the base's own (Algorithm 1 with the base's prediction target, v for the tiny preset: || v - v_theta ||^2);
only A, B and e_corner get gradients.

File (`adapter_state`): the UNet's `lora_state_dict` plus the new words, their rows and a fingerprint of the
base weights: a few hundred KB next to a checkpoint of megabytes. `apply_lora` (adapters/lora.py) puts it on a
loaded base (`sample.py --lora FILE`) and refuses a file made for another model. Ctrl-C saves the adapter as
it is and --resume continues it (the optimiser state stays in the file until the last step).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from minildm.adapters.lora import adapter_state, base_fingerprint, inject_lora, load_lora, lora_parameters
from minildm.adapters.new_words import add_words
from minildm.config import Preset
from minildm.data import shapes
from minildm.data.describe import prompt_accuracy
from minildm.diffusion.ddpm import diffusion_loss
from minildm.diffusion.guidance import drop_tokens
from minildm.pipeline import LatentDiffusion
from minildm.progress import LossLog, step_rng
from minildm.train.common import Checkpoint, fit
from minildm.train.ldm import GRID_PROMPTS, encode_latent_cache
from minildm.viz import plot_curves, save_grid


@dataclass
class LoRATrainConfig:
    rank: int = 8  # the tiny recipe (rank 8, 1000 steps, lr 5e-3, cosine) is what reached >= 0.85, see lesson 13
    alpha: float | None = None  # None: alpha = rank, so the factor alpha / r is 1
    targets: tuple = ("to_q", "to_k", "to_v", "to_out")  # every attention projection of the UNet
    steps: int = 1000
    batch_size: int = 32
    lr: float = 5e-3  # A and B, peak; linear warm-up, then cosine decay to 0
    embedding_lr: float = 5e-3  # the new word rows, same schedule
    warmup: int = 20
    grad_clip: float = 1.0
    p_uncond: float = 0.1
    concept_images: int = 1024  # rendered and encoded once: half of every batch comes from here ...
    base_images: int = 2048  # ... and half from the base's own (SEEN) training prompts
    seed: int = 0


def lora_train_config(preset: Preset) -> LoRATrainConfig:
    """The recipe for a preset: tiny and 3090 use the defaults; micro shrinks to seconds for tests and lessons."""
    if preset.name == "micro":
        return LoRATrainConfig(steps=30, batch_size=16, concept_images=32, base_images=32, warmup=2)
    return LoRATrainConfig()


# ----------------------------------------------------------------------------------------------------------
# Data and evaluation
# ----------------------------------------------------------------------------------------------------------
def concept_prompts(concept: str) -> list[str]:
    """Every prompt of a concept word: "a red circle in the corner", ... (18 for a position, 15 for a colour)."""
    return [shapes.caption(*combo) for combo in shapes.concept_combos(concept)]


def kin_words(concept: str) -> list[str]:
    """The base words of the concept's kind: the colours for a concept colour, the shapes or the positions."""
    if concept in shapes.CONCEPT_COLORS:
        return list(shapes.COLORS)
    return list(shapes.SHAPES) if concept in shapes.CONCEPT_SHAPES else list(shapes.POSITIONS)


@torch.no_grad()
def first_stage_accuracy(pipe: LatentDiffusion, z0: torch.Tensor, captions: list[str], concept: str) -> float:
    """Fraction of concept images whose autoencoder round trip D(E(x)) `describe` still reads right.

    z0: their scaled latents [N, c, h, w]. This bounds what any adapter of the UNet can reach: the UNet only
    makes latents, and the frozen decoder must turn them into the concept.
    """
    return prompt_accuracy(pipe.decode(z0.to(pipe.device)).cpu(), captions, (concept,))


def concept_training_set(concept: str, cfg: LoRATrainConfig, size: int) -> tuple[torch.Tensor, list[str], int]:
    """(images [N, 3, size, size] in [-1, 1], captions, n_concept): n_concept jittered concept shapes first,
    then the base's SEEN shapes (prior preservation), each with its caption."""
    combos = shapes.concept_combos(concept)
    rng = step_rng(cfg.seed, 0, stream=4)
    picks = [combos[i] for i in rng.integers(len(combos), size=cfg.concept_images)]
    concept_images = shapes.render_combos(picks, rng, size)
    base = shapes.ShapesDataset(size=size, split="train", length=cfg.base_images, seed=cfg.seed + 1, cache=True)
    images = torch.cat([concept_images, base.images])
    return images, [shapes.caption(*c) for c in picks] + list(base.captions), len(picks)


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------
def trainable_counts(pipe: LatentDiffusion) -> tuple[int, int]:
    """(adapter, total) parameters of prompt encoder + UNet: adapter = LoRA A, B and new word rows (the only
    ones fine-tuning trains), total = base + adapter."""
    named = [(name, p) for module in (pipe.text_encoder, pipe.unet) for name, p in module.named_parameters()]
    adapter = sum(p.numel() for name, p in named if "lora_" in name or "new_rows" in name)
    return adapter, sum(p.numel() for _, p in named)


def finetune_concept(pipe: LatentDiffusion, concept: str, cfg: LoRATrainConfig, device: torch.device | str = "cpu",
                     show_progress: bool = True, path: Path | None = None, resume: bool = False,
                     meta: dict | None = None, finish=None) -> tuple[dict, LossLog]:
    """Teach `pipe` (a loaded base, changed in place) the concept word; returns (adapter state, loss log).

    Afterwards `pipe` draws the concept (LoRA at strength 1, the word in its tokenizer); the state is what
    `apply_lora` needs to do the same to a fresh copy of the base. With a path, the adapter file is written
    there (with `meta` entries, and `finish(step)`'s at the end) and resume=True continues it.
    """
    if concept not in shapes.CONCEPTS:
        raise ValueError(f"unknown concept '{concept}': choose one of {list(shapes.CONCEPTS)}.")
    pipe.to(device)
    base_words, fingerprint = list(pipe.tokenizer.words), base_fingerprint(pipe)
    images, captions, n_concept = concept_training_set(concept, cfg, pipe.image_size)
    z0_all = encode_latent_cache(pipe.autoencoder, images, device=device)  # [N, c, h, w], scaled
    reachable = first_stage_accuracy(pipe, z0_all[:min(n_concept, 256)], captions[:min(n_concept, 256)], concept)
    if reachable < 0.5:
        tqdm.write(f"warning: only {reachable:.0%} of the '{concept}' images survive this run's autoencoder "
                   "(describe(D(E(x)))): the frozen first stage cannot draw the concept, so no LoRA on the UNet can.")

    torch.manual_seed(cfg.seed)
    kin_ids = [pipe.tokenizer.word_to_id[w] for w in kin_words(concept) if w in pipe.tokenizer.word_to_id]
    table = pipe.text_encoder.token_emb.weight.detach()
    init = table[kin_ids].mean(0, keepdim=True) if kin_ids else table.mean(0, keepdim=True)  # "some place"
    pipe.requires_grad_(False)
    emb = add_words(pipe, [concept], init)  # e_concept trainable, E frozen
    inject_lora(pipe.unet, cfg.targets, cfg.rank, cfg.alpha)  # A, B trainable, W frozen
    tokens_all = pipe.tokenizer.encode(captions)  # [N, L]
    empty = pipe.tokenizer.encode([""])  # [1, L]
    opt = torch.optim.AdamW([{"params": lora_parameters(pipe.unet), "lr": cfg.lr, "peak_lr": cfg.lr},
                             {"params": [emb.new_rows], "lr": cfg.embedding_lr, "peak_lr": cfg.embedding_lr}],
                            weight_decay=0.0)
    half = cfg.batch_size // 2

    def weights() -> dict:
        return {**adapter_state(pipe, fingerprint, base_words), "first_stage_accuracy": reachable, **(meta or {})}

    def load(saved: dict) -> None:
        if list(saved["base_words"]) != base_words or saved["new_words"] != [concept]:
            raise ValueError(f"{path} is not a '{concept}' adapter of this base run: train it again without --resume.")
        load_lora(pipe.unet, saved)
        with torch.no_grad():
            emb.new_rows.copy_(saved["word_rows"])

    def loss_fn(step: int):
        rng = step_rng(cfg.seed, step)
        idx = torch.cat([torch.from_numpy(rng.integers(n_concept, size=half)),  # half concept ...
                         torch.from_numpy(rng.integers(n_concept, len(z0_all), size=cfg.batch_size - half))])
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        tokens = drop_tokens(tokens_all[idx], empty, cfg.p_uncond, gen).to(device)  # y = "" with prob. p
        z0 = z0_all[idx].to(device)
        t = torch.randint(0, pipe.schedule.num_timesteps, (len(idx),), generator=gen).to(device)
        eps = torch.randn(z0.shape, generator=gen).to(device)
        context, mask = pipe.text_encoder(tokens)  # tau(y): frozen encoder, trainable new row
        loss = diffusion_loss(lambda x_t, t_: pipe.unet(x_t, t_, context, mask), pipe.schedule, z0,
                              prediction=pipe.prediction, t=t, eps=eps)
        return loss, {"loss": loss.item()}

    pipe.text_encoder.train()
    pipe.unet.train()
    run = fit(loss_fn, opt, cfg.steps, Checkpoint(path, "lora", weights, load, keep_optimizer=False),
              lr=cfg.lr, warmup=cfg.warmup, resume=resume, desc=f"lora r={cfg.rank}", show_progress=show_progress,
              device=device, max_norm=cfg.grad_clip, postfix=("loss",), finish=finish)
    pipe.eval().requires_grad_(False)
    return {**adapter_state(pipe, fingerprint, base_words), "first_stage_accuracy": reachable}, run.log


def train_lora(preset: Preset, base_dir: str | Path, device: torch.device, concept: str = "corner",
               rank: int | None = None, alpha: float | None = None, steps: int | None = None,
               out: str | Path | None = None, batch_size: int | None = None, show_progress: bool = True,
               resume: bool = False, lr_scale: float = 1.0) -> Path:
    """Fine-tune the base run in `base_dir` on `concept`; writes OUT/lora_<concept>_r<rank>.pt (OUT defaults to
    base_dir), a loss plot and a sample grid; returns the path of the LoRA file. resume: continue that file;
    lr_scale multiplies the recipe's learning rates (train.py --lr-scale, e.g. after a divergence)."""
    base_dir = Path(base_dir)
    recipe = lora_train_config(preset)
    cfg = replace(recipe, rank=rank or recipe.rank, alpha=alpha, steps=steps or recipe.steps,
                  batch_size=batch_size or recipe.batch_size, lr=recipe.lr * lr_scale,
                  embedding_lr=recipe.embedding_lr * lr_scale)
    out_dir = Path(out) if out else base_dir
    path = out_dir / f"lora_{concept}_r{cfg.rank}.pt"
    pipe = LatentDiffusion.load(base_dir, device)  # the EMA weights, which sample.py loads too
    wall, cpu = time.time(), time.process_time()

    def seconds(step: int) -> dict:
        return {"train_seconds": time.time() - wall, "train_cpu_seconds": time.process_time() - cpu}

    _, log = finetune_concept(pipe, concept, cfg, device, show_progress, path, resume,
                              meta={"concept": concept, "steps": cfg.steps, "preset": preset.name}, finish=seconds)
    wall, cpu = time.time() - wall, time.process_time() - cpu

    trainable, total = trainable_counts(pipe)
    full = base_dir / "ldm.pt"
    weights_mb = 4 * (total - trainable) / 1e6  # the base prompt encoder + UNet in float32
    tqdm.write(f"LoRA r={cfg.rank}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%), "
               f"{wall:.0f} s ({cpu:.0f} s CPU)")
    tqdm.write(f"{path}: {path.stat().st_size / 1e3:.0f} KB, against {weights_mb:.1f} MB of base weights "
               f"({full.stat().st_size / 1e6:.1f} MB for ldm.pt with EMA and optimizer state)")
    plot_curves({"loss": log.history["loss"]}, out_dir / f"lora_{concept}_r{cfg.rank}_loss.png",
                title=f"LoRA fine-tuning on '{concept}' ({pipe.prediction} MSE)")
    prompts = concept_prompts(concept)[::2][:8] + GRID_PROMPTS[:4]  # 8 concept prompts, then 4 base prompts
    save_grid(pipe.generate(prompts, steps=25, guidance_scale=3.0, seed=0),
              out_dir / "samples" / f"lora_{concept}_r{cfg.rank}.png", nrow=len(prompts), upscale=2)
    return path
