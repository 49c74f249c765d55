"""CLIP's text transformer (ViT-L/14's, as in Stable Diffusion v1): SD's prompt model tau_theta(y).

CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision",
arXiv:2103.00020) trains a text transformer and an image encoder so matching captions and images get
similar embeddings. SD v1 freezes CLIP ViT-L/14's text half and gives the UNet its last hidden states:

    h_0 = E[y] + P                                    token embedding [49408, 768] + learned positions [77, 768]
    for l = 1..12 (pre-LN, as GPT-2):
        h = h + Attn(LN_1 h, causal)                  12 heads of 64; Q, K, V and out all have biases
        h = h + W_2 quick_gelu(W_1 LN_2 h + b_1) + b_2     768 -> 3072 -> 768
    tau_theta(y) = LN_final(h_12)                     [B, 77, 768], every position (padding included)

Causal mask: position i attends only to positions j <= i (CLIP's text model is a GPT-style language
model). So the <|endoftext|> padding after a prompt never changes the real tokens' states, and SD
needs no padding mask; the padding positions' states still reach the UNet's cross-attention.
quick_gelu(x) = x * sigmoid(1.702 x): the sigmoid approximation of GELU (Hendrycks & Gimpel 2016,
arXiv:1606.08415) that CLIP was trained with; it differs from exact GELU by up to 0.020 (near x = -2.27).
CLIP's pooled output (the state at <|endoftext|>, projected) is for matching images; SD does not use it.

Weights: `clip_text_state_dict_from_hf` renames transformers' `CLIPTextModel` keys (diffusers'
`text_encoder/`, and the original SD file's `cond_stage_model.transformer.text_model.*`) to ours.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn as nn

from minildm.checkpoint import CheckpointError
from minildm.modules.attention import Attention

HEAD_WIDTH = 64  # CLIP's text transformers all use 64-wide heads: heads = width / 64 (768 -> 12)


@dataclass
class CLIPTextConfig:
    vocab_size: int = 49408  # 256 bytes + 256 bytes</w> + 48894 merges + 2 specials
    max_positions: int = 77
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp: int = 3072  # hidden width of each MLP (4 x width)
    layer_norm_eps: float = 1e-5
    kernel: str = "naive"  # attention kernel, see modules/attention.py

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], heads: int | None = None) -> "CLIPTextConfig":
        """The config whose shapes a (minildm-named) state dict has; heads = width / 64 unless given
        (head counts are not visible in tensor shapes)."""
        try:
            vocab_size, width = sd["token_embedding.weight"].shape
            max_positions = sd["position_embedding"].shape[0]
            mlp = sd["layers.0.mlp.fc1.weight"].shape[0]
        except KeyError as e:
            raise CheckpointError(f"not a CLIP text transformer state dict: it has no {e.args[0]!r} tensor.") from None
        if heads is None and width % HEAD_WIDTH:
            raise CheckpointError(f"CLIP text width {width} is not a multiple of {HEAD_WIDTH}: pass heads= explicitly.")
        layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.", k)))
        return cls(vocab_size, max_positions, width, layers, heads or width // HEAD_WIDTH, mlp)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 x), CLIP's activation."""
    return x * torch.sigmoid(1.702 * x)


