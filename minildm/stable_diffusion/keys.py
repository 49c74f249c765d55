"""Parameter names of Stable Diffusion v1 in its two published layouts, mapped onto minildm's modules.

Three spellings of the same tensors:
- original single files (CompVis' ldm code, `v1-5-pruned-emaonly.safetensors` / `.ckpt`):
      model.diffusion_model.input_blocks.1.0.in_layers.0.weight        UNet, blocks numbered as one list
      first_stage_model.encoder.down.0.block.0.norm1.weight            KL autoencoder
      cond_stage_model.transformer.text_model.encoder.layers.0...      CLIP text model (transformers' names)
- diffusers folders (unet/, vae/, text_encoder/): the UNet regrouped by resolution level
      down_blocks.0.resnets.0.norm1.weight,  mid_block.attentions.0...,  up_blocks.3.resnets.2...
- minildm: the UNet keeps the original block numbering (input_blocks / middle_block / output_blocks) with
  its own names inside a block; the KL autoencoder uses the original names as they are.

Everything is first brought to the original names (`*_diffusers_to_original`), then renamed to minildm's
(`unet_original_to_minildm`, `vae_original_to_minildm`). Renaming never copies a tensor.
"""
from __future__ import annotations

import re

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."

# inside a UNet ResBlock: diffusers -> original
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
# inside a UNet block: original -> minildm (ResBlock parts, Downsample conv, attention output, GEGLU)
_ORIGINAL_TO_MINILDM = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_proj",
                        "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "skip", "op": "conv",
                        "to_out.0": "to_out", "ff.net.0.proj": "ff.proj_in", "ff.net.2": "ff.proj_out"}
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
# VAE mid-block attention: diffusers (new and old names) -> original
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
             "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}


def _rename_prefix(name: str, table: dict[str, str]) -> str:
    """Replace the longest leading dotted part of `name` found in `table`."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        head = ".".join(parts[:n])
        if head in table:
            return ".".join([table[head]] + parts[n:])
    return name


def _level_count(keys, pattern: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def unet_diffusers_to_original(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel names -> CompVis `input_blocks / middle_block / output_blocks` names.

    Level b of the down path with L ResBlocks owns input_blocks 1 + b (L + 1) + j (j < L: ResBlock j and its
    SpatialTransformer, j = L: the Downsample); up level b owns output_blocks b (L + 1) + j, j = 0..L, the
    Upsample sitting after the SpatialTransformer (index 2) or after the ResBlock (index 1).
    Names it does not know (e.g. SDXL's add_embedding) pass through unchanged, so a strict load names them.
    """
    L = _level_count(sd, r"down_blocks\.0\.resnets\.(\d+)\.")
    up_has_attention = {int(m.group(1)) for k in sd if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    out = {}
    for name, tensor in sd.items():
        new = _rename_prefix(name, _UNET_TOP)
        if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", name):
            b, kind, j, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
            part = f"0.{_rename_prefix(rest, _RESNET)}" if kind == "resnets" else f"1.{rest}"
            new = f"input_blocks.{1 + b * (L + 1) + j}.{part}"
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", name):
            new = f"input_blocks.{1 + int(m.group(1)) * (L + 1) + L}.0.op.{m.group(2)}"
        elif m := re.match(r"mid_block\.resnets\.(\d)\.(.*)", name):
            new = f"middle_block.{2 * int(m.group(1))}.{_rename_prefix(m.group(2), _RESNET)}"
        elif m := re.match(r"mid_block\.attentions\.0\.(.*)", name):
            new = f"middle_block.1.{m.group(1)}"
        elif m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", name):
            b, kind, j, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
            part = f"0.{_rename_prefix(rest, _RESNET)}" if kind == "resnets" else f"1.{rest}"
            new = f"output_blocks.{b * (L + 1) + j}.{part}"
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", name):
            b = int(m.group(1))
            new = f"output_blocks.{b * (L + 1) + L}.{2 if b in up_has_attention else 1}.conv.{m.group(2)}"
        out[new] = tensor
    return out


def unet_original_to_minildm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CompVis UNet names (without the model.diffusion_model. prefix) -> minildm.modules.unet.UNet names."""
    out = {}
    for name, tensor in sd.items():
        m = re.match(r"((?:input_blocks|output_blocks)\.\d+\.\d+|middle_block\.\d+)\.(.*)", name)
        if m:  # inside a block: rename the part after "<block>.<layer>." (possibly deep in a transformer block)
            inner = m.group(2)
            t = re.match(r"(transformer_blocks\.\d+\.(?:attn[12]\.)?)(.*)", inner)
            inner = t.group(1) + _rename_prefix(t.group(2), _ORIGINAL_TO_MINILDM) if t else \
                _rename_prefix(inner, _ORIGINAL_TO_MINILDM)
            name = f"{m.group(1)}.{inner}"
        out[name] = tensor
    return out


def vae_diffusers_to_original(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL names -> CompVis names; attention Linear weights [C, C] -> 1x1 convs [C, C, 1, 1].

    The decoder's up_blocks run from the lowest resolution (up_blocks.0) while CompVis indexes `up` by
    level (up.0 = full resolution): up_blocks.i = up.(n - 1 - i).
    """
    n_up = _level_count(sd, r"decoder\.up_blocks\.(\d+)\.")
    out = {}
    for name, tensor in sd.items():
        new = name.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        if m := re.match(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.*)", new):
            part, way, i, kind, j, rest = m.groups()
            level = int(i) if way == "down" else n_up - 1 - int(i)
            inner = f"block.{j}" if kind == "resnets" else ("downsample" if way == "down" else "upsample")
            new = f"{part}.{way}.{level}.{inner}.{rest}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.*)", new):
            new = f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.{m.group(3)}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", new):
            new = f"{m.group(1)}.mid.attn_1.{_rename_prefix(m.group(2), _VAE_ATTN)}"
            if tensor.ndim == 2:
                tensor = tensor[:, :, None, None]
        out[new] = tensor
    return out


