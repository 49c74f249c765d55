"""BoLID body conditioning (seed 002): Gaussian keypoint weighting, the body VAE, a keypoint regressor,
the three-stream body-condition module and the full objective (eq. 14).

BoLID personalises a text-to-image model to a person's *body*. Each reference view is weighted by
Gaussians around its 17 COCO keypoints so the body counts and the background fades (eqs. 11-13); a VAE
reads the whole *set* of weighted views of one person and returns a latent c_body (756-d in the paper).
The body-condition module turns c_body into body tokens (made like IP-Adapter's image tokens) and gives
every cross-attention layer of the UNet a third stream (sec. 4.3):

    Z' = A(Q, K_t, V_t) + lambda_ref A(Q, K_ref, V_ref) + lambda_b A(Q, K_b, V_b)

built on IP-Adapter's DecoupledCrossAttention (adapters/ip_adapter.py) with the streams "ip" (the
reference image) and "body". A small keypoint regressor gives keypoints for generated images: L_id in
eq. 14 compares them with the reference's, and evaluation uses it too.

Coordinates: keypoints are pixel (x, y) with pixel centres at integer positions (x = column, y = row),
as ``minildm.data.bodies`` renders them; "unit" coordinates map x = 0 .. W-1 to -1 .. 1 (same for y).
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange, reduce, repeat
from torch import nn

from minildm.adapters.ip_adapter import (IP, DecoupledCrossAttention, ImageProjection, install_ip_adapter,
                                        ip_adapter_parameters, set_ip_lambda)
from minildm.data.body_render import BodiesDataset

LOGVAR_RANGE = (-30.0, 20.0)  # the usual clamp of log sigma^2 (keeps exp() finite)


# ---------------------------------------------------------------------------------------------------
# Gaussian keypoint weighting, eqs. 11-13
# ---------------------------------------------------------------------------------------------------

def _check_keypoints(keypoints: torch.Tensor, visible: torch.Tensor) -> None:
    if keypoints.dim() < 2 or keypoints.shape[-1] != 2 or keypoints.shape[-2] < 1:
        raise ValueError(f"keypoints must have shape [..., K, 2] with K >= 1, got {tuple(keypoints.shape)}.")
    if visible.dtype != torch.bool or visible.shape != keypoints.shape[:-1]:
        raise ValueError(f"visible must be a bool tensor of shape {tuple(keypoints.shape[:-1])}, "
                         f"got {visible.dtype} {tuple(visible.shape)}.")


def keypoint_gaussians(keypoints: torch.Tensor, visible: torch.Tensor, height: int, width: int,
                       sigma: float) -> torch.Tensor:
    """One Gaussian bump per keypoint (eq. 11); invisible keypoints give all-zero maps.

    keypoints [..., K, 2] pixel (x, y), visible [..., K] bool -> w [..., K, H, W] in [0, 1].
    Computed by broadcasting (no loop over pixels or keypoints).
    """
    _check_keypoints(keypoints, visible)
    if sigma <= 0:
        raise ValueError(f"sigma must be positive (a radius in pixels), got {sigma}.")
    x = torch.arange(width, dtype=keypoints.dtype, device=keypoints.device)   # pixel centres 0 .. W-1
    y = torch.arange(height, dtype=keypoints.dtype, device=keypoints.device)  # pixel centres 0 .. H-1
    dx2 = (x - keypoints[..., 0, None]) ** 2                                  # (x - x_i)^2   [..., K, W]
    dy2 = (y - keypoints[..., 1, None]) ** 2                                  # (y - y_i)^2   [..., K, H]
    w = torch.exp((dy2[..., :, None] + dx2[..., None, :]) / (-2 * sigma ** 2))  # eq. 11      [..., K, H, W]
    return w * visible[..., None, None]                                       # invisible -> 0


def gaussian_keypoint_weights(keypoints: torch.Tensor, visible: torch.Tensor, height: int, width: int,
                              sigma: float) -> torch.Tensor:
    """Pixel weights W_norm of eqs. 11-13: the max (not the sum) of the visible keypoints' Gaussians.

    keypoints [..., K, 2] pixel (x, y) (e.g. [B, K, 2] or [K, 2]), visible [..., K] bool
    -> W_norm [..., H, W] in [0, 1] (e.g. [B, H, W] or [H, W]).
    An image with no visible keypoint (or all of them so far away that every weight underflows to 0)
    gets W_norm = 1 everywhere: nothing to focus on, so the image is kept as it is.
    """
    w = keypoint_gaussians(keypoints, visible, height, width, sigma)  # w_i(x, y)        eq. 11
    W = w.amax(dim=-3)                                                # max_i w_i(x, y)  eq. 12
    W_max = reduce(W, "... h w -> ... 1 1", "max")
    W_norm = W / W_max.clamp_min(torch.finfo(W.dtype).tiny)           # W / max W        eq. 13
    return torch.where(W_max > 0, W_norm, torch.ones_like(W))


def weight_image(image: torch.Tensor, weights: torch.Tensor, alpha: float) -> torch.Tensor:
    """I_w = I * (alpha + (1 - alpha) W_norm) (eq. 13, second half).

    image [..., 3, H, W], weights [..., H, W] in [0, 1], alpha in [0, 1] (alpha = 1: unchanged image;
    alpha = 0: the background is zeroed). The formula scales values toward 0, which is black for
    [0, 1] images and mid-grey for the [-1, 1] images inside models.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1] (the weight kept by the background), got {alpha}.")
    if image.shape[-2:] != weights.shape[-2:] or image.dim() != weights.dim() + 1:
        raise ValueError(f"weights must have shape [..., H, W] matching image [..., 3, H, W], "
                         f"got image {tuple(image.shape)} and weights {tuple(weights.shape)}.")
    return image * (alpha + (1 - alpha) * weights.unsqueeze(-3))  # I (alpha + (1 - alpha) W_norm)


