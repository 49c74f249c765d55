"""Procedural people with COCO-17 keypoints and body-shape identities (data for BoLID, Kazachkov & Filatov).

BoLID conditions a diffusion model on a person's *body*: a body VAE reads several views of one person,
each weighted by Gaussians around its 17 COCO keypoints (eqs. 11-13), and learns a latent c_body for the
body shape. Real photos and a YOLO pose model are not available offline, so this file draws the people:

- an **identity** is a ``BodyShape``: height, shoulder and hip width, limb lengths, head size, limb
  thickness and clothing colours, drawn deterministically from ``(seed, i)``;
- a **view** is a ``View``: a named pose ("raising the left arm", ...) given as joint angles, plus a yaw
  (turn about the vertical axis), a scale and a translation;
- ``render_body`` (data/body_render.py) builds a 3-D stick skeleton, turns it by the yaw, projects it orthographically and
  paints limbs as filled capsules (points within a radius of a segment) far-to-near, supersampled for
  smooth edges. The 17 keypoints come from the same skeleton, so they sit on the drawn body.

Conventions
- "left"/"right" are the **person's own** sides (COCO's convention): a person facing the viewer shows
  their left shoulder on the **image's right**.
- Pixel coordinates are (x, y) = (column, row); pixel (row i, column j) covers
  [j - 0.5, j + 0.5] x [i - 0.5, i + 0.5], so its centre is the integer point (x=j, y=i).
- Positive yaw turns the person toward their own left (the nose moves to the image's right), so their
  left side turns away from the viewer and its keypoints are the first to hide.
- A keypoint is visible when (1) it lies inside the image, (2) the frontmost painted part at that point
  is a part the keypoint belongs to (a limb in front hides it), and (3) for keypoints on the head and torso
  surface (nose, eyes, ears, shoulders, hips), that surface faces the viewer: cos(azimuth + yaw) > -0.3.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

COCO_KEYPOINTS = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear",
    "left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
    "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle",
)
# The 19 limbs of the COCO person skeleton (the 1-indexed list from the COCO annotations, minus one).
COCO_SKELETON = (
    (15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7), (6, 8),
    (7, 9), (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6),
)

SHIRTS = ((200, 50, 50), (50, 110, 210), (40, 160, 80), (225, 160, 30), (140, 60, 190), (30, 170, 180))
TROUSERS = ((45, 50, 80), (70, 55, 40), (40, 40, 40), (90, 90, 100))
SKINS = ((241, 200, 170), (214, 160, 120), (170, 115, 80), (110, 75, 55))
SHIRT_NAMES = ("red", "blue", "green", "yellow", "purple", "teal")  # the words for SHIRTS, same order

# Named poses: joint -> (abduction, flexion) in radians. Abduction swings a limb sideways away from the
# body (0 = hanging down, pi/2 = horizontal, pi = straight up); flexion swings it forward (toward the
# direction the person faces). Elbow and knee angles are added to the shoulder / hip angles, so they bend
# the lower segment relative to the upper one. Keys of each pose: {left,right}_{shoulder,elbow,hip,knee}.
_STAND_ARM = {"shoulder": (0.15, 0.0), "elbow": (0.0, 0.15)}
_UP_ARM = {"shoulder": (2.75, 0.0), "elbow": (0.15, 0.0)}
_OUT_ARM = {"shoulder": (math.pi / 2, 0.0), "elbow": (0.0, 0.0)}
_STAND_LEG = {"hip": (0.06, 0.0), "knee": (0.0, 0.0)}


def _pose(left_arm, right_arm, left_leg=_STAND_LEG, right_leg=_STAND_LEG):
    """Joint-angle table of one pose from per-limb dicts."""
    table = {}
    for side, arm, leg in (("left", left_arm, left_leg), ("right", right_arm, right_leg)):
        for joint, angles in {**arm, **leg}.items():
            table[f"{side}_{joint}"] = angles
    return table


POSES = {
    "standing": _pose(_STAND_ARM, _STAND_ARM),
    "raising the left arm": _pose(_UP_ARM, _STAND_ARM),
    "raising the right arm": _pose(_STAND_ARM, _UP_ARM),
    "raising both arms": _pose(_UP_ARM, _UP_ARM),
    "holding both arms out": _pose(_OUT_ARM, _OUT_ARM),
    "walking": _pose({"shoulder": (0.1, -0.45), "elbow": (0.0, 0.3)},
                     {"shoulder": (0.1, 0.45), "elbow": (0.0, 0.3)},
                     {"hip": (0.05, 0.45), "knee": (0.0, -0.15)},
                     {"hip": (0.05, -0.35), "knee": (0.0, -0.45)}),
    "sitting": _pose({"shoulder": (0.1, 0.3), "elbow": (0.0, 0.9)},
                     {"shoulder": (0.1, 0.3), "elbow": (0.0, 0.9)},
                     {"hip": (0.12, math.pi / 2), "knee": (0.0, -math.pi / 2)},
                     {"hip": (0.12, math.pi / 2), "knee": (0.0, -math.pi / 2)}),
}
POSE_NAMES = tuple(POSES)

@dataclass
class BodyShape:
    """One identity. Lengths are in body units; a view's scale maps one unit to ``scale * size`` pixels.

    ``height`` (a property) is the standing height from the soles to the top of the head.
    Colours are RGB 0-255; limb_thickness is the capsule radius of arms and legs.
    """
    shoulder_width: float
    hip_width: float
    torso_length: float   # shoulder line to hip line
    arm_length: float     # shoulder to wrist (upper arm and forearm are half each)
    leg_length: float     # hip to ankle (thigh and shin are half each)
    head_size: float      # head radius
    limb_thickness: float
    shirt: tuple = (200, 50, 50)
    trousers: tuple = (45, 50, 80)
    skin: tuple = (241, 200, 170)

    @property
    def neck_length(self) -> float:
        return 0.35 * self.head_size

    @property
    def height(self) -> float:
        return self.leg_length + self.limb_thickness + self.torso_length + self.neck_length + 2 * self.head_size


# Range of every body measurement (body units); identity() draws each uniformly, MEAN_SHAPE takes the midpoints.
# Torso, arms and legs vary more than real adults do: at 32x32 a torso is only ~7 pixels, and a keypoint
# found to half a pixel moves arm / torso by ~0.1, so proportions must differ by more than that to be
# measurable (leg / torso spans 0.8-2.4 here, arm / torso 0.7-1.9). Raised arms stay in the frame (0 of
# 300 random people raising both arms touch its edge; only the longest arms, legs and torso at once would).
SHAPE_RANGES = {"shoulder_width": (0.13, 0.27), "hip_width": (0.09, 0.19), "torso_length": (0.17, 0.28),
                "arm_length": (0.19, 0.33), "leg_length": (0.22, 0.40), "head_size": (0.055, 0.075),
                "limb_thickness": (0.017, 0.038)}
MEAN_SHAPE = BodyShape(**{k: (lo + hi) / 2 for k, (lo, hi) in SHAPE_RANGES.items()})


def shape_vector(shape: BodyShape) -> np.ndarray:
    """The body measurements of SHAPE_RANGES rescaled to [-1, 1] (-1 = the low end, +1 = the high end):
    float32 [len(SHAPE_RANGES)]; clothes and skin are left out. The body VAE's shape head predicts it."""
    return np.array([(getattr(shape, k) - (lo + hi) / 2) / ((hi - lo) / 2) for k, (lo, hi) in SHAPE_RANGES.items()],
                    dtype=np.float32)