def vae_original_to_minildm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """minildm's AutoencoderKL uses the original names; only attention weights saved as Linear get reshaped."""
    return {k: v[:, :, None, None] if ".attn_1." in k and k.endswith("weight") and v.ndim == 2 else v
            for k, v in sd.items()}


def text_original_to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """cond_stage_model.transformer.* (prefix removed) or a text_encoder/ file -> `text_model.*` names.

    Old single files and files saved by transformers >= 5 lack the `text_model.` level; position_ids are a
    constant buffer, not weights.
    """
    out = {}
    for name, tensor in sd.items():
        name = name if name.startswith("text_model.") else "text_model." + name
        if not name.endswith("position_ids"):
            out[name] = tensor
    return out


# ---------------------------------------------------------------------------------------------------------
# The way back: minildm's modules -> the original single-file names (to write an SD-layout file, e.g. the
# random-weight one of lesson 17 and bench/sd_random.py)
# ---------------------------------------------------------------------------------------------------------
_RESBLOCK_BACK = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_proj": "emb_layers.1", "norm2": "out_layers.0",
                  "conv2": "out_layers.3", "skip": "skip_connection"}
_TRANSFORMER_BACK = {"to_out": "to_out.0", "ff.proj_in": "ff.net.0.proj", "ff.proj_out": "ff.net.2"}
_TEXT_BACK = [(r"token_embedding\.weight", "embeddings.token_embedding.weight"),
              (r"position_embedding$", "embeddings.position_embedding.weight"),
              (r"layers\.(\d+)\.attn\.to_(q|k|v)\.", r"encoder.layers.\1.self_attn.\2_proj."),
              (r"layers\.(\d+)\.attn\.to_out\.", r"encoder.layers.\1.self_attn.out_proj."),
              (r"layers\.(\d+)\.norm(1|2)\.", r"encoder.layers.\1.layer_norm\2."),
              (r"layers\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
              (r"final_norm\.", "final_layer_norm.")]


def unet_minildm_to_original(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """minildm UNet names -> CompVis names (the inverse of `unet_original_to_minildm`)."""
    out = {}
    for name, tensor in sd.items():
        m = re.match(r"((?:input_blocks|output_blocks)\.\d+\.\d+|middle_block\.\d+)\.(.*)", name)
        if m:
            layer, inner = m.groups()
            if f"{layer}.proj_in.weight" in sd:  # a SpatialTransformer
                t = re.match(r"(transformer_blocks\.\d+\.(?:attn[12]\.)?)(.*)", inner)
                inner = t.group(1) + _rename_prefix(t.group(2), _TRANSFORMER_BACK) if t else inner
            elif f"{layer}.conv1.weight" in sd:  # a ResBlock
                inner = _rename_prefix(inner, _RESBLOCK_BACK)
            elif layer.startswith("input_blocks"):  # a Downsample: CompVis calls its conv `op`
                inner = _rename_prefix(inner, {"conv": "op"})
            name = f"{layer}.{inner}"
        out[name] = tensor
    return out


def text_minildm_to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """minildm CLIPTextTransformer names -> transformers' `text_model.*` names."""
    out = {}
    for name, tensor in sd.items():
        for pattern, repl in _TEXT_BACK:
            if re.match(pattern, name):
                name = re.sub(pattern, repl, name, count=1)
                break
        out["text_model." + name] = tensor
    return out


def original_state_dict(unet: torch.nn.Module, vae: torch.nn.Module, text: torch.nn.Module) -> dict[str, torch.Tensor]:
    """minildm's UNet, AutoencoderKL and CLIPTextTransformer -> one original single-file state dict."""
    sd = {UNET_PREFIX + k: v for k, v in unet_minildm_to_original(unet.state_dict()).items()}
    sd.update({VAE_PREFIX + k: v for k, v in vae.state_dict().items()})
    sd.update({TEXT_PREFIX + k: v for k, v in text_minildm_to_hf(text.state_dict()).items()})
    return sd
