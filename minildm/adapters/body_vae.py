"""BoLID's Body-ID encoder (Kazachkov & Filatov, "BoLID: Body-Lightning ID Diffusion", eqs. 11-13):
keypoint-weighted views -> a body VAE -> c_body.

Each reference view is weighted by Gaussians around its 17 COCO keypoints so the body counts and the
background fades (eqs. 11-13); a VAE reads the whole *set* of weighted views of one person and returns a
latent c_body (756-d in the paper). The same Gaussian kernel makes the heatmap targets of the keypoint
regressor (adapters/keypoint_regressor.py).

Coordinates: keypoints are pixel (x, y) with pixel centres at integer positions (x = column, y = row),
as ``minildm.data.body_render`` renders them; "unit" coordinates map x = 0 .. W-1 to -1 .. 1 (same for y).
"""
from dataclasses import dataclass

import torch
from einops import rearrange, reduce, repeat
from torch import nn

from minildm.checkpoint import load_checkpoint

LOGVAR_RANGE = (-30.0, 20.0)  # the usual clamp of log sigma^2 (keeps exp() finite)


# ---------------------------------------------------------------------------------------------------
# Gaussian keypoint weighting, eqs. 11-13
# ---------------------------------------------------------------------------------------------------

def check_keypoints(keypoints: torch.Tensor, visible: torch.Tensor) -> None:
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
    check_keypoints(keypoints, visible)
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


def conv_down(c_in: int, c_out: int) -> nn.Sequential:
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
            *[conv_down(widths[i], widths[i + 1]) for i in range(levels)],
            nn.Flatten(), nn.Linear(cfg.channels[-1] * self.bottom ** 2, cfg.feature_dim), nn.SiLU())
        self.to_mu = nn.Linear(cfg.feature_dim, cfg.latent_dim)
        self.to_logvar = nn.Linear(cfg.feature_dim, cfg.latent_dim)

        pose_widths = (cfg.num_keypoints,) + tuple(c // 2 for c in cfg.channels)
        self.pose_encoder = nn.ModuleList(conv_down(pose_widths[i], pose_widths[i + 1]) for i in range(levels))
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


def load_body_vae(path, device="cpu") -> BodyVAE:
    """A 'body-vae' checkpoint (the body stage's body_vae.pt) -> BodyVAE, frozen, in eval mode."""
    state = load_checkpoint(path, "body-vae")
    vae = BodyVAE(BodyVAEConfig(**{**state["config"], "channels": tuple(state["config"]["channels"])}))
    vae.load_state_dict(state["model"])
    return vae.to(device).eval().requires_grad_(False)
