"""Read Stable Diffusion v1.x weights into minildm's own modules (UNet, AutoencoderKL, CLIP text transformer).

Two layouts, one code path:
- a single file (`v1-5-pruned-emaonly.safetensors` or `.ckpt`) with `model.diffusion_model.*`,
  `first_stage_model.*`, `cond_stage_model.transformer.*` keys (plus schedule buffers and position_ids,
  which carry nothing to load);
- a diffusers folder: unet/, vae/, text_encoder/ (weights + config.json), tokenizer/, scheduler/.
Both are renamed to the original names, split per component, checked to be SD v1.x, and loaded.

Memory: tensors are memory-mapped (`torch.load(mmap=True)`, or the safetensors reader), modules are built
on the "meta" device (no storage) and take the file's tensors with `load_state_dict(assign=True)`, so
nothing is held twice: peak RAM stays near the checkpoint's size when the requested dtype is the file's.

Every way a file can be wrong ends in `SDLoadError` with one sentence: which file, what it is, what to do.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn as nn

from minildm.autoencoder.kl import AutoencoderKL, KLConfig
from minildm.checkpoint import CheckpointError
from minildm.modules.unet import UNet, UNetConfig
from minildm.stable_diffusion import keys as K

SD_V1_HEADS = 8  # not visible in tensor shapes: 8 heads of width C / 8 at every level (CompVis' v1 configs)
IGNORED = re.compile(r"(^|\.)(position_ids|betas|alphas_cumprod(_prev)?|sqrt_\w+|log_one_minus_alphas_cumprod|"
                     r"posterior_\w+|logvar|model_ema\..*|num_updates|decay)$")
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.bin",
                "pytorch_model.bin", "diffusion_pytorch_model.fp16.safetensors", "model.fp16.safetensors")


class SDLoadError(RuntimeError):
    """A Stable Diffusion file or folder cannot be loaded (the message says why and what to do)."""


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors / .ckpt / .bin file, memory-mapped; a .ckpt's "state_dict" is unwrapped."""
    if not path.is_file():
        raise SDLoadError(f"{path} does not exist: check the path (minildm never downloads weights).")
    try:
        if path.suffix == ".safetensors":
            from minildm.safetensors import load_safetensors
            sd = load_safetensors(path, "cpu")
        else:
            try:
                sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):  # legacy (pre-zip) pickles cannot be mapped: read them whole
                    raise
                sd = torch.load(path, map_location="cpu", weights_only=True)
    except SDLoadError:
        raise
    except CheckpointError as e:  # the safetensors reader's own one-sentence errors
        raise SDLoadError(str(e)) from None
    except Exception as e:  # truncated download, random bytes, a pickle with arbitrary objects
        raise SDLoadError(f"{path} is truncated or damaged ({type(e).__name__}: {str(e)[:120]}): "
                          "download it again and compare its size / SHA256 with the published one.") from None
    sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise SDLoadError(f"{path} holds no flat dict of tensors, so it is not a Stable Diffusion checkpoint.")
    return sd


def check_sd_v1(sd: dict[str, torch.Tensor], where: str) -> None:
    """Refuse, in one sentence, files that are SD weights but not a full SD v1.x text-to-image checkpoint."""
    names = list(sd)
    if any("lora" in k.lower() for k in names):
        raise SDLoadError(f"{where} is a LoRA file (low-rank updates only), not a full SD v1.x checkpoint: "
                          "load the base model it was trained for; minildm does not apply SD LoRA files.")
    if any(k.startswith(("conditioner.embedders.", K.UNET_PREFIX + "label_emb.", "add_embedding.")) for k in names):
        raise SDLoadError(f"{where} is an SDXL checkpoint (two text encoders, size conditioning); "
                          "minildm loads SD v1.x (e.g. v1-5-pruned-emaonly.safetensors) only.")
    text_width = [v.shape[-1] for k, v in sd.items() if k.endswith("final_layer_norm.weight")]
    if any(k.startswith("cond_stage_model.model.") for k in names) or 1024 in text_width:
        raise SDLoadError(f"{where} is an SD 2.x checkpoint (OpenCLIP ViT-H text encoder, width 1024); "
                          "minildm loads SD v1.x (text width 768) only.")
    conv_in = sd.get(K.UNET_PREFIX + "input_blocks.0.0.weight", sd.get("conv_in.weight"))
    if conv_in is not None and conv_in.ndim == 4 and conv_in.shape[1] == 9:
        raise SDLoadError(f"{where} is an inpainting UNet (9 input channels: latents, mask, masked image); "
                          "minildm's pipeline needs a text-to-image SD v1.x UNet with 4 input channels.")