def identity(i: int, seed: int = 0) -> BodyShape:
    """Body shape of identity ``i``: every measurement uniform in its SHAPE_RANGES range and the clothes
    and skin from small palettes, deterministic from (seed, i).

    The ranges are wide (e.g. legs 0.22-0.40, shoulders 0.13-0.27) so identities differ visibly in build.
    """
    if i < 0:
        raise ValueError(f"identity index must be >= 0, got {i}.")
    rng = np.random.default_rng([seed, 1, i])
    sizes = {k: float(rng.uniform(lo, hi)) for k, (lo, hi) in SHAPE_RANGES.items()}
    return BodyShape(**sizes, shirt=SHIRTS[rng.integers(len(SHIRTS))],
                     trousers=TROUSERS[rng.integers(len(TROUSERS))], skin=SKINS[rng.integers(len(SKINS))])


@dataclass
class View:
    """One view of a person: a named pose's joint angles, a yaw, a scale and a translation.

    angles: joint -> (abduction, flexion) radians, keys {left,right}_{shoulder,elbow,hip,knee} (see POSES).
    yaw: radians about the vertical axis; + turns the person toward their own left. The figures have no
    back side, so |yaw| must stay below pi/2.
    scale: pixels per body unit as a fraction of the image side. translation: (dx, dy) as fractions of the side.
    """
    name: str
    angles: dict = field(default_factory=dict)
    yaw: float = 0.0
    scale: float = 0.95
    translation: tuple = (0.0, 0.0)

    @classmethod
    def from_pose(cls, name: str, yaw: float = 0.0, scale: float = 0.95, translation=(0.0, 0.0)) -> "View":
        """The named pose exactly as in the POSES table (no jitter)."""
        check_pose_name(name)
        return cls(name, dict(POSES[name]), yaw, scale, tuple(translation))


