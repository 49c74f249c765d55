"""A keypoint regressor: the measuring network of the body code. It finds the 17 COCO keypoints of a
generated person, for BoLID's L_id (eq. 14, adapters/body.py), for `sample.py --body-views` (keypoints of
a user's views) and for the body benchmark (limb ratios and poses of generated people, data/body_measure.py).
"""
import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from minildm.adapters.body_vae import conv_down, keypoint_gaussians, keypoints_to_pixels
from minildm.checkpoint import load_checkpoint


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
    which shortens limbs. Measured on unseen people (bench/results/body.md, regressor_people), the window
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
        self.down1 = nn.Sequential(conv_down(w, 2 * w), nn.Conv2d(2 * w, 2 * w, 3, padding=1), act())          # H/2
        self.down2 = nn.Sequential(conv_down(2 * w, 4 * w), nn.Conv2d(4 * w, 4 * w, 3, padding=2, dilation=2), act(),
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


def load_regressor(path, device="cpu") -> KeypointRegressor:
    """A 'keypoint-regressor' checkpoint (the body stage's keypoint_regressor.pt) -> the model, frozen, in eval mode."""
    state = load_checkpoint(path, "keypoint-regressor")
    model = KeypointRegressor(state["num_keypoints"])
    model.load_state_dict(state["model"])
    return model.to(device).eval().requires_grad_(False)
