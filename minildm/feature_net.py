"""The judge of FID-shapes and IS-shapes: a small shapes classifier that minildm trains itself (no download).

FID and IS look at images through a fixed network: Inception-v3 trained on ImageNet in the papers. We do not
download weights, and ImageNet's 1000 classes say little about 32x32 coloured shapes anyway. So minildm
trains its own judge on its own data: a small conv net that tells which of the 90 (colour, shape, position)
combinations a 32x32 image shows. Its two outputs play Inception's two roles:

    f(x)   = SiLU(W_f flatten(pool(convs(x))))     [B, feature_dim]   penultimate features  -> FID-shapes
    p(y|x) = softmax(W_c f(x))                     [B, 90]            class probabilities   -> IS-shapes

FID-shapes = FD between Gaussians fitted to f(real) and f(generated) (minildm/metrics.py);
IS-shapes  = exp(E_x KL(p(y|x) || p(y))), at most 90 (one confident class per image, all classes used).

These numbers are NOT comparable with Inception FID / IS from papers: another network, 64 features instead
of 2048, 90 classes instead of 1000, 32x32 shapes instead of photos. They compare runs of minildm with each
other, scored by the same feature-net checkpoint and the same number of images (FID is biased upwards at
small N: real against real gives a positive floor, which `minildm.evaluate` prints beside every score).

Choices:
- The last feature map is average-pooled to a 4x4 grid before the linear layer, not to one vector (as in
  clip.py): a global average would throw away where the shape is, and position is one of the three labels.
- Trained on clean jittered renders of all 90 combinations (the judge should know every combination, as
  Inception has seen far more than the models it scores). No noise augmentation: noise, blur or wrong
  colours move the features away from those of real shapes, which is what FID should notice.
- The training data of step k depends only on (seed, k), so the same seed gives the same judge.
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
from minildm.metrics import fid_from_features, inception_score
from minildm.progress import LossLog, progress as progress_bar, step_rng

FEATURE_NET_STEPS = 250  # about a minute on one busy CPU core; accuracy on fresh shapes ~1.0


@dataclass
class FeatureNetConfig:
    widths: tuple = (16, 32, 64)  # conv channels; every width after the first halves the resolution
    pool_size: int = 4  # the last feature map is average-pooled to pool_size x pool_size, then flattened
    feature_dim: int = 64  # D of the penultimate features f(x) (Inception's pool3 has 2048)
    num_classes: int = len(shapes.ALL_COMBOS)  # 90 (colour, shape, position) combinations

    def __post_init__(self):
        self.widths = tuple(self.widths)  # accept lists (a config read back from a checkpoint)


def _conv_block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    """3x3 conv (stride 2 halves the resolution) -> GroupNorm (8 groups, fewer for narrow widths) -> SiLU."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.GroupNorm(math.gcd(8, c_out), c_out),
                         nn.SiLU())