def causal_mask(n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """[1, 1, n, n] bool, True where key j <= query i (lower triangle): attend to the past only."""
    return torch.ones(n, n, dtype=torch.bool, device=device).tril()[None, None]


class CLIPMLP(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp)  # W_1, b_1
        self.fc2 = nn.Linear(cfg.mlp, cfg.width)  # W_2, b_2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(quick_gelu(self.fc1(x)))


class CLIPLayer(nn.Module):
    """h += Attn(LN_1 h, causal); h += MLP(LN_2 h).  h [B, N, width]."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        if cfg.width % cfg.heads:
            raise ValueError(f"CLIP width {cfg.width} is not divisible by {cfg.heads} heads.")
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg.width, heads=cfg.heads, dim_head=cfg.width // cfg.heads, kernel=cfg.kernel,
                              qkv_bias=True)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        h = h + self.attn(self.norm1(h), mask=mask)
        return h + self.mlp(self.norm2(h))


class CLIPTextTransformer(nn.Module):
    """token ids [B, N] (N <= 77; SD always gives 77) -> last hidden states after LN_final [B, N, width]."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)  # E
        self.position_embedding = nn.Parameter(torch.empty(cfg.max_positions, cfg.width))  # P
        nn.init.normal_(self.token_embedding.weight, std=0.02)  # CLIP's initialisation
        nn.init.normal_(self.position_embedding, std=0.01)
        self.layers = nn.ModuleList([CLIPLayer(cfg) for _ in range(cfg.layers)])
        self.final_norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.ndim != 2 or tokens.shape[1] > self.cfg.max_positions:
            raise ValueError(f"CLIPTextTransformer expects token ids [B, N] with N <= {self.cfg.max_positions}, "
                             f"got {tuple(tokens.shape)}; use BPETokenizer(prompts).")
        n = tokens.shape[1]
        h = self.token_embedding(tokens) + self.position_embedding[:n]  # h_0 = E[y] + P
        mask = causal_mask(n, tokens.device)  # built here, not a buffer: the model can be built on "meta"
        for layer in self.layers:
            h = layer(h, mask)
        return self.final_norm(h)


# transformers' CLIPTextModel names (after the prefix) -> ours. `position_ids` is an index buffer: ignored.
HF_RENAMES = [
    (r"embeddings\.token_embedding\.weight", "token_embedding.weight"),
    (r"embeddings\.position_embedding\.weight", "position_embedding"),
    (r"encoder\.layers\.(\d+)\.self_attn\.q_proj\.", r"layers.\1.attn.to_q."),
    (r"encoder\.layers\.(\d+)\.self_attn\.k_proj\.", r"layers.\1.attn.to_k."),
    (r"encoder\.layers\.(\d+)\.self_attn\.v_proj\.", r"layers.\1.attn.to_v."),
    (r"encoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"layers.\1.attn.to_out."),
    (r"encoder\.layers\.(\d+)\.layer_norm1\.", r"layers.\1.norm1."),
    (r"encoder\.layers\.(\d+)\.layer_norm2\.", r"layers.\1.norm2."),
    (r"encoder\.layers\.(\d+)\.mlp\.(fc[12])\.", r"layers.\1.mlp.\2."),
    (r"final_layer_norm\.", "final_norm."),
]


def clip_text_state_dict_from_hf(sd: dict[str, torch.Tensor], prefix: str = "text_model.") -> dict[str, torch.Tensor]:
    """transformers-named CLIP text weights -> minildm names (same tensors, no copies).

    Keys outside `prefix` are skipped, so a whole SD file can be passed with
    prefix="cond_stage_model.transformer.text_model.". Files saved by transformers >= 5 drop the
    "text_model." level (keys start at "embeddings."): when no key has the prefix and it ends with
    "text_model.", that level is dropped from it too. Raises CheckpointError in one sentence when a
    tensor is unknown, missing or of the wrong shape for the CLIP text transformer the shapes describe.
    """
    if prefix.endswith("text_model.") and not any(k.startswith(prefix) for k in sd):
        prefix = prefix[: -len("text_model.")]
    out, unknown = {}, []
    for key, value in sd.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if name == "embeddings.position_ids":
            continue
        for pattern, repl in HF_RENAMES:
            if re.match(pattern, name):
                out[re.sub(pattern, repl, name, count=1)] = value
                break
        else:
            unknown.append(key)
    if not out:
        raise CheckpointError(f"no CLIP text weights under the prefix {prefix!r} ({len(sd)} tensors given).")
    if unknown:
        raise CheckpointError(f"{len(unknown)} tensors under {prefix!r} are not part of a CLIP text transformer "
                              f"(e.g. {unknown[0]!r}).")
    _check_state_dict(out, CLIPTextConfig.from_state_dict(out), what="CLIP text transformer")
    return out


def _check_state_dict(sd: dict[str, torch.Tensor], cfg: CLIPTextConfig, what: str) -> None:
    """One sentence if `sd` lacks tensors of, has extras for, or mis-shapes the model `cfg` describes."""
    with torch.device("meta"):  # shapes only, no memory
        expected = {k: v.shape for k, v in CLIPTextTransformer(cfg).state_dict().items()}
    missing = [k for k in expected if k not in sd]
    extra = [k for k in sd if k not in expected]
    wrong = [k for k in expected if k in sd and sd[k].shape != expected[k]]
    if missing:
        raise CheckpointError(f"the {what} weights lack {len(missing)} tensors (e.g. {missing[0]!r}): "
                              "the file is incomplete or not CLIP's text model.")
    if extra:
        raise CheckpointError(f"the {what} weights have {len(extra)} unexpected tensors (e.g. {extra[0]!r}).")
    if wrong:
        k = wrong[0]
        raise CheckpointError(f"the {what} weights have {len(wrong)} tensors of the wrong shape (e.g. {k!r} is "
                              f"{tuple(sd[k].shape)}, expected {tuple(expected[k])}).")
