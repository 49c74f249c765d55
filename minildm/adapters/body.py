"""BoLID's body-condition module (Kazachkov & Filatov, "BoLID: Body-Lightning ID Diffusion", sec. 4.3) and
its objective (eq. 14).

BoLID personalises a text-to-image model to a person's *body*. The body VAE (adapters/body_vae.py, eqs.
11-13) reads a set of views of one person and returns c_body; this module turns c_body into body tokens
(made like IP-Adapter's image tokens) and gives every cross-attention layer of the UNet a third stream:

    Z' = A(Q, K_t, V_t) + lambda_ref A(Q, K_ref, V_ref) + lambda_b A(Q, K_b, V_b)

built on IP-Adapter's DecoupledCrossAttention (adapters/ip_adapter.py) with the streams "ip" (the
reference image) and "body"; `ref_lambda` and `body_lambda` are lambda_ref and lambda_b. The objective,
eq. 14, adds to L_diff the keypoint loss L_id, which reads the predicted image with the keypoint regressor
(adapters/keypoint_regressor.py), and L_CLIP. At sampling time `load_body_prompter` installs a trained run's
adapter and `BodyPrompter` turns views of a person into the extra tokens of `LatentDiffusion.generate`.
"""
from __future__ import annotations

from dataclasses import dataclass

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from minildm.adapters.body_vae import BodyVAE, check_keypoints, keypoints_to_unit, load_body_vae
from minildm.adapters.ip_adapter import (IP, DecoupledCrossAttention, ImageProjection, install_ip_adapter,
                                         ip_adapter_parameters, load_ip_adapter, set_ip_lambda)
from minildm.adapters.keypoint_regressor import KeypointRegressor, load_regressor
from minildm.checkpoint import CheckpointError, copy_checked, current_names, load_checkpoint
from minildm.data.body_render import BACKGROUND
from minildm.data.images import read_image_tensor

REGRESSOR_FILE, VAE_FILE, ADAPTER_FILE = "keypoint_regressor.pt", "body_vae.pt", "body_adapter.pt"  # in a body run


# ---------------------------------------------------------------------------------------------------
# Body-Condition Module (sec. 4.3): body tokens and the three-stream cross-attention
# ---------------------------------------------------------------------------------------------------

BODY = "body"  # the name of the body stream (IP-Adapter's reference-image stream is IP = "ip")


class BodyProjection(ImageProjection):
    """c_body -> N body tokens, made like IP-Adapter's image tokens: Linear(D, N * d_ctx), split, LayerNorm.

    c_body [B, D] (the body VAE's latent) -> c_b [B, N, d_ctx]. Same layers as ImageProjection (its
    ``d_img`` is D here), so IP-Adapter's parameter, save and load helpers work for it with stream=BODY.
    """

    def forward(self, c_body: torch.Tensor) -> torch.Tensor:
        if c_body.ndim != 2 or c_body.shape[1] != self.d_img:
            raise ValueError(f"BodyProjection expects body latents c_body [B, {self.d_img}] (BodyVAE.encode's mu "
                             f"or a sample), got {tuple(c_body.shape)}.")
        return super().forward(c_body)  # LayerNorm(rearrange(W c_body, "b (n d) -> b n d"))


@dataclass
class BodyAdapterConfig:
    """The body-condition module's sizes and its default lambdas (the paper gives no values)."""
    latent_dim: int  # D = size of c_body (BodyVAEConfig.latent_dim; 756 in the paper)
    context_dim: int  # width of the UNet's cross-attention context (unet.cfg.context_dim)
    body_tokens: int = 4  # N body tokens per c_body
    ref_tokens: int = 4  # tokens of the reference-image stream (IP-Adapter's N = 4)
    ref_lambda: float = 1.0
    body_lambda: float = 1.0


