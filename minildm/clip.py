"""A small CLIP (Radford et al. 2021): a contrastive text-image model for the shapes world.

Two encoders map an image and a caption into one joint space where matching pairs point the same way:

    I = W_i f_img(image)          image embedding [B, embed_dim]   (f_img: a small conv net)
    T = W_t f_txt(tokens)         text embedding  [B, embed_dim]   (f_txt: our PromptEncoder, pooled)
    logits_ij = exp(s) * <I_i / |I_i|, T_j / |T_j|>                cosine similarity times a learned scale

Training pushes each image towards its own caption and away from the other captions of the batch (the
symmetric cross-entropy in `clip_loss`). minildm uses the trained model three ways:
- the image encoder of IP-Adapter: `encode_image` gives the global image embedding that
  adapters/ip_adapter.py turns into image tokens (IP-Adapter uses CLIP's projected image embedding too);
- CLIP-T (`clip_t`, image-caption cosine) and CLIP-I (`clip_i`, image-image cosine), the two scores of
  the IP-Adapter paper, and BoLID's L_clip = 1 - cos(CLIP(x_gen), CLIP(text));
- `zero_shot_accuracy`: classify an image by its nearest caption among all 90 shapes captions.

Choices (all documented where they are made):
- Text pooling: the MEAN of the encoder outputs over the real tokens (start token included, padding
  excluded). The start-token output would also work (the encoder is bidirectional); the mean is less
  sensitive to where the words sit.
- Image pooling: the conv features are average-pooled to a fixed 4x4 grid and flattened, not pooled to one
  vector: a global average would throw away WHERE the shape is, and position is a third of every caption.
- Data (`distinct_batch`; the training loop is the CLIP stage's, train/clip.py): `sample_batch`-style jittered renders, but every batch holds DISTINCT combinations (drawn without
  replacement), so the one-hot targets of the loss are right: with two "a red circle on the left" images
  in a batch, each would be told that the other's identical caption is a negative.
- Split "all" by default: CLIP is a judge, not the model under test. The held-out combinations measure
  whether the *diffusion model* composes attributes; its judge should know every combination (as a real
  CLIP has seen far more than the model it scores).
- Images are in the model range [-1, 1], like every model input of minildm: score pipeline outputs
  (in [0, 1]) as `clip_t(model, tokenizer, images * 2 - 1, prompts)`.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from minildm.checkpoint import load_checkpoint, save_checkpoint
from minildm.data import shapes
from minildm.text.encoder import PromptEncoder, TextEncoderConfig
from minildm.text.tokenizer import Tokenizer

MAX_LOGIT_SCALE = math.log(100.0)  # the scale exp(s) is clamped at 100, as in CLIP (keeps training stable)


@dataclass
class CLIPConfig:
    max_len: int = 16  # longest token sequence (start token included)
    widths: tuple = (16, 32, 64)  # conv channels; every width after the first halves the resolution
    pool_size: int = 4  # the last feature map is average-pooled to pool_size x pool_size, then flattened
    d_img: int = 128  # width of the image encoder's output f_img(image) (before the joint projection)
    text_dim: int = 64  # width of the text encoder's token outputs
    text_depth: int = 2
    text_heads: int = 4
    embed_dim: int = 64  # width of the joint space (and of the image embedding IP-Adapter reads)
    init_temperature: float = 0.07  # logit_scale starts at log(1 / 0.07), as in CLIP

    def __post_init__(self):
        self.widths = tuple(self.widths)  # accept lists (a config read back from a checkpoint)


def _conv_block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    """3x3 conv (stride 1 keeps, stride 2 halves the resolution) -> GroupNorm -> SiLU.

    8 groups, or fewer (the largest divisor of 8 that divides c_out) for narrow or odd widths.
    """
    groups = math.gcd(8, c_out)
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.GroupNorm(groups, c_out), nn.SiLU())


class ImageEncoder(nn.Module):
    """f_img: images [B, 3, H, W] in [-1, 1] -> features [B, d_img] (H, W >= 4; 32 for shapes).

    conv(3 -> widths[0]) at full resolution, one stride-2 conv per further width (32 -> 16 -> 8 for the
    defaults), average pool to pool_size x pool_size, flatten, Linear -> d_img.
    """

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        widths = cfg.widths
        layers = [_conv_block(3, widths[0], stride=1)]
        layers += [_conv_block(c_in, c_out, stride=2) for c_in, c_out in zip(widths[:-1], widths[1:])]
        self.convs = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(cfg.pool_size)
        self.fc = nn.Linear(widths[-1] * cfg.pool_size**2, cfg.d_img)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h = self.pool(self.convs(images))  # [B, C, pool, pool]: a coarse map that still knows where things are
        return self.fc(rearrange(h, "b c h w -> b (c h w)"))


class CLIP(nn.Module):
    """Image encoder + text encoder + linear projections to the joint space + learned logit scale.

    vocab_size comes from the tokenizer (the vocabulary belongs to the tokenizer, the sizes to the config).
    """

    def __init__(self, cfg: CLIPConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.image_encoder = ImageEncoder(cfg)
        self.text_encoder = PromptEncoder(TextEncoderConfig(
            vocab_size=vocab_size, max_len=cfg.max_len, dim=cfg.text_dim, depth=cfg.text_depth,
            heads=cfg.text_heads, dim_head=cfg.text_dim // cfg.text_heads,
        ))
        self.image_proj = nn.Linear(cfg.d_img, cfg.embed_dim, bias=False)  # W_i
        self.text_proj = nn.Linear(cfg.text_dim, cfg.embed_dim, bias=False)  # W_t
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.init_temperature)))  # s, exp(s) = 1 / tau

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """I = W_i f_img(images): images [B, 3, H, W] in [-1, 1] -> [B, embed_dim] (not normalised)."""
        return self.image_proj(self.image_encoder(images))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """T = W_t mean_l h_l over real tokens: tokens [B, L] -> [B, embed_dim] (not normalised)."""
        h, mask = self.text_encoder(tokens)  # [B, L, text_dim], [B, L] (True = real token)
        m = mask.to(h.dtype)[..., None]
        pooled = (h * m).sum(dim=1) / m.sum(dim=1)  # t = sum_l m_l h_l / sum_l m_l (the start token is always real)
        return self.text_proj(pooled)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (image_emb [B, D], text_emb [B, D], logit_scale s clamped at log 100), the inputs of `clip_loss`."""
        return self.encode_image(images), self.encode_text(tokens), self.logit_scale.clamp(max=MAX_LOGIT_SCALE)


def clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric contrastive loss (CLIP's InfoNCE), a scalar.

    image_emb [B, D], text_emb [B, D] (pair i = image i with caption i), logit_scale = s (a log-scale):

        I_i = image_emb_i / |image_emb_i|,   T_j = text_emb_j / |text_emb_j|
        logits_ij = exp(s) I_i . T_j                                   [B, B]
        L_img->txt = -1/B sum_i log( exp(logits_ii) / sum_j exp(logits_ij) )   (rows: which caption?)
        L_txt->img = -1/B sum_j log( exp(logits_jj) / sum_i exp(logits_ij) )   (columns: which image?)
        L = (L_img->txt + L_txt->img) / 2

    When all logits are equal, each softmax is uniform and L = log B (chance level).
    """
    if image_emb.ndim != 2 or image_emb.shape != text_emb.shape:
        raise ValueError(f"clip_loss needs image and text embeddings of the same shape [B, D], "
                         f"got {tuple(image_emb.shape)} and {tuple(text_emb.shape)}.")
    image_emb = F.normalize(image_emb, dim=-1)  # I_i / |I_i|
    text_emb = F.normalize(text_emb, dim=-1)  # T_j / |T_j|
    scale = torch.as_tensor(logit_scale, dtype=image_emb.dtype, device=image_emb.device).exp()  # exp(s) = 1 / tau
    logits = scale * image_emb @ text_emb.T  # logits_ij = exp(s) cos(I_i, T_j)
    targets = torch.arange(len(logits), device=logits.device)  # the right partner of i is i
    loss_i2t = F.cross_entropy(logits, targets)  # softmax over each row j: image i picks its caption
    loss_t2i = F.cross_entropy(logits.T, targets)  # softmax over each column i: caption j picks its image
    return (loss_i2t + loss_t2i) / 2


# ----------------------------------------------------------------------------------------------------------
# Data (the CLIP stage, train/clip.py, trains on these batches)
# ----------------------------------------------------------------------------------------------------------
def shapes_tokenizer(max_len: int = 16) -> Tokenizer:
    """A tokenizer that knows every word a shapes caption (either form) can use."""
    return Tokenizer.build([" ".join(shapes.VOCAB_WORDS)], max_len=max_len)


def distinct_batch(batch_size: int, rng: np.random.Generator, split: str = "all", size: int = 32,
                   paraphrase_prob: float = 0.0) -> tuple[torch.Tensor, list[str]]:
    """Like `shapes.sample_batch`, but no combination appears twice: (images [B, 3, size, size] in [-1, 1], captions).

    Combinations are drawn WITHOUT replacement from the split, so batch_size is at most its size (90 for "all").
    """
    if split not in shapes.SPLITS:
        raise ValueError(f"unknown split {split!r}: use one of {list(shapes.SPLITS)}.")
    combos = shapes.SPLITS[split]
    if not 1 <= batch_size <= len(combos):
        raise ValueError(f"batch_size must be between 1 and {len(combos)} (the combinations of split {split!r}) "
                         f"so that every caption in a batch is different, got {batch_size}.")
    picks = [combos[i] for i in rng.permutation(len(combos))[:batch_size]]
    images = np.stack([shapes.render(*combo, size=size, rng=rng) for combo in picks])  # uint8 [B, H, W, 3]
    images = torch.from_numpy(rearrange(images, "b h w c -> b c h w").copy()).float() / 127.5 - 1.0  # [-1, 1]
    paraphrase = rng.random(batch_size) < paraphrase_prob
    return images, [shapes.caption(*combo, paraphrase=bool(p)) for combo, p in zip(picks, paraphrase)]


# ----------------------------------------------------------------------------------------------------------
# Scores (no gradients; images in [-1, 1])
# ----------------------------------------------------------------------------------------------------------
def _check_images(images: torch.Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"CLIP expects images [B, 3, H, W] in [-1, 1], got shape {tuple(images.shape)}.")


@torch.no_grad()
def _image_directions(model: CLIP, images: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """images [N, 3, H, W] in [-1, 1] -> unit image embeddings [N, D], encoded in chunks."""
    _check_images(images)
    parts = [model.encode_image(images[i:i + chunk].to(model.device)) for i in range(0, len(images), chunk)]
    return F.normalize(torch.cat(parts), dim=-1)


@torch.no_grad()
def _text_directions(model: CLIP, tokenizer: Tokenizer, texts: list[str]) -> torch.Tensor:
    """N captions -> unit text embeddings [N, D]."""
    return F.normalize(model.encode_text(tokenizer.encode(list(texts)).to(model.device)), dim=-1)


def zero_shot_accuracy(model: CLIP, tokenizer: Tokenizer, images: torch.Tensor, true_captions: list[str]) -> float:
    """Fraction of images whose most similar caption, among the 90 captions of ALL_COMBOS, is the true one.

    images [N, 3, H, W] in [-1, 1]; true_captions: N captions in either form (compared as combinations).
    """
    if len(images) != len(true_captions) or len(images) == 0:
        raise ValueError(f"need one caption per image and at least one image, got {len(images)} images "
                         f"and {len(true_captions)} captions.")
    candidates = _text_directions(model, tokenizer, [shapes.caption(*combo) for combo in shapes.ALL_COMBOS])  # [90, D]
    similarity = _image_directions(model, images) @ candidates.T  # [N, 90] cosines
    predicted = similarity.argmax(dim=-1).cpu()
    truth = torch.tensor([shapes.ALL_COMBOS.index(shapes.parse_caption(c)) for c in true_captions])
    return (predicted == truth).float().mean().item()


def clip_t(model: CLIP, tokenizer: Tokenizer, images: torch.Tensor, prompts: list[str]) -> float:
    """CLIP-T: mean over i of cos(I(image_i), T(prompt_i)).  images [N, 3, H, W] in [-1, 1], N prompts."""
    if len(images) != len(prompts) or len(images) == 0:
        raise ValueError(f"need one prompt per image and at least one image, got {len(images)} images "
                         f"and {len(prompts)} prompts.")
    cosines = (_image_directions(model, images) * _text_directions(model, tokenizer, prompts)).sum(dim=-1)
    return cosines.mean().item()


def clip_i(model: CLIP, images_a: torch.Tensor, images_b: torch.Tensor) -> float:
    """CLIP-I: mean over i of cos(I(a_i), I(b_i)), e.g. generated image vs its image prompt.  [N, 3, H, W] each."""
    if images_a.shape != images_b.shape or len(images_a) == 0:
        raise ValueError(f"clip_i compares images pairwise: give two non-empty batches of the same shape, "
                         f"got {tuple(images_a.shape)} and {tuple(images_b.shape)}.")
    return (_image_directions(model, images_a) * _image_directions(model, images_b)).sum(dim=-1).mean().item()


# ----------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------
def clip_state(model: CLIP, tokenizer: Tokenizer) -> dict:
    """A "clip" checkpoint's entries: {"config": asdict(cfg), "weights": state_dict, "tokenizer": word list + max_len}."""
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {"config": asdict(model.cfg), "weights": weights, "tokenizer": tokenizer.state()}


def save_clip(path: str | os.PathLike, model: CLIP, tokenizer: Tokenizer) -> Path:
    """Write a "clip" checkpoint (`clip_state`)."""
    return save_checkpoint(path, "clip", clip_state(model, tokenizer))


def load_clip(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[CLIP, Tokenizer]:
    """Read a "clip" checkpoint written by `save_clip` -> (model in eval mode on `device`, tokenizer)."""
    state = load_checkpoint(path, "clip")
    tokenizer = Tokenizer.from_state(state["tokenizer"])
    model = CLIP(CLIPConfig(**state["config"]), tokenizer.vocab_size)
    model.load_state_dict(state["weights"])
    return model.to(device).eval(), tokenizer