def keypoints_to_unit(keypoints: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pixel (x, y) [..., 2] -> unit coordinates in [-1, 1]: x = 0 -> -1, x = W-1 -> +1 (same for y)."""
    scale = keypoints.new_tensor([width - 1, height - 1])
    return keypoints / scale * 2 - 1


def keypoints_to_pixels(unit: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Unit coordinates [..., 2] in [-1, 1] -> pixel (x, y) (inverse of keypoints_to_unit)."""
    scale = unit.new_tensor([width - 1, height - 1])
    return (unit + 1) / 2 * scale


# ---------------------------------------------------------------------------------------------------
# Body VAE: a set of weighted views of one person -> mu, logvar -> c_body
# ---------------------------------------------------------------------------------------------------

def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
    """z = mu + sigma * eps with sigma = exp(logvar / 2), eps ~ N(0, I). mu, logvar [..., D] -> z [..., D].

    eps (shaped like mu) is drawn here when None; pass it to control the draw.
    """
    logvar = logvar.clamp(*LOGVAR_RANGE)
    eps = torch.randn_like(mu) if eps is None else eps
    return mu + torch.exp(0.5 * logvar) * eps  # z = mu + exp(logvar / 2) * eps


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, I)) per sample, summed over the latent: mu, logvar [..., D] -> [...].

    KL = -1/2 * sum_j (1 + log sigma_j^2 - mu_j^2 - sigma_j^2)
    """
    logvar = logvar.clamp(*LOGVAR_RANGE)
    return -0.5 * torch.sum(1 + logvar - mu ** 2 - logvar.exp(), dim=-1)


@dataclass
class BodyVAEConfig:
    """Body VAE sizes. image_size must be divisible by 2 ** len(channels).

    keypoint_sigma (pixels) and weight_alpha are sigma and alpha of eqs. 11-13 (the paper gives no
    values; these suit 64x64 bodies). latent_dim is the size of c_body (756 in the paper).
    """
    image_size: int = 64
    channels: tuple = (32, 64, 128)
    feature_dim: int = 256
    latent_dim: int = 64
    num_keypoints: int = 17
    keypoint_sigma: float = 3.0
    weight_alpha: float = 0.25
    beta_kl: float = 1.0
    shape_weight: float = 0.0  # > 0: a linear shape head reads mu (ours, not the paper's; see BodyVAE.loss)
    num_shape: int = 7  # measurements the head predicts (minildm.data.bodies.shape_vector)


def _down(c_in: int, c_out: int) -> nn.Sequential:
    """Halve the resolution: 4x4 stride-2 conv + SiLU."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.SiLU())


