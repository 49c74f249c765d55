"""Image prompts at sampling time: a trained IP-Adapter (adapters/ip_adapter.py) and the frozen CLIP it reads.

`load_image_prompter` installs a run's ip_adapter.pt into a loaded pipeline's UNet at lambda = ip_lambda and
returns an `ImagePrompter`, which turns image prompts into the `extra_tokens` of `LatentDiffusion.generate`
(appended after the text context of both halves of classifier-free guidance).
"""
from __future__ import annotations

from pathlib import Path

import torch

from minildm.adapters.ip_adapter import ImageProjection, IPAdapterConfig, load_ip_adapter, new_ip_adapter, set_ip_lambda
from minildm.checkpoint import CheckpointError, current_names, fits, load_checkpoint
from minildm.clip import CLIP, load_clip
from minildm.data import shapes
from minildm.data.images import read_image_tensor

ADAPTER_FILE, CLIP_FILE = "ip_adapter.pt", "clip.pt"


def clip_fingerprint(clip: CLIP) -> float:
    """One number that changes whenever the CLIP image projection changes (sum |W_i|): an adapter only
    understands the embeddings of the CLIP it was trained with."""
    return clip.image_proj.weight.detach().double().abs().sum().item()


class ImagePrompter:
    """A frozen CLIP + the trained ImageProjection: image prompts -> the `extra_tokens` of `LatentDiffusion.generate`."""

    def __init__(self, clip: CLIP, projection: ImageProjection):
        self.clip, self.projection = clip.eval(), projection.eval()

    @torch.no_grad()
    def extra_tokens(self, images: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """images [N or 1, 3, H, W] in [-1, 1], or None (text only) -> (cond [N or 1, n, d], uncond [1, n, d]).

        uncond = LayerNorm(W_p 0): the tokens of a dropped image, which the adapter learned as "no image prompt".
        """
        device = self.projection.proj.weight.device
        uncond = self.projection(torch.zeros(1, self.projection.d_img, device=device))  # c_i of e = 0
        if images is None:
            return uncond, uncond
        return self.projection(self.clip.encode_image(images.to(device))), uncond  # c_i = LN(W_p CLIP_img(x))


def load_image_prompter(pipe, adapter_path: str | Path, ip_lambda: float = 1.0) -> ImagePrompter:
    """Install the adapter of `adapter_path` (with the clip.pt beside it) into pipe.unet (a loaded LatentDiffusion's) at lambda = ip_lambda."""
    adapter_path = Path(adapter_path)
    if not adapter_path.is_file():
        raise CheckpointError(f"no IP-Adapter at {adapter_path}: train one with "
                              f"python train.py --stage ip-adapter --base {adapter_path.parent}.")
    state = load_checkpoint(adapter_path, "ip-adapter")
    clip, _ = load_clip(adapter_path.parent / CLIP_FILE, pipe.device)
    if abs(clip_fingerprint(clip) - state["clip_fingerprint"]) > 1e-3 * state["clip_fingerprint"]:
        raise CheckpointError(f"{adapter_path.parent / CLIP_FILE} is not the CLIP that {adapter_path} was trained "
                              "with: train the adapter again (python train.py --stage ip-adapter).")
    if state.get("ldm_fingerprint") not in (None, pipe.fingerprint):
        raise CheckpointError(f"{adapter_path} was trained on another base model than this run's ldm.pt (retrained "
                              "or resumed since): train the adapter again (python train.py --stage ip-adapter).")
    with fits(state):
        projection = new_ip_adapter(pipe.unet, IPAdapterConfig(**current_names(state["config"])))
    load_ip_adapter(pipe.unet, projection, state)
    set_ip_lambda(pipe.unet, ip_lambda)
    return ImagePrompter(clip, projection)


def load_image_file(path: str | Path, size: int) -> torch.Tensor:
    """An image prompt file -> [1, 3, size, size] in [-1, 1], read as training images are (data/images.py),
    transparent pixels on the shapes' black background the adapter trained on."""
    return read_image_tensor(path, size, shapes.BACKGROUND)
