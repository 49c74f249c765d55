"""Small random-weight Stable Diffusion v1 layouts written by the reference libraries (diffusers, transformers),
for the parity tests: a diffusers folder and an original single file with the same weights.

The original single file is written by our own converter (minildm.stable_diffusion.keys); `check_original_layout`
verifies it independently with diffusers' own single-file conversion (original -> diffusers names), so a
wrong "original" name cannot hide behind a converter that is its own inverse.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from minildm.stable_diffusion import keys as K

TEXT_WIDTH, TEXT_VOCAB = 128, 1000  # 2 heads of 64 (CLIP's head width)
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                 set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading", num_train_timesteps=1000)


def byte_vocab(folder: Path) -> Path:
    """A tiny CLIP-style BPE vocabulary (bytes, bytes + </w>, a few merges, the two special tokens)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]  # GPT-2's byte -> unicode table, in byte order
    table = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(shifted)}
    chars = [table[b] for b in sorted(printable)] + [table[b] for b in shifted]
    merges = [("t", "h"), ("th", "e</w>"), ("c", "a"), ("ca", "t</w>"), ("r", "e"), ("re", "d</w>")]
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({v: i for i, v in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return folder


def hf_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), model_max_length=77)


def ids_fn(tok):
    """transformers' CLIPTokenizer as the callable minildm's pipeline takes: (texts, max_length) -> [B, 77]."""
    return lambda texts, max_length=77: tok(list(texts), padding="max_length", max_length=max_length,
                                            truncation=True, return_tensors="pt").input_ids


def components(seed: int = 0):
    """Random-weight diffusers UNet (8 heads per level, SD v1's block types), AutoencoderKL, CLIPTextModel."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_WIDTH, attention_head_dim=8, norm_num_groups=32)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=1,
                        latent_channels=4, norm_num_groups=32, sample_size=16)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=TEXT_VOCAB, hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH,
                                        num_hidden_layers=2, num_attention_heads=TEXT_WIDTH // 64,
                                        max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=TEXT_VOCAB - 2,
                                        eos_token_id=TEXT_VOCAB - 1, pad_token_id=TEXT_VOCAB - 1))
    # zero-initialised layers get random weights too (else part of the UNet would go untested), biases and
    # norm affines move off 0 / 1
    for module in (unet, vae, text):
        with torch.no_grad():
            for name, p in module.named_parameters():
                if p.ndim == 1:
                    p.add_(0.05 * torch.randn_like(p))
                elif not p.any():
                    p.copy_(0.05 * torch.randn_like(p))
        module.eval()
    return unet, vae, text


def write_folder(root: Path, unet, vae, text) -> Path:
    """The diffusers folder layout of SD v1.x: unet/, vae/, text_encoder/, tokenizer/, scheduler/."""
    from diffusers import DDIMScheduler

    unet.save_pretrained(root / "unet")  # .safetensors files, read by minildm's own reader
    vae.save_pretrained(root / "vae", safe_serialization=False)  # a .bin (torch pickle), the older folders' format
    text.save_pretrained(root / "text_encoder")
    DDIMScheduler(**SCHEDULER).save_pretrained(root / "scheduler")
    byte_vocab(root / "tokenizer")
    return root


def original_state_dict(unet, vae, text) -> dict[str, torch.Tensor]:
    """The original single-file layout (CompVis names and prefixes, plus the buffers real files carry)."""
    sd = {K.UNET_PREFIX + k: v for k, v in K.unet_diffusers_to_original(unet.state_dict()).items()}
    sd.update({K.VAE_PREFIX + k: v for k, v in K.vae_diffusers_to_original(vae.state_dict()).items()})
    sd.update({K.TEXT_PREFIX + "text_model." + k.removeprefix("text_model."): v for k, v in text.state_dict().items()})
    sd[K.TEXT_PREFIX + "text_model.embeddings.position_ids"] = torch.arange(77)[None]
    sd["betas"] = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    sd["alphas_cumprod"] = torch.cumprod(1 - sd["betas"], 0)
    return {k: v.contiguous() for k, v in sd.items()}


def check_original_layout(sd: dict, unet, vae) -> None:
    """diffusers' own original -> diffusers conversion must give back the diffusers state dicts exactly."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    back = convert_ldm_unet_checkpoint(sd, {"layers_per_block": unet.config.layers_per_block})
    assert set(back) == set(unet.state_dict()), set(back) ^ set(unet.state_dict())
    assert all(torch.equal(back[k], v) for k, v in unet.state_dict().items())
    back = convert_ldm_vae_checkpoint(sd, dict(vae.config))
    assert set(back) == set(vae.state_dict()), set(back) ^ set(vae.state_dict())
    assert all(torch.equal(back[k].reshape(v.shape), v) for k, v in vae.state_dict().items())

