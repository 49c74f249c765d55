"""Reading shapes images back: the rule-based checker of minildm/data/shapes.py.

`describe` finds the largest bright blob of an image and names its colour (by hue and saturation), its shape
(by how much of its bounding box it fills and where its mass sits) and its position (the nearest of the five
centres); `attribute_accuracy` and `prompt_accuracy` grade generated images against their prompts with it.
"""
from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import torch
from einops import rearrange

from minildm.data.shapes import (COLORS, CONCEPT_COLORS, CONCEPT_POSITIONS, CONCEPTS, POSITIONS, RGB, CENTERS,
                                 parse_caption)


MIN_PEAK = 0.2  # an image whose bright pixels are darker than this has no foreground
MIN_BLOB_PIXELS = 4  # a blob smaller than this is a speck, not a shape


def _as_hwc_float(image: Union[torch.Tensor, np.ndarray]) -> np.ndarray:
    """float tensor [3, H, W] in [0, 1] or uint8 array [H, W, 3] -> float array [H, W, 3] in [0, 1]."""
    if isinstance(image, torch.Tensor) and image.ndim == 3 and image.shape[0] == 3:
        return rearrange(image.detach().float().cpu().numpy(), "c h w -> h w c")
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3:
        return image.astype(np.float32) / 255.0
    raise ValueError(
        "describe expects a float tensor [3, H, W] in [0, 1] or a uint8 numpy array [H, W, 3]; "
        f"got {type(image).__name__} of shape {tuple(getattr(image, 'shape', ()))}."
    )


def _largest_blob(mask: np.ndarray) -> np.ndarray:
    """Largest 4-connected group of True pixels of mask [H, W] bool, as a bool mask (drops isolated specks)."""
    padded = np.pad(mask, 1)  # a False border, so a neighbour index never falls off the image
    width = padded.shape[1]
    unvisited = padded.ravel().tolist()  # flat list: True = foreground pixel not yet in a blob
    steps = (-width, -1, 1, width)  # the neighbours above, left, right, below
    largest = []
    for start in np.flatnonzero(padded).tolist():
        if not unvisited[start]:
            continue
        unvisited[start] = False
        blob = [start]
        for pixel in blob:  # flood fill: the loop also visits the pixels appended while it runs
            for step in steps:
                if unvisited[pixel + step]:
                    unvisited[pixel + step] = False
                    blob.append(pixel + step)
        if len(blob) > len(largest):
            largest = blob
    out = np.zeros(padded.size, dtype=bool)
    out[largest] = True
    return out.reshape(padded.shape)[1:-1, 1:-1]


def _smooth(brightness: np.ndarray) -> np.ndarray:
    """3x3 binomial blur [[1,2,1],[2,4,2],[1,2,1]] / 16 of an [H, W] map (rows, then columns): averages out noise."""
    p = np.pad(brightness, 1, mode="edge")
    p = (p[:-2] + 2 * p[1:-1] + p[2:]) / 4  # along y: [H, W + 2]
    return (p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:]) / 4  # along x: [H, W]


def _dilate(mask: np.ndarray) -> np.ndarray:
    """Grow a bool mask [H, W] by one pixel in all 8 directions."""
    height, width = mask.shape
    padded = np.pad(mask, 1)
    return np.any([padded[i : i + height, j : j + width] for i in range(3) for j in range(3)], axis=0)


def _nearest(value: np.ndarray, names: Sequence[str], prototypes: np.ndarray) -> str:
    """The name whose prototype (row of prototypes [K, D]) is closest to value [D] in Euclidean distance."""
    return names[int(np.argmin(((prototypes - value) ** 2).sum(axis=1)))]


# Colour is judged by hue and saturation, not brightness: every colour is scaled so its largest channel is 1.
def _palette_directions(colors: Sequence[str]) -> np.ndarray:
    """[K, 3]: each colour's RGB scaled so its largest channel is 1."""
    return np.array([np.array(RGB[c]) / max(RGB[c]) for c in colors])


def _choices(concepts: Sequence[str]) -> tuple:
    """(colour names, position names) describe chooses from: the base vocabulary plus the asked-for concepts."""
    for concept in concepts:
        if concept not in CONCEPTS:
            raise ValueError(f"unknown concept {concept!r}: describe knows the concept words {list(CONCEPTS)}.")
    return (list(COLORS) + [c for c in concepts if c in CONCEPT_COLORS],
            list(POSITIONS) + [c for c in concepts if c in CONCEPT_POSITIONS])


_PALETTE_DIRECTIONS = _palette_directions(list(COLORS))  # [6, 3]
_POSITION_CENTERS = np.array(list(POSITIONS.values()))  # [5, 2]
SQUARE_FILL = 0.875  # fill ratio between circle (pi/4 = 0.785) and square (1.0); blur raises circles to ~0.84
TRIANGLE_DROP = 0.05  # mass centre below the box centre, as a fraction of the height: triangle 1/6, others 0
DIAMOND_FILL = 0.76  # concept shape only: between diamond (1/2; ~0.64-0.73 after the anti-aliasing and blur) and circle