class BodyVAE(nn.Module):
    """Set-of-views VAE (BoLID's Body-ID encoder) with a pose-conditioned decoder.

    Encoder: each view is weighted by its keypoints (eqs. 11-13), a shared conv net turns it into a
    feature vector, the features are mean-pooled over the (unmasked) views, so any number of views works
    and their order does not matter, and two linear heads give mu and logvar [B, D].
    Decoder: a view is rebuilt from z and per-keypoint Gaussian maps of that view's pose *retargeted to
    the average body* (same joint angles and yaw, average lengths). The pose maps pass through their own
    conv pyramid whose features join the upsampling path at every resolution, so the pose says where the
    limbs point and z has to carry whose body it is (lengths, widths, thickness, colours). Conditioning
    on the view's own keypoints instead would hand the decoder the lengths and widths for free, and the
    KL term would then push them out of z.
    Loss: recon + beta_kl * KL, recon = squared error summed over pixels of the weighted view.
    """

    def __init__(self, cfg: BodyVAEConfig):
        super().__init__()
        levels = len(cfg.channels)
        if cfg.image_size % 2 ** levels:
            raise ValueError(f"image_size {cfg.image_size} must be divisible by 2 ** len(channels) = {2 ** levels}.")
        self.cfg = cfg
        self.bottom = cfg.image_size // 2 ** levels
        widths = (3,) + tuple(cfg.channels)
        self.view_encoder = nn.Sequential(
            *[_down(widths[i], widths[i + 1]) for i in range(levels)],
            nn.Flatten(), nn.Linear(cfg.channels[-1] * self.bottom ** 2, cfg.feature_dim), nn.SiLU())
        self.to_mu = nn.Linear(cfg.feature_dim, cfg.latent_dim)
        self.to_logvar = nn.Linear(cfg.feature_dim, cfg.latent_dim)

        pose_widths = (cfg.num_keypoints,) + tuple(c // 2 for c in cfg.channels)
        self.pose_encoder = nn.ModuleList(_down(pose_widths[i], pose_widths[i + 1]) for i in range(levels))
        self.from_z = nn.Linear(cfg.latent_dim, cfg.channels[-1] * self.bottom ** 2)
        # level i (from the bottom) maps [decoder channels + pose channels] -> the next level's channels
        dec_in = tuple(reversed(cfg.channels))
        dec_out = dec_in[1:] + (cfg.channels[0],)
        self.up = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c_in + p, c_out, 3, padding=1), nn.SiLU(),
                          nn.ConvTranspose2d(c_out, c_out, 4, stride=2, padding=1), nn.SiLU())
            for c_in, p, c_out in zip(dec_in, reversed(pose_widths[1:]), dec_out))
        self.to_rgb = nn.Conv2d(cfg.channels[0] + cfg.num_keypoints, 3, 3, padding=1)
        self.to_shape = nn.Linear(cfg.latent_dim, cfg.num_shape) if cfg.shape_weight > 0 else None

    def _check_views(self, images, keypoints, visible, view_mask):
        size = self.cfg.image_size
        if images.dim() != 5 or images.shape[2:] != (3, size, size):
            raise ValueError(f"images must have shape [B, V, 3, {size}, {size}], got {tuple(images.shape)}.")
        if keypoints.shape[:2] != images.shape[:2]:
            raise ValueError(f"keypoints must be [B, V, K, 2] for images [B, V, ...], got {tuple(keypoints.shape)}.")
        if view_mask is not None and (view_mask.dtype != torch.bool or view_mask.shape != images.shape[:2]):
            raise ValueError(f"view_mask must be a bool tensor of shape {tuple(images.shape[:2])}.")

    def weigh(self, images: torch.Tensor, keypoints: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """Eqs. 11-13 with the config's sigma and alpha: images [..., 3, H, W] -> weighted images, same shape."""
        H, W = images.shape[-2:]
        weights = gaussian_keypoint_weights(keypoints, visible, H, W, self.cfg.keypoint_sigma)
        return weight_image(images, weights, self.cfg.weight_alpha)

    def encode(self, images: torch.Tensor, keypoints: torch.Tensor, visible: torch.Tensor,
               view_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A set of views of one person per row -> (mu, logvar), each [B, D].

        images [B, V, 3, H, W] in [-1, 1] (raw; weighted here), keypoints [B, V, K, 2], visible [B, V, K],
        view_mask [B, V] bool (True = a real view; None = all real). Mean pooling over views makes the
        result independent of their order and number.
        """
        self._check_views(images, keypoints, visible, view_mask)
        return self._encode_weighted(self.weigh(images, keypoints, visible), view_mask)  # I_w^j, eq. 13

    def view_features(self, images: torch.Tensor, keypoints: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """One weighted view per row through the shared conv net, before pooling: images [B, 3, H, W],
        keypoints [B, K, 2], visible [B, K] -> features [B, feature_dim]. The body adapter's reference-image
        stream reads these (our stand-in for the CLIP image encoder of a reference photo)."""
        return self.view_encoder(self.weigh(images, keypoints, visible))

    def _encode_weighted(self, weighted: torch.Tensor, view_mask: torch.Tensor | None):
        """Weighted views [B, V, 3, H, W] -> (mu, logvar) [B, D]: shared conv net, masked mean over views."""
        B, V = weighted.shape[:2]
        feats = self.view_encoder(rearrange(weighted, "b v c h w -> (b v) c h w"))
        feats = rearrange(feats, "(b v) f -> b v f", b=B, v=V)
        if view_mask is None:
            view_mask = torch.ones(B, V, dtype=torch.bool, device=weighted.device)
        if not view_mask.any(dim=1).all():
            raise ValueError("every row of view_mask needs at least one True (a real view) to encode.")
        m = view_mask.to(feats.dtype)[..., None]                                      # [B, V, 1]
        pooled = (feats * m).sum(dim=1) / m.sum(dim=1)                                # mean over real views
        return self.to_mu(pooled), self.to_logvar(pooled)

    def decode(self, z: torch.Tensor, pose_keypoints: torch.Tensor) -> torch.Tensor:
        """Rebuild a weighted view from the body latent and an identity-free pose.

        z [B, D], pose_keypoints [B, K, 2] pixel (x, y) of the pose on the average body
        (``minildm.data.body_render.pose_keypoints``) -> image [B, 3, H, W] (the weighted view in [-1, 1]).
        """
        size = self.cfg.image_size
        all_visible = torch.ones(pose_keypoints.shape[:-1], dtype=torch.bool, device=pose_keypoints.device)
        pose = keypoint_gaussians(pose_keypoints, all_visible, size, size, self.cfg.keypoint_sigma)  # [B, K, H, W]
        pose_feats = [pose]
        for block in self.pose_encoder:
            pose_feats.append(block(pose_feats[-1]))                                  # H/2, H/4, ... H/2^L
        h = rearrange(self.from_z(z), "b (c h w) -> b c h w", h=self.bottom, w=self.bottom)
        for block, p in zip(self.up, reversed(pose_feats[1:])):
            h = block(torch.cat([h, p], dim=1))
        return self.to_rgb(torch.cat([h, pose], dim=1))

    def loss(self, images: torch.Tensor, keypoints: torch.Tensor, visible: torch.Tensor,
             pose_keypoints: torch.Tensor, view_mask: torch.Tensor | None = None,
             held_out: int = 0, shape: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """Negative ELBO: every (real) view is rebuilt from the set's z and its own identity-free pose.

        images [B, V, 3, H, W], keypoints [B, V, K, 2], visible [B, V, K], pose_keypoints [B, V, K, 2],
        view_mask [B, V] | None -> (total scalar, logs dict of floats).
        recon = sum over pixels of (I_w - decode(z, pose))^2, averaged over real views (a Gaussian
        decoder's negative log-likelihood up to constants); kl = KL(q(z | views) || N(0, I)), mean over rows.
        held_out: the last held_out views of every set are rebuilt but not encoded (0 <= held_out < V).
        z then has to predict a view it never saw, so it can only carry what all views of the person share
        (the body and the clothes), not the details of the views it read.
        shape [B, num_shape]: the people's true measurements (``shape_vector``), needed when shape_weight > 0.
        Ours, not the paper's: the pixel error is dominated by the large areas of shirt and trousers, so on
        its own mu learns colours first and limb lengths (a pixel or two at 32x32) barely; a linear head
        that must read the measurements from mu, shape_loss = ||W mu + b - shape||^2, makes the mean
        carry them, along a few directions nearest-neighbour search and the body tokens can use.
        """
        self._check_views(images, keypoints, visible, view_mask)
        if pose_keypoints.shape != keypoints.shape:
            raise ValueError(f"pose_keypoints must have the shape of keypoints {tuple(keypoints.shape)}, "
                             f"got {tuple(pose_keypoints.shape)}.")
        B, V = images.shape[:2]
        if not 0 <= held_out < V:
            raise ValueError(f"held_out must leave at least one of the {V} views to encode, got {held_out}.")
        target = self.weigh(images, keypoints, visible)                              # I_w, eq. 13
        mu, logvar = self._encode_weighted(target[:, :V - held_out],
                                           None if view_mask is None else view_mask[:, :V - held_out])
        z = reparameterize(mu, logvar)
        recon = self.decode(repeat(z, "b d -> (b v) d", v=V), rearrange(pose_keypoints, "b v k c -> (b v) k c"))
        err = reduce((rearrange(target, "b v c h w -> (b v) c h w") - recon) ** 2, "n c h w -> n", "sum")
        m = (torch.ones(B, V, device=images.device) if view_mask is None else view_mask.float()).flatten()
        recon_loss = (err * m).sum() / m.sum()
        kl = kl_divergence(mu, logvar).mean()
        total = recon_loss + self.cfg.beta_kl * kl                                   # -ELBO (beta_kl = 1)
        logs = {"recon": recon_loss.item(), "kl": kl.item()}
        if self.to_shape is not None:
            if shape is None or shape.shape != (B, self.cfg.num_shape):
                raise ValueError(f"shape_weight > 0 needs the true measurements shape [{B}, {self.cfg.num_shape}] "
                                 "(minildm.data.bodies.shape_vector of each row's person).")
            shape_loss = ((self.to_shape(mu) - shape) ** 2).sum(dim=-1).mean()      # ||W mu + b - shape||^2
            total = total + self.cfg.shape_weight * shape_loss
            logs["shape"] = shape_loss.item()
        return total, {"loss": total.item(), **logs}


VIEW_KEYS = ("image", "keypoints", "visible", "pose_keypoints")


def render_identities(data: BodiesDataset) -> dict:
    """Every view of a BodiesDataset rendered once, grouped by identity: {"image" [I, V, 3, H, W],
    "keypoints" [I, V, K, 2], "visible" [I, V, K], "pose_keypoints" [I, V, K, 2]} (I identities, V views each)."""
    items = [data[k] for k in range(len(data))]
    return {key: rearrange(torch.stack([it[key] for it in items]), "(i v) ... -> i v ...", v=data.views_per_identity)
            for key in VIEW_KEYS}


# ---------------------------------------------------------------------------------------------------
# Keypoint regressor (for L_id of eq. 14 and for evaluation)
# ---------------------------------------------------------------------------------------------------

def peak_soft_argmax(p: torch.Tensor, grid: torch.Tensor, radius: int = 1) -> torch.Tensor:
    """Soft-argmax inside the (2 radius + 1)^2 window around each map's peak.

    p [B, K, H, W] (each map sums to 1), grid [2, H, W] the (x, y) of every pixel -> [B, K, 2]:
    p_k = sum_{N_k} P_k(x, y) (x, y) / sum_{N_k} P_k. The window is picked by argmax (no gradient), the
    weights inside it are P_k's, so the result stays differentiable in the image.
    """
    H, W = p.shape[-2:]
    peak = rearrange(p, "b k h w -> b k (h w)").argmax(dim=-1)                                    # flat index
    rows, cols = peak // W, peak % W                                                              # [B, K]
    ys = torch.arange(H, device=p.device)[:, None]
    xs = torch.arange(W, device=p.device)[None, :]
    window = (((ys - rows[..., None, None]).abs() <= radius) &
              ((xs - cols[..., None, None]).abs() <= radius))                                    # N_k [B, K, H, W]
    q = p * window
    q = q / q.sum(dim=(-2, -1), keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)
    return torch.einsum("bkhw,chw->bkc", q, grid)


class KeypointRegressor(nn.Module):
    """Heatmaps + soft-argmax: body image [B, 3, H, W] in [-1, 1] -> (unit keypoints [B, K, 2], visibility
    logits [B, K]).

    A small encoder-decoder keeps full resolution where it matters: two stride-2 convs go down to H/4,
    dilated convs there see the whole figure (which side is left depends on the face), and two upsampling
    steps with skip connections come back to H x W. Per keypoint k it outputs a logit map S_k and a
    visibility map V_k:

        P_k = softmax_{x,y}(S_k)                          where keypoint k is
        p_k = sum_{(x,y) in N_k} P_k(x, y) (x, y) / sum_{N_k} P_k   soft-argmax in the 3x3 window N_k around
                                                          P_k's peak: sub-pixel, differentiable in the image
        v_k = sum_{x,y} P_k(x, y) V_k(x, y)               visibility logit read where the keypoint is

    The window matters: over the whole image, P_k's small tails pull every p_k toward the image centre,
    which shortens limbs. Measured on unseen people (bench/results/body.md's real renders), the window
    raised the share of the true spread of arm / torso and leg / torso the regressor sees from 0.46 / 0.24
    to 0.61 / 0.37. (Training, KeypointRegressor.loss, keeps the whole-image sum: it penalises the tails.)

    A pooled-feature MLP (the first version) had to learn coordinates as a function of 16 pooled cells and
    stayed near the average pose; the heatmap ties each coordinate to the pixels that show the joint.
    Differentiable in the image, so L_id of eq. 14 can train a generator through it.
    """

    def __init__(self, num_keypoints: int = 17, width: int = 16):
        super().__init__()
        self.num_keypoints = num_keypoints
        w = width
        act = nn.SiLU
        self.stem = nn.Sequential(nn.Conv2d(3 + 2, w, 3, padding=1), act(), nn.Conv2d(w, w, 3, padding=1), act())
        self.down1 = nn.Sequential(_down(w, 2 * w), nn.Conv2d(2 * w, 2 * w, 3, padding=1), act())          # H/2
        self.down2 = nn.Sequential(_down(2 * w, 4 * w), nn.Conv2d(4 * w, 4 * w, 3, padding=2, dilation=2), act(),
                                   nn.Conv2d(4 * w, 4 * w, 3, padding=4, dilation=4), act())             # H/4
        self.up1 = nn.Sequential(nn.Conv2d(4 * w + 2 * w, 2 * w, 3, padding=1), act())                     # H/2
        self.up0 = nn.Sequential(nn.Conv2d(2 * w + w, w, 3, padding=1), act())                             # H
        self.head = nn.Conv2d(w, 2 * num_keypoints, 1)                                                   # S_k, V_k

    def _grid(self, images: torch.Tensor) -> torch.Tensor:
        """Unit (x, y) of every pixel centre: [2, H, W], x = -1 at column 0 and +1 at column W-1."""
        H, W = images.shape[-2:]
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, H, device=images.device),
                                torch.linspace(-1, 1, W, device=images.device), indexing="ij")
        return torch.stack([xs, ys]).to(images.dtype)

    def heatmaps(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B, 3, H, W] (H, W divisible by 4) -> (log P_k [B, K, H, W], V_k [B, K, H, W])."""
        B, _, H, W = images.shape
        if H % 4 or W % 4:
            raise ValueError(f"the keypoint regressor needs an image side divisible by 4, got {H}x{W}.")
        grid = self._grid(images)
        h0 = self.stem(torch.cat([images, repeat(grid, "c h w -> b c h w", b=B)], dim=1))
        h1 = self.down1(h0)
        h2 = self.down2(h1)
        h1 = self.up1(torch.cat([F.interpolate(h2, scale_factor=2.0), h1], dim=1))
        h0 = self.up0(torch.cat([F.interpolate(h1, scale_factor=2.0), h0], dim=1))
        scores, vis_maps = rearrange(self.head(h0), "b (two k) h w -> two b k h w", two=2)
        log_p = rearrange(F.log_softmax(rearrange(scores, "b k h w -> b k (h w)"), dim=-1), "b k (h w) -> b k h w", h=H)
        return log_p, vis_maps

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_p, vis_maps = self.heatmaps(images)
        p = log_p.exp()                                                                  # P_k  [B, K, H, W]
        return peak_soft_argmax(p, self._grid(images)), (p * vis_maps).sum(dim=(-2, -1))  # p_k, v_k = sum P_k V_k

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B, 3, H, W] -> (pixel keypoints [B, K, 2], visible bool [B, K] (logit > 0))."""
        unit, logits = self(images)
        return keypoints_to_pixels(unit, *images.shape[-2:]), logits > 0

    def loss(self, images: torch.Tensor, keypoints: torch.Tensor, visible: torch.Tensor,
             heatmap_sigma: float = 1.0) -> tuple[torch.Tensor, dict]:
        """Heatmap cross-entropy + squared pixel error of p_k on visible keypoints + visibility cross-entropy.

        images [B, 3, H, W], keypoints [B, K, 2] pixels, visible [B, K] bool -> (total, logs).
        heatmap = -sum_{x,y} G_k(x, y) log P_k(x, y) with G_k the eq.-11 Gaussian around the true keypoint
        (heatmap_sigma pixels), normalised to sum 1: it makes P_k one sharp bump, where the coordinate term
        alone would accept a spread-out P_k whose mean happens to be right (and that breaks on new images).
        The squared pixel error of the soft-argmax itself removes what the heatmap term leaves: P_k's tails
        over the whole image pull p_k toward the centre and would shorten every limb a little.
        """
        H, W = images.shape[-2:]
        log_p, vis_maps = self.heatmaps(images)
        p = log_p.exp()
        unit = torch.einsum("bkhw,chw->bkc", p, self._grid(images))
        logits = (p * vis_maps).sum(dim=(-2, -1))
        v = visible.float()
        target = keypoint_gaussians(keypoints, visible, H, W, heatmap_sigma)                  # G_k, eq. 11
        target = target / target.sum(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
        heat = (-(target * log_p).sum(dim=(-2, -1)) * v).sum() / v.sum().clamp_min(1)
        pixels = keypoints_to_pixels(unit, H, W)  # in pixels, not unit coordinates: 1 unit is (W - 1) / 2 pixels,
        coords = (((pixels - keypoints) ** 2).sum(-1) * v).sum() / v.sum().clamp_min(1)  # so the term is not ~0
        vis = F.binary_cross_entropy_with_logits(logits, v)
        total = heat + coords + vis
        return total, {"loss": total.item(), "heatmap": heat.item(), "coords": coords.item(), "visibility": vis.item()}


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
    _check_keypoints(p_ref, ref_visible)
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