class ShapesFeatureNet(nn.Module):
    """images [B, 3, H, W] in [-1, 1] -> logits [B, num_classes]; `features` gives the penultimate layer."""

    def __init__(self, cfg: FeatureNetConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.widths
        blocks = [_conv_block(3, w[0], stride=1)] + [_conv_block(a, b, stride=2) for a, b in zip(w[:-1], w[1:])]
        self.convs = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(cfg.pool_size)
        self.to_features = nn.Linear(w[-1] * cfg.pool_size**2, cfg.feature_dim)  # W_f
        self.classifier = nn.Linear(cfg.feature_dim, cfg.num_classes)  # W_c

    @property
    def device(self) -> torch.device:
        return self.classifier.weight.device

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """f(x) = SiLU(W_f flatten(pool(convs(x)))): images [B, 3, H, W] in [-1, 1] -> [B, feature_dim]."""
        h = self.pool(self.convs(images))  # [B, C, 4, 4]: coarse, but still knows where the shape is
        return F.silu(self.to_features(rearrange(h, "b c h w -> b (c h w)")))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits W_c f(x) [B, num_classes]; softmax gives p(y|x)."""
        return self.classifier(self.features(images))


def combo_labels(combos) -> torch.Tensor:
    """(colour, shape, position) tuples -> class indices LongTensor [N] (their index in shapes.ALL_COMBOS)."""
    return torch.tensor([shapes.ALL_COMBOS.index(tuple(c)) for c in combos], dtype=torch.long)


def labelled_shapes(n: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n fresh jittered shapes of uniformly drawn combinations: (images [n, 3, 32, 32] in [-1, 1], labels [n])."""
    labels = torch.from_numpy(rng.integers(len(shapes.ALL_COMBOS), size=n))
    return shapes.render_combos([shapes.ALL_COMBOS[i] for i in labels.tolist()], rng), labels


@torch.enable_grad()  # trains even when called from code that samples under torch.no_grad()
def train_feature_net(steps: int = FEATURE_NET_STEPS, batch_size: int = 64, lr: float = 3e-3, seed: int = 0,
                      cfg: FeatureNetConfig | None = None, device: str | torch.device = "cpu",
                      progress: bool = True) -> tuple[ShapesFeatureNet, LossLog]:
    """Train the classifier with cross-entropy on fresh shapes; returns (model in eval mode, LossLog "loss", "acc").

    Each step draws a new batch (the data of step k depends only on (seed, k)), so there is nothing to
    overfit: the batch accuracy is also an accuracy on unseen images.
    """
    cfg = cfg or FeatureNetConfig()
    torch.manual_seed(seed)
    model = ShapesFeatureNet(cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    log = LossLog()
    model.train()
    with progress_bar(steps, 0, "feature net", enabled=progress) as bar:
        for step in range(steps):
            images, labels = labelled_shapes(batch_size, step_rng(seed, step))
            logits = model(images.to(device))
            loss = F.cross_entropy(logits, labels.to(device))  # -log p(y_true | x)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            log.add(step, loss=loss.item(), acc=(logits.argmax(dim=-1).cpu() == labels).float().mean().item())
            bar.update(1)
            bar.set_postfix(log.postfix("loss", "acc"), refresh=False)  # redrawn at the bar's own pace
    return model.eval(), log


@torch.no_grad()
def embed(model: ShapesFeatureNet, images: torch.Tensor, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """images [N, 3, H, W] in [-1, 1] -> (features f(x) [N, D], probabilities p(y|x) [N, 90]), on the CPU."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"the feature net expects images [N, 3, H, W] in [-1, 1], got shape {tuple(images.shape)}.")
    features = [model.features(images[i:i + chunk].to(model.device)).cpu() for i in range(0, len(images), chunk)]
    features = torch.cat(features)
    return features, model.classifier(features.to(model.device)).softmax(dim=-1).cpu()


def classifier_accuracy(model: ShapesFeatureNet, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of images [N, 3, H, W] in [-1, 1] whose most probable class is its label [N]."""
    _, probs = embed(model, images)
    return (probs.argmax(dim=-1) == labels.cpu()).float().mean().item()


def fid_shapes(model: ShapesFeatureNet, images_a: torch.Tensor, images_b: torch.Tensor) -> float:
    """FID-shapes: Frechet distance of the feature Gaussians of two image sets [N, 3, H, W] in [-1, 1]."""
    return fid_from_features(embed(model, images_a)[0], embed(model, images_b)[0])


def is_shapes(model: ShapesFeatureNet, images: torch.Tensor, splits: int = 1) -> tuple[float, float]:
    """IS-shapes of images [N, 3, H, W] in [-1, 1]: (mean, std) over `splits` parts; 1 <= IS <= 90."""
    return inception_score(embed(model, images)[1], splits=splits)


def save_feature_net(path: str | os.PathLike, model: ShapesFeatureNet, summary: dict | None = None) -> Path:
    """Write a "feature-net" checkpoint: {"config": asdict(cfg), "weights": state_dict, "summary": {...}}."""
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return save_checkpoint(path, "feature-net", {"config": asdict(model.cfg), "weights": weights,
                                                 "summary": dict(summary or {})})


def load_feature_net(path: str | os.PathLike, device: str | torch.device = "cpu") -> ShapesFeatureNet:
    """Read a "feature-net" checkpoint written by `save_feature_net` -> model in eval mode, no gradients."""
    state = load_checkpoint(path, "feature-net")
    model = ShapesFeatureNet(FeatureNetConfig(**state["config"]))
    model.load_state_dict(state["weights"])
    return model.to(device).eval().requires_grad_(False)


def load_or_train_feature_net(path: str | os.PathLike, steps: int = FEATURE_NET_STEPS,
                              device: str | torch.device = "cpu", progress: bool = True) -> ShapesFeatureNet:
    """The cached judge at `path`; when the file does not exist, train one (seed 0), save it there, return it."""
    path = Path(path)
    if path.is_file():
        return load_feature_net(path, device)
    print(f"no feature net at {path}: training one ({steps} steps, about a minute on a CPU)")
    model, log = train_feature_net(steps, device=device, progress=progress)
    images, labels = labelled_shapes(512, step_rng(0, 0, stream=2))  # fresh images no training batch used
    accuracy = classifier_accuracy(model, images, labels)
    save_feature_net(path, model, {"steps": steps, "accuracy": accuracy})
    print(f"feature net: accuracy {accuracy:.3f} on 512 fresh shapes (chance {1 / len(shapes.ALL_COMBOS):.3f}); saved {path}")
    return model.requires_grad_(False)