def install_body_adapter(unet: nn.Module, ref_tokens: int = 4, body_tokens: int = 4, ref_lambda: float = 1.0,
                         body_lambda: float = 1.0) -> list[str]:
    """Give every cross-attention layer of the (frozen) UNet the reference and body streams:

        Z' = A(Q, K_t, V_t) + lambda_ref A(Q, K_ref, V_ref) + lambda_b A(Q, K_b, V_b)

    This is install_ip_adapter with one extra stream: "ip" (the reference image, ref_tokens tokens) and
    BODY (body_tokens tokens); each gets its own W'_k, W'_v (copies of W_k, W_v) and its lambda, the same Q
    and heads, and the sum passes the layer's to_out once. The UNet's context becomes
    cat[c_t, c_ref, c_b] (build it with ``body_context``). Returns the names of the replaced layers.
    """
    names = install_ip_adapter(unet, ref_tokens, extra_streams={BODY: body_tokens})
    set_body_lambdas(unet, ref_lambda, body_lambda)
    return names


def new_body_adapter(unet: nn.Module, cfg: BodyAdapterConfig) -> BodyProjection:
    """Install the three-stream adapter described by ``cfg`` and return a fresh BodyProjection (on the UNet's device)."""
    if cfg.context_dim != unet.cfg.context_dim:
        raise ValueError(f"the adapter's context_dim is {cfg.context_dim} but the UNet's cross-attention reads "
                         f"{unet.cfg.context_dim}: use BodyAdapterConfig(context_dim=unet.cfg.context_dim).")
    install_body_adapter(unet, cfg.ref_tokens, cfg.body_tokens, cfg.ref_lambda, cfg.body_lambda)
    return BodyProjection(cfg.latent_dim, cfg.context_dim, cfg.body_tokens).to(next(unet.parameters()).device)


def set_body_lambdas(unet: nn.Module, ref_lambda: float, body_lambda: float) -> None:
    """Set ref_lambda and body_lambda in every layer (both 0: the text-only UNet exactly)."""
    set_ip_lambda(unet, ref_lambda, IP)
    set_ip_lambda(unet, body_lambda, BODY)


def body_adapter_parameters(unet: nn.Module, body_projection: BodyProjection,
                            ref_projection: ImageProjection | None = None) -> list[nn.Parameter]:
    """What trains: the body projection and W'_k, W'_v of the body stream (+ the reference stream's, when
    its projection is given). The UNet's own weights are not among them (the body stage may fine-tune them
    too, in a parameter group of their own: BodyStageConfig.unet_lr_scale)."""
    params = ip_adapter_parameters(unet, body_projection, BODY)
    return params + (ip_adapter_parameters(unet, ref_projection, IP) if ref_projection is not None else [])


def _stream_tokens(unet: nn.Module) -> dict[str, int]:
    """The token counts {"ip": n_ref, "body": n_b} of the UNet's installed body adapter."""
    layer = next((m for m in unet.modules() if isinstance(m, DecoupledCrossAttention)), None)
    if layer is None or BODY not in layer.stream_tokens:
        raise ValueError("this UNet has no body adapter: call install_body_adapter (or new_body_adapter) first.")
    return layer.stream_tokens


def body_context(unet: nn.Module, text: torch.Tensor, body_tokens: torch.Tensor,
                 ref_tokens: torch.Tensor | None = None, ref_present: torch.Tensor | None = None) -> torch.Tensor:
    """The UNet's context cat[c_t, c_ref, c_b] for a UNet with the body adapter.

    text [B, M, d] (the prompt encoder's output; its mask stays [B, M]), body_tokens [B or 1, n_b, d],
    ref_tokens [B or 1, n_ref, d] or None, ref_present [B] bool or None -> [B, M + n_ref + n_b, d].
    A missing reference image (ref_tokens None, or ref_present False for a sample) becomes all-zero tokens:
    the stream's W'_k, W'_v have no bias, so K_ref = V_ref = 0 and A(Q, 0, 0) = softmax(0) 0 = 0; the
    ref_lambda term vanishes exactly, with no mask.
    """
    counts = _stream_tokens(unet)
    B, _, d = text.shape
    if body_tokens.ndim != 3 or body_tokens.shape[1:] != (counts[BODY], d) or body_tokens.shape[0] not in (1, B):
        raise ValueError(f"body_tokens must be [{B} or 1, {counts[BODY]}, {d}] (BodyProjection's output), "
                         f"got {tuple(body_tokens.shape)}.")
    if ref_tokens is None:
        ref_tokens = text.new_zeros(B, counts[IP], d)  # no reference image: its term is zero
    elif ref_tokens.ndim != 3 or ref_tokens.shape[1:] != (counts[IP], d) or ref_tokens.shape[0] not in (1, B):
        raise ValueError(f"ref_tokens must be [{B} or 1, {counts[IP]}, {d}] (IP-Adapter's image tokens) or None, "
                         f"got {tuple(ref_tokens.shape)}.")
    ref_tokens = ref_tokens.expand(B, -1, -1)
    if ref_present is not None:
        if ref_present.dtype != torch.bool or ref_present.shape != (B,):
            raise ValueError(f"ref_present must be a bool tensor [{B}] (True = this sample has a reference image).")
        ref_tokens = ref_tokens * ref_present[:, None, None].to(ref_tokens.dtype)  # missing -> zero tokens
    return torch.cat([text, ref_tokens.to(text), body_tokens.expand(B, -1, -1).to(text)], dim=1)