def split_original(sd: dict[str, torch.Tensor], where: str) -> tuple[dict, dict, dict]:
    """A single-file state dict -> (unet, vae, text) state dicts in original names, prefixes removed."""
    check_sd_v1(sd, where)
    parts = {K.UNET_PREFIX: {}, K.VAE_PREFIX: {}, K.TEXT_PREFIX: {}}
    extra = []
    for name, tensor in sd.items():
        prefix = next((p for p in parts if name.startswith(p)), None)
        if prefix is not None and not IGNORED.search(name):
            parts[prefix][name[len(prefix):]] = tensor
        elif prefix is None and not IGNORED.search(name):
            extra.append(name)
    missing = [p + "*" for p, d in parts.items() if not d]
    if missing:
        raise SDLoadError(f"{where} has no {', '.join(missing)} tensors: it is not a full SD v1.x checkpoint "
                          "(a VAE-only or UNet-only file, or another model); use the full v1.x file.")
    if extra:
        raise SDLoadError(f"{where} has {len(extra)} tensors outside the UNet, VAE and text encoder "
                          f"(e.g. {extra[0]}): not a plain SD v1.x checkpoint.")
    return parts[K.UNET_PREFIX], parts[K.VAE_PREFIX], K.text_original_to_hf(parts[K.TEXT_PREFIX])