def describe(image: Union[torch.Tensor, np.ndarray], concepts: Sequence[str] = ()) -> tuple:
    """Read (color, shape, position) back from an image; (None, None, None) if there is no shape.

    image: float tensor [3, H, W] in [0, 1], or uint8 numpy array [H, W, 3]. concepts: words from CONCEPTS
    that may also be answered (default: only the base vocabulary). Built to cope with generated
    images (noise, soft edges, slightly wrong colours):
    1. brightness = max over RGB, lightly blurred; the peak is its 99th percentile (ignores a few specks);
       foreground = pixels brighter than half the peak; keep the largest connected blob.
    2. colour: mean RGB of the blob's bright core, scaled so its largest channel is 1, nearest palette
       colour scaled the same way.
    3. soft mask m = brightness / (core brightness), clipped to [0, 1] (anti-aliased edges count partly).
       Width = sum over columns of the column's largest m, height likewise over rows (sub-pixel extents);
       the box centre from these profiles gives the position (nearest POSITIONS centre, or concept position).
    4. shape: fill = sum(m) / (width * height): circle pi/4, square 1, triangle 1/2; and the drop of the mass
       centre below the box centre, / height: a triangle pointing up has 1/6 (its mass is in the base).
       With concepts=("diamond",): a symmetric shape with fill below DIAMOND_FILL is a diamond (fill 1/2).
    """
    rgb = _as_hwc_float(image)  # [H, W, 3]
    height, width = rgb.shape[:2]
    brightness = _smooth(rgb.max(axis=-1))  # [H, W]
    peak = np.partition(brightness.ravel(), int(0.99 * brightness.size))[int(0.99 * brightness.size)]  # 99th pct
    if peak < MIN_PEAK:
        return None, None, None
    blob = _largest_blob(brightness >= 0.5 * peak)  # [H, W] bool
    if blob.sum() < MIN_BLOB_PIXELS:
        return None, None, None
    core = blob & (brightness >= 0.75 * peak)  # the blob minus its soft edges
    if not core.any():  # the brightest pixels lie outside the largest blob: use the whole blob
        core = blob

    mean_rgb = rgb[core].mean(axis=0)  # [3]
    colors, positions = _choices(concepts)
    directions = _PALETTE_DIRECTIONS if len(colors) == len(COLORS) else _palette_directions(colors)
    color = _nearest(mean_rgb / max(mean_rgb.max(), 1e-6), colors, directions)

    m = np.clip(brightness / brightness[core].mean(), 0.0, 1.0) * _dilate(blob)  # [H, W] soft mask
    col_profile, row_profile = m.max(axis=0), m.max(axis=1)  # [W], [H]
    box_w, box_h, area = col_profile.sum(), row_profile.sum(), m.sum()
    xs, ys = np.arange(width) + 0.5, np.arange(height) + 0.5  # pixel centres
    box_cx, box_cy = (col_profile * xs).sum() / box_w, (row_profile * ys).sum() / box_h
    mass_cy = (m.sum(axis=1) * ys).sum() / area
    centers = _POSITION_CENTERS if len(positions) == len(POSITIONS) else np.array([CENTERS[p] for p in positions])
    position = _nearest(np.array([box_cx / width, box_cy / height]), positions, centers)

    fill = area / (box_w * box_h)
    drop = (mass_cy - box_cy) / box_h
    if drop > TRIANGLE_DROP:
        shape = "triangle"
    elif "diamond" in concepts and fill < DIAMOND_FILL:  # symmetric like circle and square, but half-filled
        shape = "diamond"
    elif fill > SQUARE_FILL:
        shape = "square"
    else:
        shape = "circle"
    return color, shape, position


def attribute_accuracy(images: torch.Tensor, prompts: Sequence[str], concepts: Sequence[str] = ()) -> dict:
    """Per-attribute agreement of describe(image) with the prompt, over a batch.

    images: float tensor [N, 3, H, W] in [0, 1]; prompts: N captions (either caption form);
    concepts: concept words describe may answer besides the base vocabulary (see `describe`).
    Returns {"color": float, "shape": float, "position": float, "all": float}, each a fraction in [0, 1];
    "all" counts an image right only when colour, shape and position all match.
    """
    if len(images) != len(prompts) or len(prompts) == 0:
        raise ValueError(
            f"need one prompt per image and at least one image, got {len(images)} images and {len(prompts)} prompts."
        )
    hits = {"color": 0, "shape": 0, "position": 0, "all": 0}
    for image, prompt in zip(images, prompts):
        wanted, seen = parse_caption(prompt), describe(image, concepts)
        matches = [w == s for w, s in zip(wanted, seen)]
        for name, match in zip(("color", "shape", "position"), matches):
            hits[name] += match
        hits["all"] += all(matches)
    return {name: count / len(prompts) for name, count in hits.items()}


def prompt_accuracy(images: torch.Tensor, prompts: Sequence[str], concepts: Sequence[str] = ()) -> float:
    """Fraction of images [N, 3, H, W] in [0, 1] whose colour, shape and position all match their prompt
    (concepts: concept words describe may answer, see `describe`)."""
    return attribute_accuracy(images, prompts, concepts)["all"]
