"""Procedural people with COCO-17 keypoints and body-shape identities (data for BoLID, seed 002).

BoLID conditions a diffusion model on a person's *body*: a body VAE reads several views of one person,
each weighted by Gaussians around its 17 COCO keypoints (eqs. 11-13), and learns a latent c_body for the
body shape. Real photos and a YOLO pose model are not available offline, so this file draws the people:

- an **identity** is a ``BodyShape``: height, shoulder and hip width, limb lengths, head size, limb
  thickness and clothing colours, drawn deterministically from ``(seed, i)``;
- a **view** is a ``View``: a named pose ("raising the left arm", ...) given as joint angles, plus a yaw
  (turn about the vertical axis), a scale and a translation;
- ``render_body`` builds a 3-D stick skeleton, turns it by the yaw, projects it orthographically and
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
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from einops import rearrange, reduce
from torch.utils.data import Dataset

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

BACKGROUND = (236, 233, 226)  # plain background colour (RGB 0-255)
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

# Where the surface keypoints sit around the vertical axis (radians from the front, + toward the person's
# left). A point at azimuth phi faces the viewer when cos(phi + yaw) > FACING_THRESHOLD.
_AZIMUTH = {"nose": 0.0, "left_eye": 0.6, "right_eye": -0.6, "left_ear": math.pi / 2, "right_ear": -math.pi / 2,
            "left_shoulder": 1.0, "right_shoulder": -1.0, "left_hip": 1.0, "right_hip": -1.0}
FACING_THRESHOLD = -0.3
# Head keypoints relative to the head centre, in head radii: (height above the centre, distance from the
# vertical axis); their direction around that axis is the azimuth in _AZIMUTH.
_HEAD_POINTS = {"nose": (-0.1, 0.85), "left_eye": (0.2, 0.75), "right_eye": (0.2, 0.75),
                "left_ear": (0.1, 0.9), "right_ear": (0.1, 0.9)}
# Which painted parts each keypoint belongs to (it is visible only where one of these is frontmost).
_OWNERS = {
    "nose": ("head",), "left_eye": ("head",), "right_eye": ("head",), "left_ear": ("head",), "right_ear": ("head",),
    **{f"{s}_shoulder": ("torso", f"{s}_upper_arm") for s in ("left", "right")},
    **{f"{s}_elbow": (f"{s}_upper_arm", f"{s}_forearm") for s in ("left", "right")},
    **{f"{s}_wrist": (f"{s}_forearm",) for s in ("left", "right")},
    **{f"{s}_hip": ("torso", f"{s}_thigh") for s in ("left", "right")},
    **{f"{s}_knee": (f"{s}_thigh", f"{s}_shin") for s in ("left", "right")},
    **{f"{s}_ankle": (f"{s}_shin",) for s in ("left", "right")},
}


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
        _check_pose_name(name)
        return cls(name, dict(POSES[name]), yaw, scale, tuple(translation))


def _check_pose_name(name: str) -> None:
    if name not in POSES:
        raise ValueError(f"unknown pose {name!r}; use one of {', '.join(POSE_NAMES)}.")


def pose_caption(pose_name: str, build: tuple | list = (), shirt: str | None = None) -> str:
    """Caption of a pose, optionally with the person's build and shirt in words:

        pose_caption("raising the left arm") == "a person raising the left arm"
        pose_caption("standing", ["long arms", "short legs"], "red")
            == "a person with long arms and short legs in a red shirt standing"
    """
    _check_pose_name(pose_name)
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
    _check_pose_name(name)
    angles = {joint: (a + float(rng.normal(0, angle_jitter)), f + float(rng.normal(0, angle_jitter)))
              for joint, (a, f) in POSES[name].items()}
    return View(name, angles, yaw=float(rng.uniform(-max_yaw, max_yaw)), scale=float(rng.uniform(0.9, 1.0)),
                translation=(float(rng.uniform(-0.04, 0.04)), float(rng.uniform(-0.04, 0.04))))


def _direction(side: float, abduction: float, flexion: float) -> np.ndarray:
    """Unit vector of a limb segment in body coordinates (X = person's left, Y = up, Z = forward).

    side = +1 for the left limbs, -1 for the right ones (abduction swings outward on either side).
    """
    return np.array([side * math.sin(abduction) * math.cos(flexion),
                     -math.cos(abduction) * math.cos(flexion),
                     math.sin(flexion)])


def _skeleton(shape: BodyShape, view: View) -> dict:
    """3-D joints of the posed body, origin at the pelvis: name -> array [3] (X left, Y up, Z forward)."""
    joints = {"head": np.array([0.0, shape.torso_length + shape.neck_length + shape.head_size, 0.0]),
              "neck": np.array([0.0, shape.torso_length, 0.0])}
    a = view.angles
    for side_name, side in (("left", 1.0), ("right", -1.0)):
        shoulder = np.array([side * shape.shoulder_width / 2, shape.torso_length, 0.0])
        hip = np.array([side * shape.hip_width / 2, 0.0, 0.0])
        sa, sf = a[f"{side_name}_shoulder"]
        ea, ef = a[f"{side_name}_elbow"]
        ha, hf = a[f"{side_name}_hip"]
        ka, kf = a[f"{side_name}_knee"]
        elbow = shoulder + shape.arm_length / 2 * _direction(side, sa, sf)
        wrist = elbow + shape.arm_length / 2 * _direction(side, sa + ea, sf + ef)
        knee = hip + shape.leg_length / 2 * _direction(side, ha, hf)
        ankle = knee + shape.leg_length / 2 * _direction(side, ha + ka, hf + kf)
        joints.update({f"{side_name}_shoulder": shoulder, f"{side_name}_elbow": elbow,
                       f"{side_name}_wrist": wrist, f"{side_name}_hip": hip,
                       f"{side_name}_knee": knee, f"{side_name}_ankle": ankle})
    r = shape.head_size
    for name, (up, radius) in _HEAD_POINTS.items():
        phi = _AZIMUTH[name]
        joints[name] = joints["head"] + r * np.array([radius * math.sin(phi), up, radius * math.cos(phi)])
    return joints


def _project(joints: dict, shape: BodyShape, view: View, size: int) -> tuple[dict, dict, float]:
    """Turn by the yaw, project orthographically, fit into the image.

    Returns (name -> pixel (x, y), name -> depth toward the viewer, pixels per body unit).
    Yaw about the vertical axis: X' = X cos(yaw) + Z sin(yaw), depth Z' = -X sin(yaw) + Z cos(yaw);
    image x = cx + s X', image y = cy - s Y (rows grow downward). The figure's bounding box is centred,
    then shifted by the view's translation.
    """
    cos_y, sin_y = math.cos(view.yaw), math.sin(view.yaw)
    turned = {k: (X * cos_y + Z * sin_y, Y, -X * sin_y + Z * cos_y) for k, (X, Y, Z) in joints.items()}
    s = view.scale * size
    xs = np.array([p[0] for p in turned.values()])
    ys = np.array([p[1] for p in turned.values()])
    head_x, head_y, r, pad = turned["head"][0], turned["head"][1], shape.head_size, shape.limb_thickness
    x_mid = (min(xs.min() - pad, head_x - r) + max(xs.max() + pad, head_x + r)) / 2
    y_mid = (min(ys.min() - pad, head_y - r) + max(ys.max() + pad, head_y + r)) / 2
    cx = (size - 1) / 2 + view.translation[0] * size
    cy = (size - 1) / 2 + view.translation[1] * size
    pixels = {k: np.array([cx + s * (p[0] - x_mid), cy - s * (p[1] - y_mid)]) for k, p in turned.items()}
    depth = {k: p[2] for k, p in turned.items()}
    return pixels, depth, s


def _capsule_mask(px, py, a, b, radius):
    """Boolean mask of grid points within ``radius`` of segment a-b (a filled capsule).

    px [1, S], py [S, 1] sample coordinates; a, b [2] endpoints. Distance to a segment: project onto the
    line, t = clip(((p - a) . (b - a)) / |b - a|^2, 0, 1), closest point a + t (b - a).
    """
    abx, aby = b[0] - a[0], b[1] - a[1]
    t = np.clip(((px - a[0]) * abx + (py - a[1]) * aby) / max(abx * abx + aby * aby, 1e-12), 0.0, 1.0)
    dx = px - a[0] - t * abx
    dy = py - a[1] - t * aby
    return dx * dx + dy * dy <= radius * radius


def _polygon_mask(px, py, corners):
    """Boolean mask of grid points inside a convex polygon (corners in order, either orientation).

    A point is inside when the cross products (c_{k+1} - c_k) x (p - c_k) all share one sign.
    """
    crosses = []
    for k in range(len(corners)):
        a, b = corners[k], corners[(k + 1) % len(corners)]
        crosses.append((b[0] - a[0]) * (py - a[1]) - (b[1] - a[1]) * (px - a[0]))
    crosses = np.stack(np.broadcast_arrays(*crosses))
    return np.all(crosses >= 0, axis=0) | np.all(crosses <= 0, axis=0)


@dataclass
class _Part:
    """One painted body part: a union of capsules (a, b, radius) and optionally a filled convex polygon,
    all in pixel coordinates, with a colour and a depth (larger = nearer the viewer)."""
    name: str
    capsules: list
    colour: tuple
    depth: float
    polygon: list = field(default_factory=list)

    def slices(self, size: int, supersample: int) -> tuple[slice, slice]:
        """Rows and columns of the fine grid that can be covered (only those are tested: faster)."""
        points = np.array([p for a, b, _ in self.capsules for p in (a, b)] + self.polygon)
        pad = max(r for _, _, r in self.capsules)
        lo = np.floor((points.min(0) - pad + 0.5) * supersample - 0.5).astype(int)
        hi = np.ceil((points.max(0) + pad + 0.5) * supersample - 0.5).astype(int) + 1
        n = size * supersample
        return slice(max(0, lo[1]), min(n, hi[1])), slice(max(0, lo[0]), min(n, hi[0]))

    def mask(self, px: np.ndarray, py: np.ndarray) -> np.ndarray:
        """Boolean coverage of the sample points px [1, w], py [h, 1] -> [h, w]."""
        inside = _polygon_mask(px, py, self.polygon) if self.polygon else np.zeros((py.size, px.size), bool)
        for a, b, r in self.capsules:
            inside |= _capsule_mask(px, py, a, b, r)
        return inside


def _parts(shape: BodyShape, pts: dict, depth: dict, s: float) -> list:
    """The body as paintable parts (torso, neck, 8 limb segments, head), from projected joints."""
    limb_r, head_r = s * shape.limb_thickness, s * shape.head_size
    corners = [pts["left_shoulder"], pts["right_shoulder"], pts["right_hip"], pts["left_hip"]]
    # torso: the shoulder-hip quadrilateral plus capsules along its edges (rounded, never zero-width)
    parts = [_Part("torso", [(corners[k], corners[(k + 1) % 4], limb_r) for k in range(4)], shape.shirt, 0.0, corners),
             _Part("neck", [(pts["neck"], pts["head"], 0.45 * head_r)], shape.skin, 0.0)]
    sleeve = tuple(0.85 * c for c in shape.shirt)
    for side in ("left", "right"):
        for part, j0, j1, colour, radius in (("thigh", "hip", "knee", shape.trousers, 1.15 * limb_r),
                                             ("shin", "knee", "ankle", shape.trousers, limb_r),
                                             ("upper_arm", "shoulder", "elbow", sleeve, limb_r),
                                             ("forearm", "elbow", "wrist", shape.skin, 0.9 * limb_r)):
            a, b = f"{side}_{j0}", f"{side}_{j1}"
            parts.append(_Part(f"{side}_{part}", [(pts[a], pts[b], radius)], colour, (depth[a] + depth[b]) / 2))
    parts.append(_Part("head", [(pts["head"], pts["head"], head_r)], shape.skin, 0.0))
    return parts


def render_body(shape: BodyShape, view: View, size: int = 64, supersample: int = 4):
    """Draw one person.

    Returns (image uint8 [size, size, 3], keypoints float32 [17, 2] pixel (x, y) in COCO order,
    visible bool [17]). Parts are painted far-to-near (painter's algorithm on depth) on a
    ``supersample``-times finer grid, which is averaged down for smooth edges.
    """
    if size < 8 or supersample < 1:
        raise ValueError(f"size must be >= 8 and supersample >= 1, got size={size}, supersample={supersample}.")
    if abs(view.yaw) >= math.pi / 2:
        raise ValueError(f"yaw must be in (-pi/2, pi/2) (the figures have no back side), got {view.yaw:.3f}.")
    pts, depth, s = _project(_skeleton(shape, view), shape, view, size)
    parts = _parts(shape, pts, depth, s)
    part_index = {p.name: k for k, p in enumerate(parts)}

    n = size * supersample
    grid = (np.arange(n) + 0.5) / supersample - 0.5  # fine sample positions in pixel coordinates
    canvas = np.empty((n, n, 3))
    canvas[:] = BACKGROUND
    label = np.full((n, n), -1)  # index of the frontmost part at each fine sample (-1 = background)
    for k in sorted(range(len(parts)), key=lambda k: (parts[k].depth, k)):  # far first; ties keep list order
        rows, cols = parts[k].slices(size, supersample)
        mask = parts[k].mask(grid[cols][None, :], grid[rows][:, None])
        canvas[rows, cols][mask] = parts[k].colour
        label[rows, cols][mask] = k

    facing = {name: math.cos(phi + view.yaw) > FACING_THRESHOLD for name, phi in _AZIMUTH.items()}
    rows, cols = parts[part_index["head"]].slices(size, supersample)
    for eye in ("left_eye", "right_eye"):  # dark dots on the face make the facing direction readable
        if facing[eye]:
            eye_r = 0.16 * s * shape.head_size
            dot = _capsule_mask(grid[cols][None, :], grid[rows][:, None], pts[eye], pts[eye], eye_r)
            canvas[rows, cols][dot & (label[rows, cols] == part_index["head"])] = (40, 30, 30)

    keypoints = np.stack([pts[name] for name in COCO_KEYPOINTS]).astype(np.float32)
    visible = np.zeros(len(COCO_KEYPOINTS), dtype=bool)
    for i, name in enumerate(COCO_KEYPOINTS):
        x, y = keypoints[i]
        if not (0 <= x <= size - 1 and 0 <= y <= size - 1) or not facing.get(name, True):
            continue
        col, row = (int(round((v + 0.5) * supersample - 0.5)) for v in (x, y))  # nearest fine sample
        visible[i] = label[row, col] in {part_index[p] for p in _OWNERS[name]}

    image = reduce(canvas, "(h s1) (w s2) c -> h w c", "mean", s1=supersample, s2=supersample)
    return np.clip(np.round(image), 0, 255).astype(np.uint8), keypoints, visible


def pose_keypoints(view: View, size: int = 64) -> np.ndarray:
    """The view's pose retargeted to MEAN_SHAPE: float32 [17, 2] pixel (x, y) in COCO order.

    Same joint angles, yaw, scale and translation, but average limb lengths and widths, so these
    keypoints say where the limbs point and not how long they are (an identity-free pose; the body
    VAE's decoder reads them, so body proportions have to come from its latent).
    """
    pts, _, _ = _project(_skeleton(MEAN_SHAPE, view), MEAN_SHAPE, view, size)
    return np.stack([pts[name] for name in COCO_KEYPOINTS]).astype(np.float32)


def _to_model_image(image: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> float [3, H, W] in [-1, 1]."""
    return torch.from_numpy(rearrange(image, "h w c -> c h w").astype(np.float32) / 127.5 - 1.0)


class BodiesDataset(Dataset):
    """``num_identities`` people x ``views_per_identity`` random views each, deterministic from ``seed``.

    Item ``k`` is view ``k % views_per_identity`` of identity ``k // views_per_identity``:
    dict(image float [3, H, W] in [-1, 1], keypoints float [17, 2] pixel (x, y), visible bool [17],
    pose_keypoints float [17, 2] (the same view on MEAN_SHAPE, see pose_keypoints), identity int, caption str).
    """

    def __init__(self, num_identities: int, views_per_identity: int, size: int = 64, seed: int = 0):
        if num_identities < 1 or views_per_identity < 1:
            raise ValueError(f"need at least one identity and one view, got {num_identities} and {views_per_identity}.")
        self.num_identities, self.views_per_identity = num_identities, views_per_identity
        self.size, self.seed = size, seed
        self.shapes = [identity(i, seed) for i in range(num_identities)]

    def __len__(self) -> int:
        return self.num_identities * self.views_per_identity

    def view(self, identity_index: int, view_index: int) -> View:
        """The fixed random view number ``view_index`` of an identity."""
        return random_view(np.random.default_rng([self.seed, 2, identity_index, view_index]))

    def _item(self, identity_index: int, view: View) -> dict:
        image, keypoints, visible = render_body(self.shapes[identity_index], view, self.size)
        return dict(image=_to_model_image(image), keypoints=torch.from_numpy(keypoints),
                    visible=torch.from_numpy(visible),
                    pose_keypoints=torch.from_numpy(pose_keypoints(view, self.size)),
                    identity=identity_index, caption=pose_caption(view.name))

    def __getitem__(self, k: int) -> dict:
        if not 0 <= k < len(self):
            raise IndexError(f"index {k} out of range for {len(self)} items.")
        i, v = divmod(k, self.views_per_identity)
        return self._item(i, self.view(i, v))

    def sample_views(self, identity_index: int, n: int, rng: np.random.Generator) -> dict:
        """``n`` fresh random views of one identity (for training the body VAE on sets of views).

        Returns dict(image [n, 3, H, W], keypoints [n, 17, 2], visible [n, 17], pose_keypoints [n, 17, 2],
        identity int, caption list[str]).
        """
        if not 0 <= identity_index < self.num_identities:
            raise ValueError(f"identity must be in 0..{self.num_identities - 1}, got {identity_index}.")
        items = [self._item(identity_index, random_view(rng)) for _ in range(n)]
        stacked = {k: torch.stack([it[k] for it in items]) for k in ("image", "keypoints", "visible", "pose_keypoints")}
        return dict(**stacked, identity=identity_index, caption=[it["caption"] for it in items])


def plot_identity(shape: BodyShape, n_views: int, path, size: int = 64, seed: int = 0, columns: int = 6) -> None:
    """Save a PNG grid of one identity in ``n_views`` random views with visible keypoints and skeleton.

    Keypoints: the person's left side in orange, right side in blue, face centre in white.
    """
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    rng = np.random.default_rng(seed)
    columns = min(columns, n_views)
    rows = math.ceil(n_views / columns)
    fig = Figure(figsize=(1.8 * columns, 2.0 * rows))
    axes = fig.subplots(rows, columns, squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= n_views:
            continue
        view = random_view(rng)
        image, kp, vis = render_body(shape, view, size)
        ax.imshow(image, interpolation="nearest")
        for a, b in COCO_SKELETON:
            if vis[a] and vis[b]:
                ax.plot([kp[a, 0], kp[b, 0]], [kp[a, 1], kp[b, 1]], color="black", linewidth=0.8)
        colours = ["white" if not n.startswith(("left", "right")) else
                   ("tab:orange" if n.startswith("left") else "tab:blue") for n in COCO_KEYPOINTS]
        for i in np.flatnonzero(vis):
            ax.scatter(kp[i, 0], kp[i, 1], s=7, color=colours[i], edgecolors="black", linewidths=0.3, zorder=3)
        ax.set_title(f"{view.name}\nyaw {math.degrees(view.yaw):+.0f}°", fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ---------------------------------------------------------------------------------------------------------
# Reading a body back from its keypoints: limb-length ratios and arm states (the checker, like shapes.describe)
# ---------------------------------------------------------------------------------------------------------
LIMB_RATIOS = ("arm / torso", "leg / torso")
ARM_STATES = ("down", "out", "up")
# arm states each pose's caption asks for, (left arm, right arm); poses whose legs differ share arm states
POSE_ARMS = {"standing": ("down", "down"), "walking": ("down", "down"), "sitting": ("down", "down"),
             "raising the left arm": ("up", "down"), "raising the right arm": ("down", "up"),
             "raising both arms": ("up", "up"), "holding both arms out": ("out", "out")}


def true_limb_ratios(shape: BodyShape) -> np.ndarray:
    """The identity's LIMB_RATIOS from its measurements: [arm_length / torso_length, leg_length / torso_length]."""
    return np.array([shape.arm_length / shape.torso_length, shape.leg_length / shape.torso_length])


def _segment_sum(kp: np.ndarray, vis: np.ndarray, chain: list[str]) -> float:
    """Length of a keypoint chain (e.g. shoulder-elbow-wrist) in pixels, NaN when a keypoint is hidden."""
    idx = [COCO_KEYPOINTS.index(n) for n in chain]
    if not vis[idx].all():
        return math.nan
    return float(sum(np.linalg.norm(kp[a] - kp[b]) for a, b in zip(idx, idx[1:])))


def _torso(kp: np.ndarray, vis: np.ndarray) -> float:
    """Mean shoulder-to-hip distance over the sides showing both (pixels), NaN if neither side does."""
    sides = [_segment_sum(kp, vis, [f"{s}_shoulder", f"{s}_hip"]) for s in ("left", "right")]
    return math.nan if all(math.isnan(v) for v in sides) else float(np.nanmean(sides))


def limb_ratios(keypoints: np.ndarray, visible: np.ndarray) -> np.ndarray:
    """LIMB_RATIOS measured on one image's keypoints [17, 2] (visible [17] bool) -> [2], NaN where unmeasurable.

    arm = |shoulder - elbow| + |elbow - wrist|, leg = |hip - knee| + |knee - ankle| (mean of the sides that
    show all three keypoints), torso = |shoulder - hip| (mean of the sides). Ratios do not depend on the
    view's scale; arms and legs that point toward the viewer look shorter (foreshortening), so compare
    poses whose limbs stay near the image plane.
    """
    kp, vis = np.asarray(keypoints, dtype=np.float64), np.asarray(visible, dtype=bool)
    torso = _torso(kp, vis)
    out = []
    for chain in (("shoulder", "elbow", "wrist"), ("hip", "knee", "ankle")):
        sides = [_segment_sum(kp, vis, [f"{s}_{j}" for j in chain]) for s in ("left", "right")]
        limb = math.nan if all(math.isnan(v) for v in sides) else float(np.nanmean(sides))
        out.append(limb / torso if torso > 0 else math.nan)
    return np.array(out)


def arm_states(keypoints: np.ndarray, visible: np.ndarray) -> tuple:
    """(left, right) arm state from keypoints: "up", "out", "down", or None when the arm or torso is hidden.

    Height of the wrist above its shoulder in torso lengths, dy = (y_shoulder - y_wrist) / torso
    (rows grow downward): up when dy > 0.5, down when dy < -0.5, out in between. Only heights are used,
    so a yaw (which shortens horizontal distances) does not change the answer.
    """
    kp, vis = np.asarray(keypoints, dtype=np.float64), np.asarray(visible, dtype=bool)
    torso = _torso(kp, vis)
    states = []
    for side in ("left", "right"):
        s, w = COCO_KEYPOINTS.index(f"{side}_shoulder"), COCO_KEYPOINTS.index(f"{side}_wrist")
        if math.isnan(torso) or not (vis[s] and vis[w]):
            states.append(None)
            continue
        dy = (kp[s, 1] - kp[w, 1]) / torso
        states.append("up" if dy > 0.5 else "down" if dy < -0.5 else "out")
    return tuple(states)


def pose_holds(pose_name: str, keypoints: np.ndarray, visible: np.ndarray) -> bool:
    """True when the arms read from the keypoints match the pose's POSE_ARMS on every arm that can be read
    (and at least one can)."""
    _check_pose_name(pose_name)
    seen = [(got, want) for got, want in zip(arm_states(keypoints, visible), POSE_ARMS[pose_name]) if got is not None]
    return bool(seen) and all(got == want for got, want in seen)
