"""Two objects in one picture: scenes, their captions, held-out pairings, and a judge that reads both back.

A scene is two objects, each a colour and a shape from the shapes vocabulary (6 colours x 3 shapes = 18
objects), in one of two layouts: left/right or top/bottom. The two objects always differ in colour AND in
shape, so every binding error can be named:

    "a red circle on the left and a blue square on the right"      (phrase order: first position first)
    "a blue square on the right and a red circle on the left"      (the same scene, phrases swapped)
    "a green triangle on the top and a cyan circle on the bottom"  (top/bottom layout)

Held-out pairings (`HELD_OUT_PAIRS`): 12 unordered pairs of objects that never share a picture in training.
Every object of a held-out pair appears in training with other partners, in every position. A model that
draws "a red square on the left and a blue circle on the right" when training only ever showed the red
square next to other objects has bound each colour to its own shape from the words alone.

The judge `describe_scene` reads each object back with the single-shape checker (`describe.describe`) run on
the image masked to one connected blob; `score_scene` names the error: right, colours swapped, one colour
on both, an object missing, shapes swapped, or other.

Geometry: the objects sit at the single-shape positions (left/right at x = 0.27 / 0.73, top/bottom at
y = 0.27 / 0.73) with the same size and jitter, so at most 0.47 and from 0.53 on: they never touch.
"""
from __future__ import annotations

import re
from itertools import combinations, permutations
from typing import Sequence, Union

import numpy as np
import torch

from minildm.data import describe as checker
from minildm.data import shapes

COLORS, SHAPES = tuple(shapes.COLORS), shapes.SHAPES
OBJECTS = tuple((c, s) for c in COLORS for s in SHAPES)  # the 18 (colour, shape) objects
LAYOUTS = (("left", "right"), ("top", "bottom"))


