"""Reading one image file the way every part of minildm does: training folders, image prompts, body views.

    file --decode (EXIF rotation applied)--> RGB (16-bit scaled to 8, alpha composited on `background`)
         --shorter side resized to size (bicubic, antialiased)--> central size x size square, uint8

One function, so that a picture given as an image prompt is seen exactly as a training picture would be.
With crop=False it keeps the whole picture instead (Stable Diffusion's image-to-image, `sample.py --sd
--init-image`): resized to a requested height x width, or with its aspect ratio kept, the side that follows
the aspect rounded to a multiple of `multiple` (SD v1's pipeline needs multiples of 64).
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


def whole_size(image_size: tuple[int, int], size: int | tuple[int | None, int | None],
               multiple: int = 1) -> tuple[int, int]:
    """(height, width) to resize a whole w x h picture (PIL's image.size) to, no crop.

    size = s:                  the shorter side becomes s, the longer one follows the aspect ratio;
    size = (height, width):    exactly that (the picture is stretched if its aspect ratio differs);
    size = (height, None) or (None, width): that side as given, the other follows the aspect ratio.
    A side that follows the aspect ratio is rounded to the nearest multiple of `multiple` (at least one);
    the sides you give are kept as they are.
    """
    w, h = image_size
    if isinstance(size, int):
        size = (size, None) if h <= w else (None, size)
    height, width = size
    if height is None and width is None:
        raise ValueError("give the shorter side, or a height, a width or both, to resize a whole picture to.")
    follow = lambda length: max(multiple, round(length / multiple) * multiple)  # noqa: E731
    return (height or follow(h * width / w)), (width or follow(w * height / h))


def read_image(path: str | Path, size: int | tuple[int | None, int | None], background: tuple[int, int, int] = WHITE,
               crop: bool = True, multiple: int = 1) -> np.ndarray:
    """One image file -> uint8 [size, size, 3] (see the module docstring); ImageReadError if it cannot be read.

    crop=False keeps the whole picture: uint8 [H, W, 3] with (H, W) = whole_size(file's size, size, multiple).
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path} does not exist or is not a file: give the path of a PNG or JPG image.")
    if crop and not isinstance(size, int):
        raise ValueError(f"a square crop takes one side length, got size {size}: pass crop=False for height x width.")
    try:
        with Image.open(path) as image:
            if crop:
                image.draft("RGB", (size, size))  # JPEG only: decode at 1/2, 1/4 or 1/8 scale if still >= size
            image.load()  # decode now: a truncated file fails here, not later
            image = ImageOps.exif_transpose(image)  # photos taken sideways carry their rotation in EXIF
            image = to_rgb(image, background)
    except Image.DecompressionBombError:
        raise ImageReadError(f"{path} has more pixels than PIL's guard against decompression bombs allows "
                             f"({2 * Image.MAX_IMAGE_PIXELS:,}): resize it to a few thousand pixels a side "
                             "first.") from None
    except Exception as e:  # PIL raises OSError, SyntaxError, EOFError, zlib.error, ValueError...
        raise ImageReadError(f"cannot read {path} as an image ({type(e).__name__}: {e}): give a PNG or JPG "
                             "file.") from None
    if crop:
        return np.array(resize_center_crop(image, size))
    height, width = whole_size(image.size, size, multiple)
    return np.array(image.resize((width, height), Image.Resampling.BICUBIC))  # bicubic, antialiased


def read_image_tensor(path: str | Path, size: int, background: tuple[int, int, int] = WHITE) -> torch.Tensor:
    """`read_image` as a model input: [1, 3, size, size] floats in [-1, 1] (x = p / 127.5 - 1)."""
    pixels = torch.from_numpy(read_image(path, size, background)).float() / 127.5 - 1
    return rearrange(pixels, "h w c -> 1 c h w")
