"""IP-Adapter (Ye et al. 2023, arXiv:2308.06721): image prompts for a frozen text-to-image UNet.

An image prompt enters the UNet through its own keys and values, next to the text's, in every
cross-attention layer ("decoupled cross-attention"):

    c_i = LayerNorm(rearrange(W_p e_img, "b (n d) -> b n d"))          N = 4 image tokens from one CLIP embedding
    Z   = softmax(Q K^T / sqrt d) V + lambda softmax(Q K'^T / sqrt d) V'
    Q = x W_q,  K = c_t W_k,  V = c_t W_v,  K' = c_i W'_k,  V' = c_i W'_v        x: the pixel tokens, c_t: the text

Same query and heads for both terms; the two softmaxes are separate (text and image tokens do not compete
for attention, unlike concatenating them into one key set); the sum goes through the layer's own to_out.
Only the projection W_p (+ LayerNorm) and W'_k, W'_v of each layer train; W'_k, W'_v start as copies of
W_k, W_v (faster convergence); the UNet is frozen. lambda = 0 gives back the text-only model exactly.

How image tokens reach the layers: like the original IP-Adapter, they travel in the UNet's `context`,
concatenated AFTER the text tokens along the token axis, and each decoupled layer splits them off again by
the known token counts. The UNet's signature does not change; the text mask still covers the text part
only (the image branch has no mask: every image token is real).

Extra streams (BoLID, Kazachkov & Filatov: A(Q, K_t, V_t) + lambda_ref A(Q, K_ref, V_ref) + lambda_b A(Q, K_b, V_b)) are
configuration, not new code: `install_ip_adapter(unet, num_tokens=4, extra_streams={"body": 4})` gives
each layer a second pair `to_k_body`, `to_v_body` with its own lambda, and the context becomes
cat[text, ip tokens, body tokens] (streams in installation order).

A missing reference zeroes its term without any mask: W'_k and W'_v have no bias, so all-zero tokens give
K' = V' = 0 and softmax(Q K'^T / sqrt d) V' = 0 exactly. Pass zeros for that sample's tokens. (This is not
the same as IP-Adapter's training-time image drop, which zeroes the CLIP embedding BEFORE the projection:
the LayerNorm's bias then gives learned "no image" tokens, the image half of classifier-free guidance.)

Training recipe (the trainer in minildm/train wires it; everything but W_p, W'_k, W'_v is frozen):
    projection = new_ip_adapter(unet, IPAdapterConfig(clip.cfg.embed_dim, unet.cfg.context_dim))
    optimizer  = AdamW(ip_adapter_parameters(unet, projection))
    per step:
    drop_text, drop_image = drop_conditions(B, 0.05)       text only, image only, both: p = 0.05 each
    e_img   = clip.encode_image(reference)                 [B, d_img]   frozen CLIP, in torch.no_grad()
    e_img   = where(drop_image, 0, e_img)                   a dropped image is a zero embedding
    c_i     = projection(e_img)                             [B, 4, context_dim]
    c_t, m  = text_encoder(tokens with "" where drop_text)  [B, L, context_dim], [B, L] (frozen)
    eps_hat = unet(z_t, t, torch.cat([c_t, c_i], dim=1), m)
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
from einops import rearrange

from minildm.checkpoint import check_entries, copy_checked
from minildm.modules.attention import Attention, attention
from minildm.modules.transformer import BasicTransformerBlock

IP = "ip"  # the name of IP-Adapter's image stream


@dataclass
class IPAdapterConfig:
    d_img: int  # width of the CLIP image embedding (clip.cfg.embed_dim)
    context_dim: int  # width of the UNet's cross-attention context (unet.cfg.context_dim)
    num_tokens: int = 4  # N image tokens per image (the paper's N = 4)
    drop_prob: float = 0.05  # training: drop text only, image only, and both, each with this probability
    ip_lambda: float = 1.0  # lambda at inference (the paper uses 1.0 with an image prompt alone)


class ImageProjection(nn.Module):
    """Image embedding -> N context tokens: Linear(d_img, N * d_ctx), split into N tokens, LayerNorm.

    e_img [B, d_img] -> c_i [B, N, d_ctx].
    """

    def __init__(self, d_img: int, d_ctx: int, num_tokens: int = 4):
        super().__init__()
        if min(d_img, d_ctx, num_tokens) < 1:
            raise ValueError(f"ImageProjection needs positive sizes, got d_img={d_img}, d_ctx={d_ctx}, "
                             f"num_tokens={num_tokens}.")
        self.d_img, self.d_ctx, self.num_tokens = d_img, d_ctx, num_tokens
        self.proj = nn.Linear(d_img, num_tokens * d_ctx)  # W_p
        self.norm = nn.LayerNorm(d_ctx)

    def forward(self, image_emb: torch.Tensor) -> torch.Tensor:
        if image_emb.ndim != 2 or image_emb.shape[1] != self.d_img:
            raise ValueError(f"ImageProjection expects image embeddings [B, {self.d_img}] (clip.encode_image), "
                             f"got {tuple(image_emb.shape)}.")
        tokens = rearrange(self.proj(image_emb), "b (n d) -> b n d", n=self.num_tokens)  # N tokens of width d_ctx
        return self.norm(tokens)


def decoupled_cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              k_ip: torch.Tensor | Sequence[torch.Tensor], v_ip: torch.Tensor | Sequence[torch.Tensor],
                              lambdas: float | Sequence[float], mask: torch.Tensor | None = None,
                              kernel=attention, stream_kernel=None) -> torch.Tensor:
    """Z = softmax(Q K^T / sqrt d) V + lambda softmax(Q K'^T / sqrt d) V'.

    q [B, H, N, d]; k, v [B, H, M, d] (text); k_ip, v_ip [B, H, M', d] (image); lambdas = lambda;
    mask [B, M] bool masks TEXT keys only (the image branch attends to all its tokens) -> Z [B, H, N, d].
    Several extra streams: k_ip, v_ip and lambdas as equal-length sequences,
    Z = A(Q, K, V) + sum_s lambda_s A(Q, K'_s, V'_s).
    kernel(q, k, v, mask) computes one attention term; `DecoupledCrossAttention` passes its base layer's
    `attend`, which takes [B, N, H*d] tensors and splits the heads itself, so the same formula serves both.
    stream_kernel (default: kernel) computes the stream terms: the layer passes `attend` without the
    layer's probs_hook there, so recorded or edited attention maps are those of the prompt tokens only.
    """
    if isinstance(k_ip, torch.Tensor):  # one extra stream (IP-Adapter)
        k_ip, v_ip, lambdas = [k_ip], [v_ip], [lambdas]
    if not len(k_ip) == len(v_ip) == len(lambdas):
        raise ValueError(f"give one key, one value and one lambda per extra stream, "
                         f"got {len(k_ip)}, {len(v_ip)} and {len(lambdas)}.")
    # sum_s lambda_s A(Q, K'_s, V'_s): no mask, every stream token is real
    stream_kernel = stream_kernel or kernel
    z_streams = sum(lam * stream_kernel(q, k_s, v_s, None) for k_s, v_s, lam in zip(k_ip, v_ip, lambdas))
    return z_streams + kernel(q, k, v, mask)  # + A(Q, K, V), text keys masked


class DecoupledCrossAttention(nn.Module):
    """A frozen cross-attention layer plus extra key/value streams (IP-Adapter's decoupled cross-attention).

    x [B, N, query_dim], context [B, M_text + sum_s n_s, context_dim] = cat[text, stream tokens...],
    mask [B, M_text] | None (text only) -> [B, N, query_dim].

    base:    the layer's `Attention` (kept, frozen, not copied: to_q, the heads, to_out and its kernel are reused).
    streams: name -> number of tokens, in the order their tokens follow the text in `context`.
    Stream s has `streams[f"to_k_{s}"]`, `streams[f"to_v_{s}"]` (Linear, no bias, initialised as copies of
    base.to_k, base.to_v) and a runtime weight `lambdas[s]` (lambda_s, default 1).
    """

    def __init__(self, base: Attention, streams: dict[str, int]):
        super().__init__()
        if not isinstance(base, Attention):
            raise ValueError(f"DecoupledCrossAttention wraps a minildm Attention layer, got {type(base).__name__}.")
        if not streams or any(n < 1 for n in streams.values()):
            raise ValueError(f"give at least one extra stream with a positive number of tokens, got {streams}.")
        self.base = base.requires_grad_(False)
        self.stream_tokens = dict(streams)
        self.lambdas = {name: 1.0 for name in streams}
        self.streams = nn.ModuleDict()
        for name in streams:
            for part, source in (("to_k", base.to_k), ("to_v", base.to_v)):
                layer = nn.Linear(source.in_features, source.out_features, bias=False,
                                  device=source.weight.device, dtype=source.weight.dtype)
                with torch.no_grad():
                    layer.weight.copy_(source.weight)  # W'_k <- W_k, W'_v <- W_v
                self.streams[f"{part}_{name}"] = layer

    # AttentionMaps puts its probs_hook on the module named attn2: hand it to the base layer, whose text term
    # calls it (attend_streams runs the image streams without it), so the maps are the prompt tokens'.
    @property
    def probs_hook(self):
        return self.base.probs_hook

    @probs_hook.setter
    def probs_hook(self, hook) -> None:
        self.base.probs_hook = hook

    def split_context(self, context: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """context [B, M, C] -> (text [B, M - sum_s n_s, C], [stream tokens [B, n_s, C] for each stream])."""
        counts = list(self.stream_tokens.values())
        m_text = context.shape[1] - sum(counts)
        if m_text < 1:
            raise ValueError(f"the context has {context.shape[1]} tokens but the adapter expects the text followed by "
                             f"{sum(counts)} stream tokens {self.stream_tokens}: "
                             "build it as torch.cat([text, tokens], dim=1).")
        text, *tokens = context.split([m_text, *counts], dim=1)
        return text, tokens

    def attend_streams(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The decoupled attention BEFORE to_out: x [B, N, query_dim] -> Z [B, N, heads * dim_head]."""
        text, tokens = self.split_context(context)
        if mask is not None and mask.shape[-1] != text.shape[1]:
            raise ValueError(f"the mask covers {mask.shape[-1]} tokens but the text part of the context has "
                             f"{text.shape[1]}: pass the text mask only (image tokens need none) "
                             "and put the stream tokens after the text.")
        base = self.base
        q = base.to_q(x)  # the same Q for every term
        k_s = [self.streams[f"to_k_{name}"](c) for name, c in zip(self.stream_tokens, tokens)]  # K'_s = c_s W'_k
        v_s = [self.streams[f"to_v_{name}"](c) for name, c in zip(self.stream_tokens, tokens)]  # V'_s = c_s W'_v
        lam_s = [self.lambdas[name] for name in self.stream_tokens]
        return decoupled_cross_attention(q, base.to_k(text), base.to_v(text), k_s, v_s, lam_s, mask, kernel=base.attend,
                                         stream_kernel=partial(base.attend, use_hook=False))

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.base.dropout(self.base.to_out(self.attend_streams(x, context, mask)))  # one to_out for the sum

    def extra_repr(self) -> str:
        return f"streams={self.stream_tokens}, lambdas={self.lambdas}"


# ----------------------------------------------------------------------------------------------------------
# Installing into a UNet
# ----------------------------------------------------------------------------------------------------------
def _decoupled_layers(unet: nn.Module) -> dict[str, DecoupledCrossAttention]:
    return {name: m for name, m in unet.named_modules() if isinstance(m, DecoupledCrossAttention)}


def _require_adapter(unet: nn.Module, stream: str = IP) -> dict[str, DecoupledCrossAttention]:
    layers = _decoupled_layers(unet)
    if not layers:
        raise ValueError("this UNet has no IP-Adapter layers: call install_ip_adapter first.")
    if stream not in next(iter(layers.values())).stream_tokens:
        raise ValueError(f"this UNet's adapter has no stream {stream!r}; its streams are "
                         f"{list(next(iter(layers.values())).stream_tokens)}.")
    return layers


def install_ip_adapter(unet: nn.Module, num_tokens: int = 4, extra_streams: dict[str, int] | None = None) -> list[str]:
    """Replace every cross-attention `attn2` of the UNet's BasicTransformerBlocks by a DecoupledCrossAttention
    with the stream "ip" (num_tokens image tokens) plus `extra_streams` (name -> tokens, e.g. {"body": 4}).

    Freezes the whole UNet; afterwards only the streams' to_k_*/to_v_* weights have requires_grad=True.
    Returns the qualified names of the replaced layers (e.g. "input_blocks.4.1.transformer_blocks.0.attn2").
    """
    extra_streams = extra_streams or {}
    if IP in extra_streams:
        raise ValueError(f"the stream name {IP!r} is IP-Adapter's own: give the extra streams other names.")
    streams = {IP: num_tokens, **extra_streams}
    if _decoupled_layers(unet):
        raise ValueError("this UNet already has IP-Adapter layers: call remove_ip_adapter first, or load new weights.")
    blocks = {name: m for name, m in unet.named_modules() if isinstance(m, BasicTransformerBlock)}
    if not blocks:
        raise ValueError("install_ip_adapter found no BasicTransformerBlock (no cross-attention) in this model.")
    unet.requires_grad_(False)
    for block in blocks.values():
        block.attn2 = DecoupledCrossAttention(block.attn2, streams)  # new W'_k, W'_v train
    return [f"{name}.attn2" for name in blocks]


def new_ip_adapter(unet: nn.Module, cfg: IPAdapterConfig) -> ImageProjection:
    """Install the adapter described by `cfg` into the UNet, set lambda = cfg.ip_lambda, return a fresh projection.

    The one call a trainer (or a sampler about to `load_ip_adapter`) needs; install_ip_adapter is the primitive.
    """
    if cfg.context_dim != unet.cfg.context_dim:
        raise ValueError(f"the adapter's context_dim is {cfg.context_dim} but the UNet's cross-attention reads "
                         f"{unet.cfg.context_dim}: use IPAdapterConfig(context_dim=unet.cfg.context_dim).")
    install_ip_adapter(unet, cfg.num_tokens)
    set_ip_lambda(unet, cfg.ip_lambda)
    return ImageProjection(cfg.d_img, cfg.context_dim, cfg.num_tokens).to(next(unet.parameters()).device)


def remove_ip_adapter(unet: nn.Module) -> None:
    """Put every original cross-attention layer back (the same objects; the UNet stays frozen)."""
    layers = _require_adapter(unet)
    for name, layer in layers.items():
        parent_name, _, child = name.rpartition(".")
        setattr(unet.get_submodule(parent_name), child, layer.base)


def set_ip_lambda(unet: nn.Module, ip_lambda: float, stream: str = IP) -> None:
    """Set lambda of one stream in every decoupled layer (0 = that stream is off: the text-only model)."""
    for layer in _require_adapter(unet, stream).values():
        layer.lambdas[stream] = float(ip_lambda)


def ip_adapter_parameters(unet: nn.Module, projection: ImageProjection, stream: str = IP) -> list[nn.Parameter]:
    """What the optimizer trains: the projection's parameters, then W'_k, W'_v of `stream` in every layer."""
    layers = _require_adapter(unet, stream).values()
    return list(projection.parameters()) + [
        layer.streams[f"{part}_{stream}"].weight for layer in layers for part in ("to_k", "to_v")
    ]


def ip_adapter_state_dict(unet: nn.Module, projection: ImageProjection, stream: str = IP) -> dict:
    """Only the adapter of `stream`: {"stream", "num_tokens", "d_img", "context_dim", "projection": state_dict,
    "weights": {"<layer>.to_k_<stream>": [inner, context_dim], "<layer>.to_v_<stream>": ...}} (CPU tensors).

    Write it with `save_checkpoint(path, "ip-adapter", state)` (add the trainer's IPAdapterConfig as "config").
    """
    layers = _require_adapter(unet, stream)
    return {
        "stream": stream,
        "num_tokens": projection.num_tokens,
        "d_img": projection.d_img,
        "context_dim": projection.d_ctx,
        "projection": {k: v.detach().cpu().clone() for k, v in projection.state_dict().items()},
        "weights": {
            f"{name}.{part}_{stream}": layer.streams[f"{part}_{stream}"].weight.detach().cpu().clone()
            for name, layer in layers.items()
            for part in ("to_k", "to_v")
        },
    }


def load_ip_adapter(unet: nn.Module, projection: ImageProjection, state: dict) -> None:
    """Copy an adapter state (from `ip_adapter_state_dict`) into an installed UNet and a projection.

    Everything is checked before anything is copied, so a refused state leaves both unchanged.
    """
    check_entries(state, ("stream", "num_tokens", "d_img", "context_dim", "projection", "weights"),
                  "an IP-Adapter state", "the dict made by ip_adapter_state_dict")
    stream = state["stream"]
    layers = _require_adapter(unet, stream)
    wanted = (state["num_tokens"], state["d_img"], state["context_dim"])
    have = (projection.num_tokens, projection.d_img, projection.d_ctx)
    if wanted != have:
        raise ValueError(f"the adapter has (num_tokens, d_img, context_dim) = {wanted} but the projection has {have}: "
                         "build ImageProjection with the adapter's sizes.")
    tokens = next(iter(layers.values())).stream_tokens[stream]
    if tokens != state["num_tokens"]:
        raise ValueError(f"the adapter has {state['num_tokens']} tokens but the UNet's stream {stream!r} expects "
                         f"{tokens}: install_ip_adapter with the adapter's num_tokens.")
    expected = {f"{name}.{part}_{stream}": layer.streams[f"{part}_{stream}"].weight
                for name, layer in layers.items() for part in ("to_k", "to_v")}
    copy_checked(state["weights"], expected, "adapter weight", "it was trained for another UNet")
    projection.load_state_dict(state["projection"])


def drop_conditions(batch_size: int, drop_prob: float = 0.05, generator: torch.Generator | None = None,
                    device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """IP-Adapter's condition dropout for classifier-free guidance -> (drop_text [B] bool, drop_image [B] bool).

    One uniform u per sample: u < p drops the text only, p <= u < 2p the image only, 2p <= u < 3p both
    (so each case has probability p, 0.05 in the paper). The trainer replaces a dropped text by the empty
    prompt "" and a dropped image by a zero CLIP embedding (before the projection).
    """
    if not 0.0 <= drop_prob <= 1.0 / 3.0:
        raise ValueError(f"drop_prob must lie in [0, 1/3] (three exclusive cases), got {drop_prob}.")
    u = torch.rand(batch_size, generator=generator, device=device)
    both = (2 * drop_prob <= u) & (u < 3 * drop_prob)
    return (u < drop_prob) | both, ((drop_prob <= u) & (u < 2 * drop_prob)) | both