def check_pose_name(name: str) -> None:
    if name not in POSES:
        raise ValueError(f"unknown pose {name!r}; use one of {', '.join(POSE_NAMES)}.")


def pose_caption(pose_name: str, build: tuple | list = (), shirt: str | None = None) -> str:
    """Caption of a pose, optionally with the person's build and shirt in words:

        pose_caption("raising the left arm") == "a person raising the left arm"
        pose_caption("standing", ["long arms", "short legs"], "red")
            == "a person with long arms and short legs in a red shirt standing"
    """
    check_pose_name(pose_name)
    words = ["a person"]
    if build:
        words.append("with " + " and ".join(build))
    if shirt:
        words.append(f"in a {shirt} shirt")
    return " ".join(words + [pose_name])


# The measurements the captions put in words: a value in the bottom third of its SHAPE_RANGES range is
# "short", in the top third "long", in the middle third nothing is said.
BUILD_WORDS = (("arm_length", "arms"), ("leg_length", "legs"), ("torso_length", "torso"))


def build_phrases(shape: BodyShape) -> list[str]:
    """The build of a body in words, e.g. ["long arms", "short torso"] (one phrase per BUILD_WORDS measurement
    outside the middle third of its range; [] for an average body)."""
    v = dict(zip(SHAPE_RANGES, shape_vector(shape)))
    return [f"{'short' if v[key] < 0 else 'long'} {noun}" for key, noun in BUILD_WORDS if abs(v[key]) > 1 / 3]


def shirt_name(shape: BodyShape) -> str:
    """The SHIRT_NAMES word of the palette colour nearest to the shape's shirt."""
    distance = [sum((a - b) ** 2 for a, b in zip(shape.shirt, c)) for c in SHIRTS]
    return SHIRT_NAMES[int(np.argmin(distance))]


def random_view(rng: np.random.Generator, name: str | None = None, angle_jitter: float = 0.12,
                max_yaw: float = 1.4) -> View:
    """A named pose (random if ``name`` is None) with jittered joint angles, yaw, scale and translation.

    Angles get N(0, angle_jitter^2) noise; yaw ~ U(-max_yaw, max_yaw); scale ~ U(0.9, 1.0);
    translation ~ U(-0.04, 0.04) per axis.
    """
    name = POSE_NAMES[rng.integers(len(POSE_NAMES))] if name is None else name
    check_pose_name(name)
    angles = {joint: (a + float(rng.normal(0, angle_jitter)), f + float(rng.normal(0, angle_jitter)))
              for joint, (a, f) in POSES[name].items()}
    return View(name, angles, yaw=float(rng.uniform(-max_yaw, max_yaw)), scale=float(rng.uniform(0.9, 1.0)),
                translation=(float(rng.uniform(-0.04, 0.04)), float(rng.uniform(-0.04, 0.04))))
