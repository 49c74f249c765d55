"""Procedural captioned shapes: the default dataset of minildm (its checker, `describe`, is data/describe.py).

Every image is one filled shape on a black background, described by three attributes from a small fixed
vocabulary (6 colours x 3 shapes x 5 positions = 90 combinations), with a caption such as
"a red circle on the left". Because the data is generated, we know the right answer for every prompt, so a
rule-based checker, `describe` (data/describe.py), can grade generated images ("did the model draw a red circle on the left?").

Ten combinations (`HELD_OUT`) never appear in training. Each of their colours, shapes and positions does
appear in training with other partners, so a model that draws them has composed attributes it learned
separately: this is how we measure compositional generalisation.

Geometry (all lengths are fractions of the image side, y grows downwards):
- every shape fits in a box of half-extent r around its centre (cx, cy); r ~ U(0.17, 0.20) with jitter;
- circle: radius r; square: half-side r * sqrt(pi) / 2 (same area as the circle);
  triangle (pointing up): apex (cx, cy - r), base from (cx - r, cy + r) to (cx + r, cy + r);
- the centre is jittered by up to +-0.02, so a shape always keeps a margin of >= 0.05 from the border.
Shapes are anti-aliased by supersampling: render at 4x the resolution, then average each 4x4 block.
"""
from __future__ import annotations

import re
from typing import Optional, Sequence, Union

import numpy as np
import torch
from einops import rearrange

# ----------------------------------------------------------------------------------------------------------
# Vocabulary (fixed, so results compare across versions)
# ----------------------------------------------------------------------------------------------------------
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 230),
    "yellow": (230, 210, 40),
    "purple": (150, 60, 200),
    "cyan": (40, 200, 210),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {  # name -> (cx, cy) as fractions of the side, y measured from the top
    "left": (0.27, 0.5),
    "right": (0.73, 0.5),
    "top": (0.5, 0.27),
    "bottom": (0.5, 0.73),
    "center": (0.5, 0.5),
}

BACKGROUND = (0, 0, 0)  # every shape is drawn on black (what image prompts composite transparency onto)
RADIUS = 0.185  # canonical half-extent r of a shape (no jitter)
RADIUS_RANGE = (0.17, 0.20)  # r ~ U(RADIUS_RANGE) with jitter
CENTER_JITTER = 0.02  # cx, cy += U(-CENTER_JITTER, CENTER_JITTER) with jitter
SUPERSAMPLE = 4  # anti-aliasing: render at 4x and average 4x4 blocks
RENDER_CHUNK = 64  # images rendered at once; bounds the memory of the supersampled grids

ALL_COMBOS = tuple((c, s, p) for c in COLORS for s in SHAPES for p in POSITIONS)  # 90, colour-major order

# Concept words: a colour, a shape and a position the base vocabulary does not have. No combination, split or
# training caption above uses them; LoRA fine-tuning (minildm/train/lora.py, lesson 13) teaches a trained model
# one of them as a new word. `render` and `caption` accept them; `describe` reads them only when asked:
# describe(x, concepts=("corner",)). The tiny autoencoder, trained on the base vocabulary only, cannot
# reproduce an orange or a diamond (lesson 13 shows it), but draws any known shape in the corner.
CONCEPT_COLORS = {"orange": (240, 130, 20)}  # hue halfway between red and yellow
CONCEPT_SHAPES = ("diamond",)  # |dx| + |dy| <= r: a square turned by 45 degrees, with the triangle's area 2 r^2
CONCEPT_POSITIONS = {"corner": (0.27, 0.27)}  # the top-left corner: left's x, top's y ("in the corner")
CONCEPTS = tuple(CONCEPT_COLORS) + CONCEPT_SHAPES + tuple(CONCEPT_POSITIONS)
RGB = {**COLORS, **CONCEPT_COLORS}
CENTERS = {**POSITIONS, **CONCEPT_POSITIONS}


def concept_combos(concept: str) -> tuple:
    """Every combination of a concept word with the base vocabulary's other two attributes: a colour -> 15
    (colour, shape, position), a shape -> 30, a position -> 18, in the order of COLORS, SHAPES, POSITIONS."""
    if concept not in CONCEPTS:
        raise ValueError(f"unknown concept {concept!r}: choose one of {list(CONCEPTS)}.")
    colors = [concept] if concept in CONCEPT_COLORS else list(COLORS)
    shapes = [concept] if concept in CONCEPT_SHAPES else list(SHAPES)
    positions = [concept] if concept in CONCEPT_POSITIONS else list(POSITIONS)
    return tuple((c, s, p) for c in colors for s in shapes for p in positions)


