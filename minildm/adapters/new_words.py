"""New words for a trained prompt encoder: one trainable row of the token table per word (as in textual
inversion, Gal et al. 2022, arXiv:2208.01618), on top of the frozen table.

    E' = [E ; e_new]        E [V, d] frozen, e_new [k, d] trainable

The tokenizer gets the words as ids V .. V+k-1; the ids of the old words do not change, so every old prompt
is tokenized and encoded exactly as by the base model. The LoRA stage (train/lora.py) trains e_new with the
UNet's LoRA layers; a LoRA file carries the rows (adapters/lora.py: apply_lora).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minildm.text.tokenizer import Tokenizer


class NewWordEmbedding(nn.Module):
    """The base nn.Embedding (frozen) with k trainable rows appended for new words.

    forward: tokens [B, L] (ids 0..V+k-1) -> [B, L, d], looked up in E' = [E ; new_rows], [V + k, d].
    """

    def __init__(self, base: nn.Embedding, new_rows: torch.Tensor):
        super().__init__()
        self.base = base.requires_grad_(False)  # E [V, d], the base model's words
        self.new_rows = nn.Parameter(new_rows.detach().clone().to(base.weight))  # [k, d], the new words

    @property
    def weight(self) -> torch.Tensor:
        """E' = [E ; new_rows], [V + k, d]."""
        return torch.cat([self.base.weight, self.new_rows])

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.weight)


def add_words(pipe, words: list[str], rows: torch.Tensor) -> NewWordEmbedding:
    """Give `pipe` new words: ids V..V+k-1 in its tokenizer, rows [k, d] in its prompt encoder's token table.

    Ids of the old words do not change, so old prompts tokenize exactly as before.
    """
    known = [w for w in words if w in pipe.tokenizer.word_to_id]
    if known:
        raise ValueError(f"'{known[0]}' is already a word of this model: a concept adapter adds new words only.")
    if rows.shape != (len(words), pipe.text_encoder.cfg.dim):
        raise ValueError(f"new word rows have shape {list(rows.shape)} but this prompt encoder needs "
                         f"[{len(words)}, {pipe.text_encoder.cfg.dim}]: the file was made for another model.")
    if isinstance(pipe.text_encoder.token_emb, NewWordEmbedding):
        raise ValueError("this model already has new words: load the base run again before adding others.")
    pipe.tokenizer = Tokenizer(pipe.tokenizer.words + list(words), pipe.tokenizer.max_len)
    pipe.text_encoder.token_emb = NewWordEmbedding(pipe.text_encoder.token_emb, rows)
    return pipe.text_encoder.token_emb