# ---------------------------------------------------------------------------------------------------
# Full objective, eq. 14: L = L_diff + alpha_id L_id + beta_CLIP L_CLIP
# ---------------------------------------------------------------------------------------------------

def predicted_x0_image(schedule, autoencoder, z_t: torch.Tensor, t: torch.Tensor, eps_hat: torch.Tensor) -> torch.Tensor:
    """The image the model currently believes in: x0_hat = D(z0_hat / scale_factor), differentiable in eps_hat.

    z_t, eps_hat [B, c, h, w] scaled latents, t [B] -> image [B, 3, H, W] in about [-1, 1].
    z0_hat = (z_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t) (property 3); the VQ decoder snaps z0_hat to
    its codebook with a straight-through gradient, so L_id and L_CLIP reach the adapter through it.
    """
    z0_hat = schedule.predict_x0(z_t, t, eps_hat)
    return autoencoder.decode(z0_hat / autoencoder.scale_factor)


def keypoint_id_loss(p_gen: torch.Tensor, p_ref: torch.Tensor, ref_visible: torch.Tensor) -> torch.Tensor:
    """L_id = sum_k ||p_k^gen - p_k^ref||^2 over the keypoints visible in the reference.

    p_gen, p_ref [B, K, 2] in the same coordinates (unit coordinates in ``bolid_loss``), ref_visible [B, K]
    bool -> [B]. A keypoint the reference does not show counts 0 (the paper zeroes invisible components).
    """
    check_keypoints(p_ref, ref_visible)
    if p_gen.shape != p_ref.shape:
        raise ValueError(f"p_gen and p_ref must have the same shape [B, K, 2], got {tuple(p_gen.shape)} "
                         f"and {tuple(p_ref.shape)}.")
    sq = ((p_gen - p_ref) ** 2).sum(dim=-1)                   # ||p_k^gen - p_k^ref||^2   [B, K]
    return (sq * ref_visible.to(sq.dtype)).sum(dim=-1)        # sum over visible k       [B]


