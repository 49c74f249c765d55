"""`python sample.py --sd --dry-run`: what SD v1.x needs on a GPU, without weights and without a GPU.

- parameters: counted on the modules built on the "meta" device (shapes only, no storage);
- activation memory: the UNet's and the decoder's forward passes run on meta tensors under a dispatch mode
  that adds up the bytes of every tensor alive at each moment; the peak is the memory beyond the weights
  an eager run allocates (CUDA's caching allocator adds fragmentation on top). Meta tensors run PyTorch's
  reference ("math") attention, which materialises every [heads, 4096, 4096] score matrix of the 64x64
  level: an upper bound, flash / memory-efficient attention on CUDA needs less;
- time: FLOPs counted with torch.utils.flop_counter on the same meta run, at an ASSUMED sustained
  throughput (an estimate, labelled as such).
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from minildm.autoencoder.kl import AutoencoderKL, KLConfig
from minildm.modules.unet import UNet, UNetConfig

ASSUMED_TFLOPS = 25.0  # sustained fp16 on an RTX 3090: about a third of its 71 TFLOP/s dense tensor-core peak
# (the same assumption as the 3090 training preset in minildm/config.py)


class LiveBytes(TorchDispatchMode):
    """Tracks the bytes of tensors created inside the mode that are still referenced; `peak` is the maximum."""

    def __init__(self):
        super().__init__()
        self.live, self.peak, self.seen = 0, 0, set()

    def _free(self, key, nbytes):
        self.live -= nbytes
        self.seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and not t._is_view():
                key = id(t)
                if key not in self.seen:
                    self.seen.add(key)
                    nbytes = t.numel() * t.element_size()
                    self.live += nbytes
                    weakref.finalize(t, self._free, key, nbytes)
        self.peak = max(self.peak, self.live)
        return out


def _meta_run(fn) -> tuple[int, float]:
    """(peak live activation bytes, FLOPs) of fn() on meta tensors."""
    with FlopCounterMode(display=False) as flops, LiveBytes() as live:
        fn()
    return live.peak, flops.get_total_flops()


def text_parameters() -> int:
    from minildm.text.clip_text import CLIPTextConfig, CLIPTextTransformer

    with torch.device("meta"):
        return sum(p.numel() for p in CLIPTextTransformer(CLIPTextConfig()).parameters())


@torch.no_grad()
def print_estimate(height: int = 512, width: int = 512, steps: int = 50, dtype: torch.dtype = torch.float16) -> None:
    with torch.device("meta"):
        unet, vae = UNet(UNetConfig.sd_v1()), AutoencoderKL(KLConfig.sd_v1())
    unet, vae = unet.to(dtype), vae.to(dtype)
    n_unet, n_vae = (sum(p.numel() for p in m.parameters()) for m in (unet, vae))
    try:
        n_text = text_parameters()
    except ImportError:
        n_text = 0
    size = torch.finfo(dtype).bits // 8
    total = n_unet + n_vae + n_text
    print(f"Stable Diffusion v1.x, {height}x{width}, {dtype}, DDIM {steps} steps with classifier-free guidance")
    print(f"parameters: UNet {n_unet / 1e6:.1f}M, autoencoder {n_vae / 1e6:.1f}M, text encoder {n_text / 1e6:.1f}M "
          f"= {total / 1e6:.0f}M, {total * size / 2**30:.2f} GiB of weights")
    h, w = height // 8, width // 8
    for batch in (1, 4):
        x = torch.zeros(2 * batch, 4, h, w, device="meta", dtype=dtype)  # [uncond, cond]
        ctx = torch.zeros(2 * batch, 77, 768, device="meta", dtype=dtype)
        t = torch.zeros(2 * batch, dtype=torch.long, device="meta")
        unet_peak, unet_flops = _meta_run(lambda: unet(x, t, ctx))
        z = torch.zeros(batch, 4, h, w, device="meta", dtype=dtype)
        dec_peak, dec_flops = _meta_run(lambda: vae.decode(z))
        peak = max(unet_peak, dec_peak)
        seconds = (steps * unet_flops + dec_flops) / (ASSUMED_TFLOPS * 1e12)
        fits = "fits" if total * size + peak < 24 * 2**30 else "does NOT fit"
        print(f"batch {batch}: activations measured on meta tensors (math attention, an upper bound): UNet step {unet_peak / 2**30:.2f} GiB, decoder "
              f"{dec_peak / 2**30:.2f} GiB -> weights + peak {(total * size + peak) / 2**30:.1f} GiB ({fits} in 24 GB); "
              f"{(steps * unet_flops + dec_flops) / 1e12:.1f} TFLOP -> ESTIMATE {seconds:.1f} s for the batch, "
              f"{seconds / batch:.1f} s per image at an assumed {ASSUMED_TFLOPS:.0f} TFLOP/s")
