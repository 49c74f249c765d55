"""Reading one image file the way every part of minildm does: training folders, image prompts, body views.

    file --decode (EXIF rotation applied)--> RGB (16-bit scaled to 8, alpha composited on `background`)
         --shorter side resized to size (bicubic, antialiased)--> central size x size square, uint8

One function, so that a picture given as an image prompt is seen exactly as a training picture would be.
Transparent pixels are composited onto the background the model trained on (a folder's white, the shapes'
black, ...): two RGBA files that look alike give the same pixels whatever colour their transparent pixels
store. A file PIL cannot decode, or one larger than PIL's guard against decompression bombs, raises
`ImageReadError` (a ValueError) with one sentence naming the file.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from PIL import Image, ImageOps

WHITE = (255, 255, 255)


class ImageReadError(ValueError):
    """An image file cannot be read (the message names the file and the reason)."""


def to_rgb(image: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """Any PIL mode -> RGB: grey is repeated, palettes looked up, 16-bit grey scaled (not clipped) to 8 bits,
    and transparent pixels composited onto `background` (otherwise they show whatever colour they store)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N") or (image.mode == "I" and image.getextrema()[1] > 255):
        image = Image.fromarray((np.asarray(image, dtype=np.uint32) >> 8).astype(np.uint8))  # 0..65535 -> 0..255
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (*background, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is `size` (aspect ratio kept), then cut the central size x size square."""
    w, h = image.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


def read_image(path: str | Path, size: int, background: tuple[int, int, int] = WHITE) -> np.ndarray:
    """One image file -> uint8 [size, size, 3] (see the module docstring); ImageReadError if it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path} does not exist or is not a file: give the path of a PNG or JPG image.")
    try:
        with Image.open(path) as image:
            image.draft("RGB", (size, size))  # JPEG only: decode at 1/2, 1/4 or 1/8 scale if still >= size
            image.load()  # decode now: a truncated file fails here, not later
            image = ImageOps.exif_transpose(image)  # photos taken sideways carry their rotation in EXIF
            return np.array(resize_center_crop(to_rgb(image, background), size))
    except Image.DecompressionBombError:
        raise ImageReadError(f"{path} has more pixels than PIL's guard against decompression bombs allows "
                             f"({2 * Image.MAX_IMAGE_PIXELS:,}): resize it to a few thousand pixels a side "
                             "first.") from None
    except Exception as e:  # PIL raises OSError, SyntaxError, EOFError, zlib.error, ValueError...
        raise ImageReadError(f"cannot read {path} as an image ({type(e).__name__}: {e}): give a PNG or JPG "
                             "file.") from None


def read_image_tensor(path: str | Path, size: int, background: tuple[int, int, int] = WHITE) -> torch.Tensor:
    """`read_image` as a model input: [1, 3, size, size] floats in [-1, 1] (x = p / 127.5 - 1)."""
    pixels = torch.from_numpy(read_image(path, size, background)).float() / 127.5 - 1
    return rearrange(pixels, "h w c -> 1 c h w")
