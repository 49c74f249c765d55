"""Presets: every number that decides a run, as plain dataclasses you can read top to bottom.

    tiny  32x32 shapes, VQ f = 4 (8x8x4 latents), a small UNet: `python train.py` on 2 CPU cores in minutes
    3090  256x256 captioned folders (Flickr8k), VQ f = 8 with 8192 codes (32x32x4 latents, as the LDM of the
          Flickr8k student report), a larger UNet for one 24 GB GPU

Each model's own config lives beside the model (VQConfig in autoencoder/vqvae.py, UNetConfig in
modules/unet.py, TextEncoderConfig in text/encoder.py); a preset only picks their values.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from minildm.autoencoder.kl import KLConfig
from minildm.autoencoder.losses import VQGANLossConfig
from minildm.autoencoder.vqvae import VQConfig
from minildm.modules.unet import UNetConfig
from minildm.text.encoder import TextEncoderConfig


@dataclass
class AutoencoderTrainConfig:
    # 1200, not 800: at 800 steps the encoder sometimes maps cyan (and purple) interiors onto blue's codes
    # (reconstructed colour right 0.67-0.96 of the time over 3 seeds, which caps the LDM's prompt accuracy);
    # at 1200 steps 1.00 on the seeds tried (bench/results/recipe_search.md)
    steps: int = 1200
    batch_size: int = 32
    lr: float = 2e-3  # peak; cosine decay to 0
    disc_lr: float = 2e-4
    loss: VQGANLossConfig = field(default_factory=VQGANLossConfig.tiny)
    log_every: int = 10
    image_every: int = 200  # reconstruction grid (inputs above reconstructions) every N steps
    save_every: int = 500
    eval_images: int = 1024  # held-back shapes for the PSNR / usage summary
    seed: int = 0


@dataclass
class LDMTrainConfig:
    steps: int = 3000
    batch_size: int = 64
    lr: float = 1e-3  # peak, after a linear warm-up; cosine decay to 0 at the last step
    warmup: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    prediction: str = "eps"  # what the UNet outputs: eps (DDPM), x0, or v = sqrt(abar) eps - sqrt(1 - abar) x0
    p_uncond: float = 0.1  # classifier-free guidance: train with the empty prompt this often
    snr_gamma: float | None = None  # Min-SNR-gamma loss weighting over t (diffusion/ddpm.py); None: uniform
    cache_size: int = 8000  # shapes rendered and encoded once into the latent cache
    paraphrase_prob: float = 0.0
    sample_every: int = 1000
    save_every: int = 500
    seed: int = 0


@dataclass
class Preset:
    name: str
    image_size: int
    vq: VQConfig
    vq_train: AutoencoderTrainConfig
    text: TextEncoderConfig  # vocab_size is filled in from the tokenizer when training starts
    unet: UNetConfig
    ldm: LDMTrainConfig
    schedule: dict = field(default_factory=lambda: {"num_timesteps": 1000, "kind": "linear"})
    kl: KLConfig | None = None  # set: the first stage is this KL autoencoder (trained by vq_train); None: `vq`


def tiny() -> Preset:
    return Preset(
        name="tiny",
        image_size=32,
        vq=VQConfig.tiny(),
        # 1200 steps at batch 32. Shorter or smaller recipes were measured and lost quality
        # (bench/results/recipe_search.md, train_speed.md): 800 steps left cyan and purple on blue's codes; batch
        # 8 or 16 read the shapes back right but, with a shorter LDM on top, drew held-out prompts worse
        vq_train=AutoencoderTrainConfig(),
        text=TextEncoderConfig(vocab_size=0, max_len=12, dim=128, depth=2, heads=4, dim_head=32),
        # PyTorch's fused attention kernel in channels_last layout: the same function as the naive kernel in NCHW
        # (tests/test_unet.py) at 0.89x the time of an LDM step (bench/results/unet_reference.md,
        # train_speed.md); the lessons still read and test the naive kernel
        unet=UNetConfig(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                        attention_levels=(1, 2), heads=4, dim_head=16, context_dim=128, norm_groups=16,
                        kernel="sdpa", channels_last=True),
        # v-prediction: prompt accuracy 1.00 with deterministic DDIM (eta = 0), where eps-prediction reached 0.62
        # at 2000 steps (its DDIM latents came out ~2.4x too wide; eta = 1 hid it: 0.92). 2000 steps: 1000-1200
        # drew seen prompts right on some seeds but held-out ones as low as 0.70, and higher peak rates or Min-SNR
        # weighting broke shapes and positions (bench/results/recipe_search.md, train_speed.md); on one seed 1200
        # and 1500 steps drew circles and squares alike (shape right 0.68 and 0.74 of the time), 2000 steps 1.00:
        # the two words whose latents differ least (bench/results/attribute_gaps.md) are learnt last, at a step
        # that depends on the seed (recipe_search.md's "circle against square while the LDM trains")
        ldm=LDMTrainConfig(steps=2000, prediction="v"),
    )


def scenes() -> Preset:
    """Two objects per 32x32 picture (minildm/data/scenes.py): the tiny networks and recipe (autoencoder 1200
    steps x 32, LDM 2000 steps with v-prediction) with the naive attention kernel, on 8000 scenes of the 78 seen
    pairings, trained by
    `python train.py --preset scenes` (CPU cost in bench/results/scenes.md)."""
    p = tiny()
    p.name = "scenes"
    p.text = replace(p.text, max_len=16)  # "a red circle on the left and a blue square on the right" is 12 words
    # the kernel and layout bench/results/scenes.md was measured with (tiny trains with sdpa in channels_last
    # since, the same function), kept so that those numbers stay exactly reproducible
    p.vq_train = AutoencoderTrainConfig()
    p.unet = replace(p.unet, kernel="naive", channels_last=False)
    p.ldm = LDMTrainConfig(steps=2000, prediction="v")
    # the tiny UNet (cross-attention at 4x4 and 2x2): attention at 8x8 as well doubles the CPU cost of a step
    # (0.61 against 0.28 CPU s at batch 64, measured): 2000 such steps alone would take 20 CPU minutes
    return p


def rtx3090() -> Preset:
    """Flickr8k (8091 images, 5 captions each) at 256x256 on one 24 GB RTX 3090 in bf16 autocast.

    `python train.py --preset 3090 --dry-run` prints the parameters and the measured memory per step:
    about 17 GiB for the autoencoder at batch 12 and 9 GiB for the LDM at batch 48.
    Wall times are estimates, not measurements: FLOPs counted with torch.utils.flop_counter, run at an
    assumed 25 TFLOP/s sustained (about a third of the 3090's 71 TFLOP/s dense bf16 tensor-core peak).
      autoencoder  ~2.1 TFLOP per image per step (encoder 0.21 + decoder 0.46 forward, twice that backward,
                   + the perceptual net): ~1 s per step at batch 12; 40k steps = 60 epochs (the Flickr8k report's
                   count) ~ 11-12 h; the GAN joins at step 30k (VQGANLossConfig.f8_8192).
      ldm          ~83 GFLOP per latent per step (27.6 forward): ~0.2 s per step at batch 48; 100k steps
                   ~ 600 epochs ~ 5-6 h (the report stopped at 100 epochs, ~17k steps).
    The UNet is the report's; the LDM step uses a third of the card, so --batch-size up to ~150 also fits.
    Its attention kernel is sdpa (flash / memory-efficient attention on CUDA): the naive kernel keeps every
    1024x1024 attention matrix of the 32x32 level for backward, 17.8 GiB of activations at batch 48
    instead of 5.4 GiB.
    """
    return Preset(
        name="3090",
        image_size=256,
        vq=VQConfig.f8_8192(),
        vq_train=AutoencoderTrainConfig(steps=40_000, batch_size=12, lr=4.5e-6 * 12, disc_lr=4.5e-6 * 12, loss=VQGANLossConfig.f8_8192(),
                                        image_every=2000, save_every=2000, eval_images=64),
        text=TextEncoderConfig(vocab_size=0, max_len=40, dim=512, depth=6, heads=8, dim_head=64),
        unet=replace(UNetConfig.flickr8k_report(in_channels=4, context_dim=512), kernel="sdpa"),
        ldm=LDMTrainConfig(steps=100_000, batch_size=48, lr=1e-4, warmup=1000, ema_decay=0.9999,
                           sample_every=5000, save_every=2000),
        schedule={"num_timesteps": 1000, "kind": "scaled_linear"},
    )


def micro() -> Preset:
    """The tiny preset shrunk to seconds of CPU: for tests, quick lessons and smoke runs (blurry samples)."""
    p = tiny()
    p.name = "micro"
    p.vq = replace(p.vq, channels=8, num_codes=32, kmeans_iters=2)
    # saves every 5 steps: a killed smoke run loses at most 5 steps (a save of these weights takes milliseconds)
    p.vq_train = replace(p.vq_train, steps=20, batch_size=16, image_every=0, save_every=5, eval_images=32)
    p.unet = UNetConfig(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
                        heads=2, dim_head=8, context_dim=32, norm_groups=8)
    p.text = replace(p.text, dim=32, depth=1, heads=2, dim_head=16)
    p.ldm = replace(p.ldm, steps=20, batch_size=16, cache_size=256, sample_every=0, save_every=5, warmup=2)
    return p


def with_kl_autoencoder(preset: Preset) -> Preset:
    """The preset with a KL-regularised first stage of its VQ-VAE's widths, f and latent channels (the same
    training recipe, L1 (+ perceptual, GAN) + w_kl KL in place of the VQ loss): `train.py --autoencoder kl`."""
    vq = preset.vq
    kl = KLConfig(in_channels=vq.in_channels, channels=vq.channels, channel_mult=vq.channel_mult,
                  num_res_blocks=vq.num_res_blocks, z_channels=vq.z_channels, norm_groups=vq.norm_groups,
                  scale_factor=1.0)  # measured as 1 / std(z) after training
    return replace(preset, kl=kl)


def get_preset(name: str) -> Preset:
    if name == "tiny":
        return tiny()
    if name == "3090":
        return rtx3090()
    if name == "micro":
        return micro()
    if name == "scenes":
        return scenes()
    raise ValueError(f"unknown preset '{name}': use tiny, scenes, 3090 (or micro for a seconds-long smoke run).")


def count_parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())


GPU_MEMORY = 24 * 2**30  # bytes on an RTX 3090
CUDA_OVERHEAD = 2**30  # CUDA context, cuDNN/cuBLAS workspaces: about 1 GiB
BACKWARD_MARGIN = 1.15  # activation gradients and temporaries alive during backward, on top of saved activations


def saved_activation_bytes(step, modules) -> int:
    """Bytes of the tensors autograd keeps for backward while `step()` runs a forward pass (the activations),
    counting each storage once and leaving out the weights of `modules`."""
    import torch

    weights = {t.untyped_storage().data_ptr() for m in modules for t in [*m.parameters(), *m.buffers()]}
    saved = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()  # keeps the graph, hence every saved tensor, alive until counted
    del loss
    return sum(saved.values())


def build_models(preset: Preset) -> dict:
    """Every network of the preset, freshly initialised on the CPU (the prompt encoder with a vocabulary of 1000)."""
    from minildm.autoencoder.losses import VQGANLoss
    from minildm.autoencoder.vqvae import VQVAE
    from minildm.modules.unet import UNet
    from minildm.text.encoder import PromptEncoder

    losses = VQGANLoss(preset.vq_train.loss)
    return {"autoencoder": VQVAE(preset.vq), "discriminator": losses.discriminator, "perceptual": losses.perceptual,
            "text_encoder": PromptEncoder(replace(preset.text, vocab_size=1000)), "unet": UNet(preset.unet)}


def training_memory(preset: Preset, precision: str = "bf16", models: dict | None = None,
                    resolution: int = 32) -> list[tuple[str, int, int, int]]:
    """(stage, batch, bytes of weights + grads + optimiser state (+ EMA), bytes of activations) per stage.

    Activations are measured, not modelled: one forward pass on the CPU at batch 1 and at batch 2 (under
    CPU autocast for bf16/fp16), counting the tensors kept for backward; the difference is the cost per
    example, the rest (autocast's low-precision weight copies) is fixed. The UNet runs at its full latent
    size (attention cost grows with the square of the token count); the autoencoder stage, all
    convolutions, runs at `resolution` and is scaled by the pixel count. The quantiser is left out (its
    tensors are latent-sized). fp32 weights, fp32 grads and two Adam moments are 16 bytes per trained
    parameter (+4 for the LDM's EMA); frozen networks on the GPU cost 4.
    """
    import torch

    m = models or build_models(preset)
    vq, disc, perceptual, text, unet = (m[k] for k in ("autoencoder", "discriminator", "perceptual", "text_encoder", "unet"))
    loss_cfg = preset.vq_train.loss

    def measure(step, modules) -> tuple[int, int]:  # (fixed bytes, bytes per example)
        with torch.autocast("cpu", dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision),
                            enabled=precision != "fp32"):
            one, two = (saved_activation_bytes(lambda: step(b), modules) for b in (1, 2))
        return one - (two - one), two - one

    r = min(preset.image_size, resolution)

    def autoencoder_step(b):
        x = torch.rand(b, 3, r, r) * 2 - 1
        x_rec = vq.decoder(vq.encode(x))
        loss = (x - x_rec).abs().mean()
        if loss_cfg.perceptual_weight > 0:
            loss = loss + perceptual(x, x_rec)
        return loss + disc(x_rec).mean() if loss_cfg.disc_weight > 0 else loss

    f = preset.vq.downsample_factor

    def ldm_step(b):
        context, mask = text(torch.ones(b, preset.text.max_len, dtype=torch.long))  # prompts of full length
        z = torch.randn(b, preset.unet.in_channels, preset.image_size // f, preset.image_size // f)
        return unet(z, torch.zeros(b, dtype=torch.long), context, mask).float().pow(2).mean()

    fixed_ae, per_image = measure(autoencoder_step, [vq, disc, perceptual])
    fixed_ldm, per_latent = measure(ldm_step, [text, unet])
    ae_states = 16 * (count_parameters(vq) + count_parameters(disc)) + 4 * count_parameters(perceptual)
    ldm_states = 20 * (count_parameters(text) + count_parameters(unet)) + 4 * count_parameters(vq)
    ae_batch, ldm_batch = preset.vq_train.batch_size, preset.ldm.batch_size
    return [("autoencoder", ae_batch, ae_states, fixed_ae + ae_batch * per_image * (preset.image_size // r) ** 2),
            ("ldm", ldm_batch, ldm_states, fixed_ldm + ldm_batch * per_latent)]


def describe_preset(preset: Preset, precision: str = "bf16") -> str:
    """The preset's components with their parameter counts, and the GPU memory of a training step of each
    stage at the preset's batch sizes, measured as in `training_memory` (builds the models, no training)."""
    f = preset.vq.downsample_factor
    models = build_models(preset)
    rows = [
        ("autoencoder (VQ-VAE)", count_parameters(models["autoencoder"]),
         f"{preset.image_size}x{preset.image_size}x3 -> {preset.image_size // f}x{preset.image_size // f}x"
         f"{preset.vq.z_channels}, {preset.vq.num_codes} codes"),
        ("discriminator", count_parameters(models["discriminator"]),
         f"PatchGAN, {preset.vq_train.loss.disc_layers} layers" + (
             f", from step {preset.vq_train.loss.disc_start:,}" if preset.vq_train.loss.disc_weight > 0 else ", unused")),
        ("perceptual net", count_parameters(models["perceptual"]),
         f"frozen VGG16 layout, width {preset.vq_train.loss.perceptual_width}" + (
             "" if preset.vq_train.loss.perceptual_weight > 0 else ", unused")),
        ("prompt encoder", count_parameters(models["text_encoder"]),
         f"d={preset.text.dim}, depth {preset.text.depth}, max_len {preset.text.max_len} (vocab 1000 assumed)"),
        ("UNet", count_parameters(models["unet"]),
         f"channels {preset.unet.model_channels}x{preset.unet.channel_mult}, attention at "
         f"{preset.unet.attention_levels} ({preset.unet.kernel} kernel)"
         + (", gradient checkpointing" if preset.unet.use_checkpoint else "")),
    ]
    lines = [f"preset {preset.name}", f"{'component':<22}{'parameters':>14}  shape"]
    lines += [f"{name:<22}{n:>14,}  {info}" for name, n, info in rows]

    gib = 2**30
    lines += ["", f"GPU memory of one training step, {precision} "
                  f"{'autocast' if precision != 'fp32' else ''} (fits: total <= {GPU_MEMORY / gib:.0f} GiB, an RTX 3090)",
              f"{'stage':<14}{'batch':>6}{'weights+grads+Adam':>20}{'activations':>13}{'total':>10}  fits"]
    for stage, batch, states, activations in training_memory(preset, precision, models):
        total = states + BACKWARD_MARGIN * activations + CUDA_OVERHEAD
        lines.append(f"{stage:<14}{batch:>6}{states / gib:>16.2f} GiB{activations / gib:>9.2f} GiB"
                     f"{total / gib:>6.1f} GiB  {'yes' if total <= GPU_MEMORY else 'NO'}")
    lines += ["activations: the tensors kept for backward, measured by one forward pass on the CPU at batch 1 and 2",
              "(the autoencoder at 32x32, scaled by pixels). LDM states include the EMA and the frozen autoencoder.",
              f"total = states + {BACKWARD_MARGIN} x activations + {CUDA_OVERHEAD / gib:.0f} GiB CUDA context."]
    if preset.unet.use_checkpoint:
        lines.append("gradient checkpointing: the LDM activations are a lower bound (the block inputs that checkpoint "
                     "keeps and the recomputation of one block during backward are not counted).")
    return "\n".join(lines)