def unet_config_from_state_dict(sd: dict[str, torch.Tensor], heads: int = SD_V1_HEADS) -> UNetConfig:
    """UNetConfig of a minildm-named UNet state dict (shapes give everything except the heads)."""
    def blocks(prefix):
        return sorted({int(m.group(1)) for k in sd if (m := re.match(prefix + r"\.(\d+)\.", k))})

    ch = sd["input_blocks.0.0.weight"].shape[0]
    n_in = len(blocks("input_blocks"))
    downs = [i for i in blocks("input_blocks") if f"input_blocks.{i}.0.conv.weight" in sd]
    levels = len(downs) + 1
    L = (n_in - 1 - len(downs)) // levels
    mult, attention = [], []
    for lvl in range(levels):
        first = 1 + lvl * (L + 1)
        mult.append(sd[f"input_blocks.{first}.0.conv1.weight"].shape[0] // ch)
        if f"input_blocks.{first}.1.proj_in.weight" in sd:
            attention.append(lvl)
    block = next(k for k in sd if k.endswith(".proj_in.weight") and "transformer_blocks" not in k)[:-len("proj_in.weight")]
    depth = len({k.split(".")[len(block.split("."))] for k in sd if k.startswith(block + "transformer_blocks.")})
    proj = sd[block + "proj_in.weight"]
    ctx = sd[block + "transformer_blocks.0.attn2.to_k.weight"]
    return UNetConfig(in_channels=sd["input_blocks.0.0.weight"].shape[1], out_channels=sd["out.2.weight"].shape[0],
                      model_channels=ch, channel_mult=tuple(mult), num_res_blocks=L, attention_levels=tuple(attention),
                      mid_attention="middle_block.1.proj_in.weight" in sd, heads=heads, dim_head=None,
                      context_dim=ctx.shape[1], transformer_depth=depth, norm_groups=32, kernel="sdpa",
                      proj_linear=proj.ndim == 2)


def kl_config_from_state_dict(sd: dict[str, torch.Tensor]) -> KLConfig:
    ch = sd["encoder.conv_in.weight"].shape[0]
    levels = len({k.split(".")[2] for k in sd if k.startswith("encoder.down.")})
    mult = tuple(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(levels))
    n_res = len({k.split(".")[4] for k in sd if k.startswith("encoder.down.0.block.")})
    return KLConfig(in_channels=sd["encoder.conv_in.weight"].shape[1], channels=ch, channel_mult=mult,
                    num_res_blocks=n_res, z_channels=sd["post_quant_conv.weight"].shape[0])


def load_into(module: nn.Module, sd: dict[str, torch.Tensor], what: str, where: str) -> nn.Module:
    """Strict, shape-checked `load_state_dict(assign=True)` into a module built on the meta device."""
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    extra = [k for k in sd if k not in own]
    if missing or extra:
        raise SDLoadError(f"{where}: the {what} has {len(missing)} missing tensors (e.g. {missing[:2]}) and "
                          f"{len(extra)} unexpected ones (e.g. {extra[:2]}): not an SD v1.x {what}, or a damaged file.")
    wrong = [(k, tuple(sd[k].shape), tuple(v.shape)) for k, v in own.items() if sd[k].shape != v.shape]
    if wrong:
        k, got, want = wrong[0]
        raise SDLoadError(f"{where}: {len(wrong)} {what} tensors have the wrong shape (e.g. {k} is {got}, "
                          f"expected {want}): the file does not match SD v1.x's architecture.")
    module.load_state_dict(sd, strict=True, assign=True)
    return module


def build_unet(sd: dict, where: str, heads: int = SD_V1_HEADS) -> UNet:
    sd = K.unet_original_to_minildm(sd)
    try:
        cfg = unet_config_from_state_dict(sd, heads)
    except (KeyError, StopIteration, ValueError, IndexError) as e:
        raise SDLoadError(f"{where}: the UNet tensors do not form an SD v1 UNet ({type(e).__name__}: {e}).") from None
    with torch.device("meta"):
        unet = UNet(cfg)
    return load_into(unet, sd, "UNet", where)


def build_vae(sd: dict, where: str, scale_factor: float = 0.18215) -> AutoencoderKL:
    sd = K.vae_original_to_minildm(sd)
    try:
        cfg = kl_config_from_state_dict(sd)
    except (KeyError, ValueError) as e:
        raise SDLoadError(f"{where}: the autoencoder tensors do not form SD's KL autoencoder ({e}).") from None
    cfg.scale_factor = scale_factor
    with torch.device("meta"):
        vae = AutoencoderKL(cfg)
    return load_into(vae, sd, "autoencoder", where)


def build_text_encoder(sd: dict, where: str) -> nn.Module:
    """transformers-named CLIP text weights (text_model.*) -> minildm's CLIPTextTransformer."""
    from minildm.text.clip_text import CLIPTextConfig, CLIPTextTransformer, clip_text_state_dict_from_hf

    try:
        sd = clip_text_state_dict_from_hf(sd, prefix="text_model.")
        cfg = CLIPTextConfig.from_state_dict(sd)
    except CheckpointError as e:
        raise SDLoadError(f"{where}: {e}") from None
    with torch.device("meta"):
        model = CLIPTextTransformer(cfg)
    return load_into(model, sd, "text encoder", where)


def _folder_weights(folder: Path) -> Path:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise SDLoadError(f"{folder} has no weights file ({', '.join(WEIGHT_FILES[:4])}): the download is incomplete.")


def read_folder(root: Path) -> dict:
    """A diffusers folder -> {"unet", "vae", "text"} state dicts in original / transformers names + configs."""
    for part in ("unet", "vae", "text_encoder"):
        if not (root / part).is_dir():
            raise SDLoadError(f"{root} has no {part}/ folder: give a diffusers SD v1.x folder or a single .safetensors/.ckpt file.")
    unet_cfg = json.loads((root / "unet" / "config.json").read_text()) if (root / "unet" / "config.json").is_file() else {}
    vae_cfg = json.loads((root / "vae" / "config.json").read_text()) if (root / "vae" / "config.json").is_file() else {}
    unet_raw = read_tensors(_folder_weights(root / "unet"))
    check_sd_v1(unet_raw, str(root / "unet"))
    text = read_tensors(_folder_weights(root / "text_encoder"))
    check_sd_v1(text, str(root / "text_encoder"))
    # diffusers' `attention_head_dim` holds the number of heads for SD (a historical misnomer)
    heads = unet_cfg.get("num_attention_heads") or unet_cfg.get("attention_head_dim") or SD_V1_HEADS
    if isinstance(heads, (list, tuple)):
        if len(set(heads)) != 1:
            raise SDLoadError(f"{root / 'unet'} has a different number of heads per level ({heads}): SD 2.x, not v1.x.")
        heads = heads[0]
    return {"unet": K.unet_diffusers_to_original(unet_raw), "vae": K.vae_diffusers_to_original(read_tensors(_folder_weights(root / "vae"))),
            "text": K.text_original_to_hf(text), "heads": int(heads), "scale_factor": vae_cfg.get("scaling_factor", 0.18215)}


def read_checkpoint(path: str | Path) -> dict:
    """A single file or a diffusers folder -> {"unet", "vae", "text", "heads", "scale_factor"} (original names)."""
    path = Path(path)
    if path.is_dir():
        return read_folder(path)
    unet, vae, text = split_original(read_tensors(path), str(path))
    return {"unet": unet, "vae": vae, "text": text, "heads": SD_V1_HEADS, "scale_factor": 0.18215}


def read_schedule_config(path: str | Path) -> dict:
    """SD v1's noise schedule and DDIM conventions: from scheduler/scheduler_config.json when there is one."""
    cfg = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
           "steps_offset": 1, "set_alpha_to_one": False, "timestep_spacing": "leading"}
    file = Path(path) / "scheduler" / "scheduler_config.json"
    if file.is_file():
        cfg.update({k: v for k, v in json.loads(file.read_text()).items() if k in cfg})
    if cfg["beta_schedule"] != "scaled_linear":
        raise SDLoadError(f"{file} uses beta_schedule {cfg['beta_schedule']!r}; SD v1 uses scaled_linear.")
    return cfg