def _held_out_combos() -> tuple:
    """The ten held-out combinations, by the rule: for k = 0..9 take
    colour k mod 6, shape (k + k // 6) mod 3, position (2k + 1) mod 5
    (indices into the orders of COLORS, SHAPES and POSITIONS above).

    The `k // 6` term shifts the shape for k >= 6 so no (colour, shape) pair is held out twice; each
    position is held out exactly twice. Every colour keeps >= 13 of its 15 combinations in training,
    every (colour, shape), (colour, position) and (shape, position) pair still appears in training.
    """
    colors, positions = list(COLORS), list(POSITIONS)
    return tuple((colors[k % 6], SHAPES[(k + k // 6) % 3], positions[(2 * k + 1) % 5]) for k in range(10))


HELD_OUT = _held_out_combos()
SEEN = tuple(combo for combo in ALL_COMBOS if combo not in HELD_OUT)  # the 80 training combinations
SPLITS = {"train": SEEN, "held_out": HELD_OUT, "all": ALL_COMBOS}


# ----------------------------------------------------------------------------------------------------------
# Captions
# ----------------------------------------------------------------------------------------------------------
def _check_combo(color: str, shape: str, position: str) -> None:
    if color not in RGB or shape not in SHAPES + CONCEPT_SHAPES or position not in CENTERS:
        raise ValueError(
            f"unknown combination ({color!r}, {shape!r}, {position!r}): choose the colour from "
            f"{list(COLORS)}, the shape from {list(SHAPES)} and the position from {list(POSITIONS)} "
            f"(or a concept word of {list(CONCEPTS)})."
        )


def position_phrase(position: str) -> str:
    """The words of a position in a caption: "left" -> "on the left", "center" -> "in the center"."""
    return f"in the {position}" if position in ("center", "corner") else f"on the {position}"


def caption(color: str, shape: str, position: str, paraphrase: bool = False) -> str:
    """Caption of one combination.

    caption("red", "circle", "left")                  -> "a red circle on the left"
    caption("red", "circle", "center")                -> "a red circle in the center"
    caption("red", "circle", "left", paraphrase=True) -> "a circle that is red, on the left"
    """
    _check_combo(color, shape, position)
    if paraphrase:
        return f"a {shape} that is {color}, {position_phrase(position)}"
    return f"a {color} {shape} {position_phrase(position)}"


def partial_captions(color: str, shape: str, position: str) -> list[str]:
    """The three cut-down captions of a combination, each leaving attributes unsaid:

    partial_captions("red", "circle", "left") -> ["a red circle", "on the left", ""]
    """
    _check_combo(color, shape, position)
    return [f"a {color} {shape}", position_phrase(position), ""]


def _words(text: str) -> tuple:
    """Lower-case words of a caption, with the comma as a word of its own: "a b, c" -> ("a", "b", ",", "c")."""
    return tuple(re.findall(r"[a-z]+|,", text.lower()))


# Every word any caption can use (the comma of the paraphrase counts as a word), for building a tokenizer.
VOCAB_WORDS = ("a", "on", "in", "the", "that", "is", ",") + tuple(COLORS) + SHAPES + tuple(POSITIONS)

# Both caption forms of every combination (concept words included), as word tuples -> combination.
_CAPTION_TABLE = {_words(caption(*combo, paraphrase=p)): combo
                  for combo in ALL_COMBOS + sum(map(concept_combos, CONCEPTS), ()) for p in (False, True)}


def parse_caption(text: str) -> tuple:
    """Inverse of `caption` for both forms: "a red circle on the left" -> ("red", "circle", "left").

    Case, spacing and punctuation other than the comma are ignored; anything else raises ValueError.
    """
    combo = _CAPTION_TABLE.get(_words(text))
    if combo is None:
        raise ValueError(
            f"cannot parse caption {text!r}: expected 'a <color> <shape> on the <position>' "
            f"or 'a <shape> that is <color>, on the <position>' with words from VOCAB_WORDS."
        )
    return combo


# ----------------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------------
def _draw_jitter(rng: np.random.Generator, n: int) -> tuple:
    """Random centre offsets [n, 2] and half-extents [n] for n shapes."""
    offsets = rng.uniform(-CENTER_JITTER, CENTER_JITTER, size=(n, 2))
    radii = rng.uniform(*RADIUS_RANGE, size=n)
    return offsets, radii


def _inside(shape: str, dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Is the point (dx, dy) from the centre inside a shape of half-extent r? (all broadcast together)"""
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "square":  # half-side r * sqrt(pi) / 2 gives the circle's area
        return np.maximum(np.abs(dx), np.abs(dy)) <= r * (np.sqrt(np.pi) / 2)
    if shape == "diamond":  # a concept shape (see CONCEPT_SHAPES)
        return np.abs(dx) + np.abs(dy) <= r
    return (dy <= r) & (np.abs(dx) <= (dy + r) / 2)  # triangle: half-width 0 at the apex (dy = -r), r at the base


def _render_batch(combos: Sequence[tuple], offsets: np.ndarray, radii: np.ndarray, size: int) -> np.ndarray:
    """Render B shapes at once with array maths (no Python loop over pixels or images).

    combos: B (color, shape, position) tuples; offsets: [B, 2] centre jitter (dx, dy); radii: [B] half-extents r.
    Returns float32 [B, size, size, 3] in [0, 1], rounded to 8-bit levels (so it equals `render(...) / 255`).
    """
    if size < 8:
        raise ValueError(f"image size must be at least 8 pixels to draw a recognisable shape, got {size}.")
    if len(combos) > RENDER_CHUNK:  # render a big batch chunk by chunk
        chunks = [slice(i, i + RENDER_CHUNK) for i in range(0, len(combos), RENDER_CHUNK)]
        return np.concatenate([_render_batch(combos[c], offsets[c], radii[c], size) for c in chunks])
    for combo in combos:
        _check_combo(*combo)
    centers = (np.array([CENTERS[p] for _, _, p in combos]) + offsets).astype(np.float32)  # [B, 2] = (cx, cy)
    radii = np.asarray(radii, dtype=np.float32)[:, None, None]  # [B, 1, 1]
    rgb = np.array([RGB[c] for c, _, _ in combos], dtype=np.float32) / 255.0  # [B, 3]

    n = size * SUPERSAMPLE
    u = (np.arange(n, dtype=np.float32) + 0.5) / n  # centres of the supersampled pixels, as fractions of the side
    dx = u[None, None, :] - centers[:, 0, None, None]  # [B, 1, n]  horizontal offset from the centre
    dy = u[None, :, None] - centers[:, 1, None, None]  # [B, n, 1]  vertical offset (positive = below)
    inside = np.empty((len(combos), n, n), dtype=bool)  # [B, n, n] supersampled hit mask
    for shape in SHAPES + CONCEPT_SHAPES:
        group = np.array([s == shape for _, s, _ in combos], dtype=bool)  # the images showing this shape
        inside[group] = _inside(shape, dx[group], dy[group], radii[group])

    # anti-aliasing: a pixel's coverage is the mean of its SUPERSAMPLE x SUPERSAMPLE sub-pixel hits
    # (a sum of strided slices; numpy is much slower at reducing the tiny axes of a reshape)
    hits = inside.astype(np.float32)
    coverage = sum(hits[:, i::SUPERSAMPLE, j::SUPERSAMPLE] for i in range(SUPERSAMPLE) for j in range(SUPERSAMPLE))
    coverage = coverage / SUPERSAMPLE**2  # [B, size, size]
    image = coverage[..., None] * rgb[:, None, None, :]  # [B, size, size, 3]
    return np.rint(image * 255.0) / 255.0


def render(
    color: str, shape: str, position: str, size: int = 32, rng: Optional[np.random.Generator] = None
) -> np.ndarray:
    """One filled shape on black: uint8 [size, size, 3].

    rng: np.random.Generator for jitter of centre and size; None gives the canonical, unjittered shape.
    """
    if rng is None:
        offsets, radii = np.zeros((1, 2)), np.array([RADIUS])
    else:
        offsets, radii = _draw_jitter(rng, 1)
    image = _render_batch([(color, shape, position)], offsets, radii, size)[0]
    return np.rint(image * 255.0).astype(np.uint8)


def _to_model_range(images: np.ndarray) -> torch.Tensor:
    """float [B, H, W, 3] in [0, 1] -> float tensor [B, 3, H, W] in [-1, 1] (the model convention)."""
    return torch.from_numpy(rearrange(images * 2.0 - 1.0, "b h w c -> b c h w").copy())


def _as_numpy_rng(rng: Union[np.random.Generator, torch.Generator]) -> np.random.Generator:
    """Training loops may hold a torch.Generator: draw a numpy seed from it (deterministic, advances it)."""
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, torch.Generator):
        return np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=rng)))
    raise ValueError(f"rng must be a numpy Generator or a torch.Generator, got {type(rng).__name__}.")


def _split_combos(split: str) -> tuple:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: use one of {list(SPLITS)}.")
    return SPLITS[split]


def sample_batch(
    batch_size: int,
    rng: Union[np.random.Generator, torch.Generator],
    split: str = "train",
    size: int = 32,
    paraphrase_prob: float = 0.0,
) -> tuple:
    """A fresh random batch for on-the-fly training: (images [B, 3, size, size] in [-1, 1], captions list[str]).

    Combinations are drawn uniformly from the split ("train" = SEEN, "held_out", "all"); every image gets
    its own jitter. rng: np.random.Generator or torch.Generator (advanced by the call).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive number of images, got {batch_size}.")
    combos_of_split = _split_combos(split)
    rng = _as_numpy_rng(rng)
    picks = rng.integers(len(combos_of_split), size=batch_size)
    combos = [combos_of_split[i] for i in picks]
    paraphrase = rng.random(batch_size) < paraphrase_prob
    offsets, radii = _draw_jitter(rng, batch_size)
    images = _render_batch(combos, offsets, radii, size)
    return _to_model_range(images), [caption(*c, paraphrase=bool(p)) for c, p in zip(combos, paraphrase)]


def render_combos(combos: Sequence[tuple], rng: Optional[np.random.Generator], size: int = 32) -> torch.Tensor:
    """Jittered images of the given (color, shape, position) combinations, concept colours allowed:
    float tensor [B, 3, size, size] in [-1, 1] (e.g. the concept images of LoRA fine-tuning).
    rng None: the canonical, unjittered shapes (as `render` draws them)."""
    if rng is None:
        offsets, radii = np.zeros((len(combos), 2)), np.full(len(combos), RADIUS)
    else:
        offsets, radii = _draw_jitter(rng, len(combos))
    return _to_model_range(_render_batch(list(combos), offsets, radii, size))


class ShapesDataset(torch.utils.data.Dataset):
    """Deterministic shapes dataset: item i -> (image float [3, size, size] in [-1, 1], caption str).

    Item i depends only on (seed, i): its combination (uniform over the split), paraphrase coin and jitter
    come from np.random.default_rng((seed, i)), so the same index always gives the same item.
    cache=True renders all `length` items once into one tensor [length, 3, size, size] (fast training).
    """

    def __init__(
        self,
        size: int = 32,
        split: str = "train",
        length: int = 10_000,
        seed: int = 0,
        cache: bool = False,
        paraphrase_prob: float = 0.0,
    ):
        if length < 1:
            raise ValueError(f"length must be a positive number of items, got {length}.")
        self.size, self.split, self.length, self.seed = size, split, length, seed
        self.combos = _split_combos(split)
        self.paraphrase_prob = paraphrase_prob
        self.images = None
        if cache:
            items = [self._draw(i) for i in range(length)]
            self.captions = [caption(*combo, paraphrase=p) for combo, p, _, _ in items]
            self.images = self._render(items)  # [length, 3, size, size]

    def _draw(self, index: int) -> tuple:
        """(combo, paraphrase, offset [2], radius) of item `index`, from its own seeded generator."""
        rng = np.random.default_rng((self.seed, index))
        combo = self.combos[rng.integers(len(self.combos))]
        paraphrase = bool(rng.random() < self.paraphrase_prob)
        offsets, radii = _draw_jitter(rng, 1)
        return combo, paraphrase, offsets[0], radii[0]

    def _render(self, items: list) -> torch.Tensor:
        combos = [combo for combo, _, _, _ in items]
        offsets = np.stack([offset for _, _, offset, _ in items])
        radii = np.array([radius for _, _, _, radius in items])
        return _to_model_range(_render_batch(combos, offsets, radii, self.size))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} is out of range for a dataset of {self.length} items.")
        if self.images is not None:
            return self.images[index], self.captions[index]
        item = self._draw(index)
        return self._render([item])[0], caption(*item[0], paraphrase=item[1])