def clip_text_loss(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """L_CLIP = 1 - cos(CLIP(x_gen), CLIP(tau)): image_emb, text_emb [B, D] -> [B] in [0, 2]."""
    if image_emb.ndim != 2 or image_emb.shape != text_emb.shape:
        raise ValueError(f"image and text embeddings must both be [B, D], got {tuple(image_emb.shape)} "
                         f"and {tuple(text_emb.shape)}.")
    return 1 - F.cosine_similarity(image_emb, text_emb, dim=-1)


def bolid_loss(eps_hat: torch.Tensor, eps: torch.Tensor, x0_image: torch.Tensor | None = None,
               alpha_id: float = 0.0, beta_clip: float = 0.0, regressor: KeypointRegressor | None = None,
               ref_keypoints: torch.Tensor | None = None, ref_visible: torch.Tensor | None = None,
               clip: nn.Module | None = None, text_emb: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Eq. 14: L = L_diff + alpha_id L_id + beta_CLIP L_CLIP, batch means -> (total scalar, logs of floats).

    eps_hat, eps [B, c, h, w]: the UNet's noise prediction and the true noise (L_diff = ||eps - eps_hat||^2,
    the mean over elements as in diffusion_loss).
    x0_image [B, 3, H, W] in [-1, 1]: the predicted clean image (``predicted_x0_image``); needed only when
    alpha_id or beta_clip is on.
    L_id: the frozen ``regressor`` reads x0_image; ref_keypoints [B, K, 2] pixel (x, y) on an image of
    x0_image's size and ref_visible [B, K] bool are the reference's; compared in unit coordinates.
    L_CLIP: ``clip.encode_image(x0_image)`` against text_emb [B, D] (``clip.encode_text`` of the prompt).
    A weight of 0 switches its term off: it is not computed and its models and inputs may be None.
    """
    if alpha_id < 0 or beta_clip < 0:
        raise ValueError(f"alpha_id and beta_clip must be >= 0 (0 switches a term off), got {alpha_id}, {beta_clip}.")
    if eps_hat.shape != eps.shape:
        raise ValueError(f"eps_hat and eps must have the same shape, got {tuple(eps_hat.shape)} and {tuple(eps.shape)}.")
    l_diff = (eps - eps_hat).pow(2).mean()                                        # L_diff
    total, logs = l_diff, {"diff": l_diff.item()}
    if (alpha_id > 0 or beta_clip > 0) and x0_image is None:
        raise ValueError("L_id and L_CLIP read the predicted image: pass x0_image (predicted_x0_image) "
                         "or set alpha_id = beta_clip = 0.")
    if alpha_id > 0:
        if regressor is None or ref_keypoints is None or ref_visible is None:
            raise ValueError("alpha_id > 0 needs the keypoint regressor, ref_keypoints and ref_visible.")
        p_gen, _ = regressor(x0_image)                                             # p^gen, unit coordinates
        p_ref = keypoints_to_unit(ref_keypoints, *x0_image.shape[-2:])              # p^ref, unit coordinates
        l_id = keypoint_id_loss(p_gen, p_ref, ref_visible).mean()                   # L_id
        total = total + alpha_id * l_id
        logs["id"] = l_id.item()
    if beta_clip > 0:
        if clip is None or text_emb is None:
            raise ValueError("beta_clip > 0 needs the CLIP model and text_emb (clip.encode_text of the prompts).")
        l_clip = clip_text_loss(clip.encode_image(x0_image), text_emb).mean()      # L_CLIP
        total = total + beta_clip * l_clip
        logs["clip"] = l_clip.item()
    logs["loss"] = total.item()
    return total, logs


# ----------------------------------------------------------------------------------------------------------
# Body prompts at sampling time: a trained body run's adapter on a loaded pipeline
# ----------------------------------------------------------------------------------------------------------
class BodyPrompter:
    """The frozen body VAE and regressor + the trained projections: views of a person -> the
    `extra_tokens` (cat[c_ref, c_b] after the text) of `LatentDiffusion.generate`."""

    def __init__(self, vae: BodyVAE, regressor: KeypointRegressor, body_projection: BodyProjection,
                 ref_projection: ImageProjection, seed: int = 0):
        self.vae, self.regressor = vae.eval(), regressor.eval()
        self.seed = seed  # the run's data seed: identity N of --body-id is identity(N, seed)
        self.body_projection, self.ref_projection = body_projection.eval(), ref_projection.eval()

    @property
    def device(self) -> torch.device:
        return self.body_projection.proj.weight.device

    @torch.no_grad()
    def keypoints(self, images: torch.Tensor, keypoints=None, visible=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The given keypoints, or the regressor's when None: images [n, 3, H, W] -> ([n, 17, 2], [n, 17])."""
        if keypoints is not None:
            return keypoints.to(self.device), visible.to(self.device)
        return self.regressor.predict(images.to(self.device))

    @torch.no_grad()
    def c_body(self, images: torch.Tensor, keypoints=None, visible=None) -> torch.Tensor:
        """Views of ONE person [n, 3, H, W] in [-1, 1] (keypoints [n, 17, 2] or None: the regressor finds them)
        -> c_body = mu [1, D] (the posterior mean: no sampling noise at inference)."""
        size = self.vae.cfg.image_size
        if images.dim() != 4 or images.shape[1:] != (3, size, size):
            raise ValueError(f"body views must be [n, 3, {size}, {size}] images, got {tuple(images.shape)}.")
        kp, vis = self.keypoints(images, keypoints, visible)
        mu, _ = self.vae.encode(images.to(self.device)[None], kp[None], vis[None])
        return mu

    @torch.no_grad()
    def extra_tokens(self, c_body: torch.Tensor | None, ref_image: torch.Tensor | None = None):
        """c_body [N or 1, D] or None (no body: the learned "no body" tokens), ref_image [1, 3, H, W] or None
        -> (cond [N or 1, n_ref + n_b, d], uncond [1, n_ref + n_b, d]); uncond = no reference, no body."""
        D = self.body_projection.d_img
        no_body = self.body_projection(torch.zeros(1, D, device=self.device))  # c_body = 0: learned "no body"
        no_ref = torch.zeros(1, self.ref_projection.num_tokens, self.ref_projection.d_ctx, device=self.device)
        body = no_body if c_body is None else self.body_projection(c_body.to(self.device))
        if ref_image is None:
            ref = no_ref.expand(body.shape[0], -1, -1)  # zero tokens: the ref_lambda term vanishes
        else:
            kp, vis = self.regressor.predict(ref_image.to(self.device))
            ref = self.ref_projection(self.vae.view_features(ref_image.to(self.device), kp, vis))
            ref = ref.expand(body.shape[0], -1, -1)
            body = body.expand(ref.shape[0], -1, -1)
        return torch.cat([ref, body], dim=1), torch.cat([no_ref, no_body], dim=1)


def load_unet_weights(unet_weights: dict, saved: dict, path: Path) -> None:
    """Copy a fine-tuned UNet's weights {name: tensor} into the tensors unet_weights names (in place)."""
    copy_checked(saved, unet_weights, "UNet weight", f"{path} holds a UNet fine-tuned from another base model: train "
                 "the body stage again for this run's ldm.pt", CheckpointError)


def load_body_prompter(pipe, run_dir: str | Path, body_lambda: float = 1.0,
                       ref_lambda: float = 1.0) -> BodyPrompter:
    """Install the run's body adapter into pipe.unet (body_lambda, ref_lambda) and load its VAE and regressor."""
    run_dir = Path(run_dir)
    if not (run_dir / ADAPTER_FILE).is_file():
        raise CheckpointError(f"no body adapter in {run_dir}: train one with python train.py --stage body "
                              "(it writes runs/body) and pass --run runs/body.")
    state = load_checkpoint(run_dir / ADAPTER_FILE, "body-adapter")
    if "unet" in state:  # the stage fine-tuned the UNet with the adapter (before the adapter renames its layers)
        load_unet_weights(dict(pipe.unet.named_parameters()), state["unet"], run_dir / ADAPTER_FILE)
    device = pipe.device
    vae, regressor = load_body_vae(run_dir / VAE_FILE, device), load_regressor(run_dir / REGRESSOR_FILE, device)
    body_projection = new_body_adapter(pipe.unet, BodyAdapterConfig(**current_names(state["config"])))
    ref_projection = ImageProjection(vae.cfg.feature_dim, pipe.unet.cfg.context_dim, state["config"]["ref_tokens"])
    load_ip_adapter(pipe.unet, body_projection, state["body"])
    load_ip_adapter(pipe.unet, ref_projection.to(device), state["ref"])
    set_body_lambdas(pipe.unet, ref_lambda, body_lambda)
    return BodyPrompter(vae, regressor, body_projection, ref_projection, state["train_config"]["seed"])


def load_view_folder(folder: str | Path, size: int) -> torch.Tensor:
    """Every PNG in a folder -> [n, 3, size, size] in [-1, 1] (central square, resized)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"--body-views {folder} is not a folder: give a folder of PNG views of one person.")
    files = sorted(folder.glob("*.png"))
    if not files:
        raise ValueError(f"--body-views {folder} has no .png file: put a few PNG views of one person in it.")
    return torch.cat([read_image_tensor(f, size, BACKGROUND) for f in files])  # on the bodies' background