def _held_out_pairs() -> tuple:
    """12 unordered object pairs, by the rule: for k = 0..11 pair object (colour k mod 6, shape k mod 3)
    with (colour (k + 1 + k // 6) mod 6, shape (k + 1) mod 3). Both objects always differ in colour and in
    shape; every object is in at most three held-out pairs and keeps at least 7 of its 10 partners in training.
    """
    pairs = []
    for k in range(12):
        a = (COLORS[k % 6], SHAPES[k % 3])
        b = (COLORS[(k + 1 + k // 6) % 6], SHAPES[(k + 1) % 3])
        pairs.append(tuple(sorted((a, b))))
    return tuple(pairs)


HELD_OUT_PAIRS = _held_out_pairs()
ALL_PAIRS = tuple(tuple(sorted(p)) for p in combinations(OBJECTS, 2) if p[0][0] != p[1][0] and p[0][1] != p[1][1])
SEEN_PAIRS = tuple(p for p in ALL_PAIRS if p not in HELD_OUT_PAIRS)  # 90 - 12 = 78


def scenes_of(pairs: Sequence[tuple]) -> tuple:
    """Every scene of the given pairs: (object at the first position, object at the second, layout index);
    4 per pair (2 layouts x which object comes first)."""
    return tuple((a, b, lay) for pair in pairs for a, b in permutations(pair) for lay in range(len(LAYOUTS)))


SPLITS = {"train": scenes_of(SEEN_PAIRS), "held_out": scenes_of(HELD_OUT_PAIRS), "all": scenes_of(ALL_PAIRS)}


def _check_scene(scene: tuple) -> None:
    (c1, s1), (c2, s2), layout = scene
    if (c1, s1) not in OBJECTS or (c2, s2) not in OBJECTS or layout not in (0, 1) or c1 == c2 or s1 == s2:
        raise ValueError(f"not a scene: {scene!r}; want ((colour, shape), (colour, shape), layout 0 or 1) with "
                         f"two different colours of {list(COLORS)}, two different shapes of {list(SHAPES)}.")


def caption(scene: tuple, swap: bool = False) -> str:
    """caption((("red", "circle"), ("blue", "square"), 0)) -> "a red circle on the left and a blue square on
    the right"; swap=True names the second position first."""
    _check_scene(scene)
    (c1, s1), (c2, s2), layout = scene
    p1, p2 = LAYOUTS[layout]
    phrases = [f"a {c1} {s1} on the {p1}", f"a {c2} {s2} on the {p2}"]
    return " and ".join(phrases[::-1] if swap else phrases)


_PHRASE = re.compile(r"^a ([a-z]+) ([a-z]+) on the ([a-z]+)$")


def parse_caption(text: str) -> dict:
    """Inverse of `caption` for both phrase orders: -> {position: (colour, shape)} with two entries."""
    phrases = [p.strip() for p in " ".join(text.lower().split()).split(" and ")]
    found = [_PHRASE.match(p) for p in phrases]
    want = {m.group(3): (m.group(1), m.group(2)) for m in found if m}
    layout = [i for i, lay in enumerate(LAYOUTS) if set(lay) == set(want)]
    if len(phrases) != 2 or not all(found) or not layout:
        raise ValueError(f"cannot parse scene caption {text!r}: expected 'a <colour> <shape> on the <position> "
                         f"and a <colour> <shape> on the <position>' with positions left/right or top/bottom.")
    first, second = LAYOUTS[layout[0]]
    _check_scene((want[first], want[second], layout[0]))
    return want


def render_scenes(scenes: Sequence[tuple], rng: np.random.Generator | None = None, size: int = 32) -> torch.Tensor:
    """Images of scenes, [B, 3, size, size] in [-1, 1]; each object jittered on its own (rng None: no jitter).

    The two objects are drawn as two single-shape images and combined by the pixelwise max (they never
    overlap, so this is exactly one picture with both)."""
    for scene in scenes:
        _check_scene(scene)
    combos = [(c, s, LAYOUTS[lay][i]) for (o1, o2, lay) in scenes for i, (c, s) in enumerate((o1, o2))]  # 2B
    if rng is None:
        offsets, radii = np.zeros((len(combos), 2)), np.full(len(combos), shapes.RADIUS)
    else:
        offsets, radii = shapes._draw_jitter(rng, len(combos))
    images = shapes._render_batch(combos, offsets, radii, size)  # [2B, size, size, 3] in [0, 1]
    images = np.maximum(images[0::2], images[1::2])
    return shapes._to_model_range(images)


def sample_scenes(n: int, rng: np.random.Generator, split: str = "train") -> list:
    """n scenes drawn uniformly from a split ("train", "held_out", "all")."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: use one of {list(SPLITS)}.")
    pool = SPLITS[split]
    return [pool[i] for i in rng.integers(len(pool), size=n)]


def training_set(n: int, seed: int = 0, size: int = 32) -> tuple[torch.Tensor, list[list[str]]]:
    """n jittered training scenes (no held-out pair), [n, 3, size, size] in [-1, 1], with both captions of
    each (the two phrase orders; the trainer draws one per step)."""
    rng = np.random.default_rng(seed)
    scenes = sample_scenes(n, rng)
    return render_scenes(scenes, rng, size), [[caption(s), caption(s, swap=True)] for s in scenes]


# ----------------------------------------------------------------------------------------------------------
# The judge
# ----------------------------------------------------------------------------------------------------------
MIN_OBJECT_PIXELS = 6  # a blob smaller than this is a speck, not an object


def _blobs(mask: np.ndarray) -> list[np.ndarray]:
    """The 8-connected groups of True pixels of mask [H, W], largest first, as bool masks."""
    left = mask.copy()
    out = []
    while left.any():
        blob = checker._largest_blob(left)
        grown = blob
        while True:  # grow through diagonal neighbours too (a thin soft edge can be diagonal only)
            nxt = checker._dilate(grown) & left
            if nxt.sum() == grown.sum():
                break
            grown = nxt
        out.append(grown)
        left = left & ~grown
    return sorted(out, key=lambda b: -b.sum())


def describe_scene(image: Union[torch.Tensor, np.ndarray]) -> dict:
    """Read the objects of a scene back: {position: (colour, shape)}, at most two entries.

    image: float tensor [3, H, W] in [0, 1] or uint8 array [H, W, 3]. Foreground = pixels brighter than a
    third of the brightest object's level (blurred as in `describe.describe`); the two largest blobs of at
    least MIN_OBJECT_PIXELS are objects; each is read by `describe.describe` on the image masked to the blob
    grown by two pixels (its soft edge). Two objects read at the same position keep the larger.
    """
    rgb = checker._as_hwc_float(image)
    brightness = checker._smooth(rgb.max(axis=-1))
    peak = float(np.partition(brightness.ravel(), int(0.99 * brightness.size))[int(0.99 * brightness.size)])
    if peak < checker.MIN_PEAK:
        return {}
    found = {}
    for blob in _blobs(brightness >= peak / 3)[:2]:
        if blob.sum() < MIN_OBJECT_PIXELS:
            break
        keep = checker._dilate(checker._dilate(blob))
        color, shape, position = checker.describe((rgb * keep[..., None] * 255).round().astype(np.uint8))
        if color is not None and position not in found:
            found[position] = (color, shape)
    return found


VERDICTS = ("right", "colours swapped", "one colour on both", "object missing", "shapes swapped", "other")


def score_scene(wanted: dict, seen: dict) -> str:
    """Name the outcome of one sample: wanted, seen = {position: (colour, shape)} (parse_caption, describe_scene).

    right: both objects right at their positions. object missing: fewer than two objects at the prompt's
    positions. colours swapped: each shape right, each colour the other object's. one colour on both: both
    objects in one of the prompt's colours. shapes swapped: each colour right, each shape the other's.
    other: anything else (a wrong colour or shape from outside the prompt, a single error).
    """
    (pa, (ca, sa)), (pb, (cb, sb)) = sorted(wanted.items())
    if pa not in seen or pb not in seen:
        return "object missing"
    (fca, fsa), (fcb, fsb) = seen[pa], seen[pb]
    if (fca, fsa, fcb, fsb) == (ca, sa, cb, sb):
        return "right"
    if (fsa, fsb) == (sa, sb) and (fca, fcb) == (cb, ca):
        return "colours swapped"
    if fca == fcb and fca in (ca, cb):
        return "one colour on both"
    if (fca, fcb) == (ca, cb) and (fsa, fsb) == (sb, sa):
        return "shapes swapped"
    return "other"


def binding_report(images: torch.Tensor, prompts: Sequence[str]) -> dict:
    """Fractions of each verdict over a batch: images [N, 3, H, W] in [0, 1], N prompts -> {verdict: fraction},
    plus "binding errors" = colours swapped + one colour on both + shapes swapped (attributes on the wrong
    object) and "n"."""
    if len(images) != len(prompts) or not prompts:
        raise ValueError(f"need one prompt per image and at least one, got {len(images)} images, {len(prompts)} prompts.")
    counts = dict.fromkeys(VERDICTS, 0)
    for image, prompt in zip(images, prompts):
        counts[score_scene(parse_caption(prompt), describe_scene(image))] += 1
    report = {k: v / len(prompts) for k, v in counts.items()}
    report["binding errors"] = report["colours swapped"] + report["one colour on both"] + report["shapes swapped"]
    report["n"] = len(prompts)
    return report
