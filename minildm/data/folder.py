"""Real image-caption folders: Flickr8k's `captions.txt`, or images with `.txt` sidecar captions.

Two layouts, told apart by whether FOLDER/captions.txt exists:
  Flickr8k   FOLDER/captions.txt is CSV with the header `image,caption` and one row per caption (Flickr8k
             has five captions per image); the images sit in FOLDER/ or FOLDER/Images/ (Kaggle's layout).
  sidecars   FOLDER/**/name.jpg next to FOLDER/**/name.txt; every non-empty line of the .txt is a caption.
Either way an image may have several captions; the diffusion training draws one of them per step.

Every image is decoded once, up front, by the image reader every part of minildm shares
(minildm/data/images.py): EXIF rotation applied, converted to RGB (grey, 16-bit, palette and alpha images
too; transparent pixels become white), its shorter side resized to `size` (bicubic, antialiased) and
centre-cropped to size x size. A file that cannot be decoded (not an image, truncated, corrupt) or
that has no caption is skipped and listed with the reason in `skipped`; since nothing is decoded after
loading, a bad file can never stop a run in the middle of an epoch.

The images stay uint8 [N, 3, size, size] in memory (Flickr8k at 256x256: 1.6 GB instead of 6.4 GB of
floats); indexing `folder.images[idx]` returns floats in [-1, 1] like every other image in minildm.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import torch
from einops import rearrange
from tqdm.auto import tqdm

from minildm.data.images import WHITE, ImageReadError, read_image

CAPTIONS_FILE = "captions.txt"
IMAGE_DIRS = (".", "Images", "images")  # where a captions.txt row looks for its image, in this order


class Uint8Images:
    """N images kept as uint8 [N, 3, H, W]; indexing (an int, a slice, a LongTensor) returns floats in [-1, 1].

    It stands in for a float image tensor wherever minildm draws batches: `images[idx]`, `len(images)`,
    `images.shape`.
    """

    def __init__(self, pixels: torch.Tensor):
        if pixels.dtype != torch.uint8 or pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"pixels must be a uint8 tensor [N, 3, H, W], got {pixels.dtype} {tuple(pixels.shape)}.")
        self.pixels = pixels

    @property
    def shape(self) -> torch.Size:
        return self.pixels.shape

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, index) -> torch.Tensor:
        return self.pixels[index].float() / 127.5 - 1  # x = p / 127.5 - 1 maps 0..255 onto [-1, 1]


@dataclass
class CaptionFolder:
    """A loaded folder: image i is `images[i]` ([3, size, size] in [-1, 1]) with every caption in `captions[i]`."""

    root: Path
    images: Uint8Images
    captions: list[list[str]]
    names: list[str]  # image i's file, relative to root
    skipped: list[tuple[str, str]]  # (file, reason) of every file left out

    def __len__(self) -> int:
        return len(self.names)

    def summary(self) -> str:
        n_captions = sum(len(c) for c in self.captions)
        return (f"{self.root}: {len(self)} images with {n_captions} captions at {self.images.shape[-1]}x"
                f"{self.images.shape[-1]}; {len(self.skipped)} files skipped")

    def write_skipped(self, path: str | Path) -> Path:
        """One line per skipped file, `name<TAB>reason`, so a user can find and fix them."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"{name}\t{reason}\n" for name, reason in self.skipped), encoding="utf-8")
        return path


def read_captions_csv(root: Path) -> tuple[dict[str, list[str]], list[tuple[str, str]]]:
    """captions.txt -> ({image name: [captions]} in file order, [(line, reason)] of unusable rows)."""
    path = root / CAPTIONS_FILE
    text = path.read_text(encoding="utf-8-sig", errors="replace")  # a BOM or stray bytes never stop us
    rows = csv.reader(io.StringIO(text))
    header = next(rows, [])
    if [h.strip().lower() for h in header] != ["image", "caption"]:
        raise ValueError(f"{path} must be CSV with the header line 'image,caption' (Flickr8k's format), "
                         f"but its first line is {','.join(header)!r}.")
    captions, bad = {}, []
    for line, row in enumerate(rows, start=2):
        # an unquoted comma inside a caption splits it into more fields: join them back
        name, caption = (row[0].strip(), ",".join(row[1:]).strip()) if row else ("", "")
        if not name or not caption:
            if row:
                bad.append((f"{CAPTIONS_FILE} line {line}", "not an 'image,caption' row"))
            continue
        captions.setdefault(name, []).append(caption)
    return captions, bad


def find_captioned_files(root: Path) -> tuple[list[tuple[str, Path | None, list[str]]], list[tuple[str, str]]]:
    """The folder's (name, file or None if missing, captions) in a fixed order, and rows already unusable."""
    if (root / CAPTIONS_FILE).is_file():
        captions, bad = read_captions_csv(root)
        entries = []
        for name, caps in captions.items():
            found = [root / d / name for d in IMAGE_DIRS if (root / d / name).is_file()]
            entries.append((name, found[0] if found else None, caps))
        return entries, bad
    entries = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        if path.suffix.lower() == ".txt":
            continue  # a caption, read with its image
        sidecar = path.with_suffix(".txt")
        caps = sidecar.read_text(encoding="utf-8-sig", errors="replace").splitlines() if sidecar.is_file() else []
        entries.append((path.relative_to(root).as_posix(), path, [c.strip() for c in caps if c.strip()]))
    return entries, []


def load_folder(root: str | Path, size: int, show_progress: bool = True) -> CaptionFolder:
    """Decode every captioned image of `root` at size x size (see the module docstring); bad files are skipped."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder: pass a folder holding captions.txt (Flickr8k) or images with "
                         ".txt captions beside them, or use --data shapes.")
    entries, skipped = find_captioned_files(root)
    pixels = torch.empty((len(entries), 3, size, size), dtype=torch.uint8)
    names, captions = [], []
    for name, path, caps in tqdm(entries, desc=f"loading {root.name}", disable=not show_progress, leave=False):
        if path is None:
            skipped.append((name, f"listed in {CAPTIONS_FILE} but not found in {', '.join(IMAGE_DIRS)}"))
            continue
        if not caps:
            skipped.append((name, f"no caption (an empty or missing {path.with_suffix('.txt').name})"))
            continue
        try:
            array = read_image(path, size, WHITE)
        except ImageReadError as e:
            skipped.append((name, f"unreadable image: {e}"))
            continue
        pixels[len(names)] = rearrange(torch.from_numpy(array), "h w c -> c h w")
        names.append(name)
        captions.append(caps)
    if not names:
        raise ValueError(f"{root} holds no usable captioned images ({len(entries)} candidates, {len(skipped)} "
                         "skipped): it needs captions.txt (Flickr8k) or images with .txt captions beside them.")
    return CaptionFolder(root, Uint8Images(pixels[:len(names)]), captions, names, skipped)
