"""Stable Diffusion v1.x on minildm's own modules: the pieces `LatentDiffusion.from_stable_diffusion` assembles.

    prompt --BPE (77 ids, padded with <|endoftext|>)--> CLIP ViT-L/14 text transformer --> tau(y) [B, 77, 768]
    z_T [B, 4, H/8, W/8] --DDIM ("leading" + offset 1, last step to abar_0), CFG 7.5, UNet 860M--> z_0
    image = KL decoder(z_0 / 0.18215)

SD v1 is exactly LDM (Rombach et al. 2022, arXiv:2112.10752) with a frozen CLIP text encoder (Radford et al.
2021, arXiv:2103.00020) as tau_theta; minildm's own models differ only in size and in their tokenizer /
prompt encoder. load.py reads the weights, keys.py maps their names.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from minildm.stable_diffusion.load import (SDLoadError, build_text_encoder, build_unet, build_vae, read_checkpoint,
                                           read_schedule_config)

__all__ = ["SDLoadError", "CLIPTokens", "CLIPPromptEncoder", "load_components", "find_tokenizer"]


class CLIPTokens:
    """SD's tokenizer behind minildm's Tokenizer interface: encode(prompts) -> LongTensor [B, 77].

    `bpe` is any callable list[str] -> LongTensor [B, 77] padded with <|endoftext|> (minildm's BPETokenizer).
    """

    def __init__(self, bpe, max_length: int = 77):
        self.bpe, self.max_length = bpe, max_length

    def encode(self, prompts: list[str]) -> torch.Tensor:
        return self.bpe(list(prompts), max_length=self.max_length)


class CLIPPromptEncoder(nn.Module):
    """tau_theta of SD v1: ids [B, 77] -> (last hidden state after the final LayerNorm [B, 77, 768], mask None).

    No padding mask: SD's UNet cross-attends to all 77 positions, the <|endoftext|> padding included.
    """

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.transformer(ids), None


def find_tokenizer(path: Path):
    """The BPE files that belong to a checkpoint: tokenizer/ of a diffusers folder, or vocab.json + merges.txt
    (or a tokenizer/ folder) next to a single file. None if there are none."""
    from minildm.text.bpe import BPETokenizer

    for folder in (path / "tokenizer", path.parent / "tokenizer", path.parent):
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            return BPETokenizer.from_folder(folder)
    return None


def load_components(path: str | Path, tokenizer=None) -> dict:
    """unet, autoencoder, text_encoder (CLIPPromptEncoder), tokenizer (CLIPTokens), schedule config of an SD v1.x
    file or folder. `tokenizer`: a callable (list[str], max_length) -> LongTensor [B, 77], when the checkpoint
    has none next to it (single files carry no vocabulary)."""
    path = Path(path)
    raw = read_checkpoint(path)
    where = str(path)
    unet = build_unet(raw["unet"], where, raw["heads"])
    vae = build_vae(raw["vae"], where, raw["scale_factor"])
    text = build_text_encoder(raw["text"], where)
    if tokenizer is None:
        tokenizer = find_tokenizer(path)
    if tokenizer is None:
        raise SDLoadError(f"no tokenizer for {path}: put vocab.json and merges.txt (from the model's tokenizer/ "
                          "folder) next to the file, or pass tokenizer=.")
    return {"unet": unet, "autoencoder": vae, "text_encoder": CLIPPromptEncoder(text), "tokenizer": CLIPTokens(tokenizer),
            "scheduler": read_schedule_config(path if path.is_dir() else path.parent)}
