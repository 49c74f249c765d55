"""Drawing the people of data/bodies.py: a 3-D stick skeleton turned by the view's yaw, projected
orthographically and painted as filled capsules far-to-near (supersampled for smooth edges), with the 17
COCO keypoints and their visibility from the same skeleton; and the dataset of rendered views.

Visibility: a keypoint is visible when it lies inside the image, the frontmost painted part at that point is
one it belongs to, and (head and torso surface points) that surface faces the viewer (data/bodies.py).
"""
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from einops import rearrange, reduce
from torch.utils.data import Dataset

from minildm.data.bodies import (COCO_KEYPOINTS, COCO_SKELETON, MEAN_SHAPE, BodyShape, View, identity, pose_caption,
                                 random_view)


BACKGROUND = (236, 233, 226)  # plain background colour (RGB 0-255)
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


VIEW_KEYS = ("image", "keypoints", "visible", "pose_keypoints")
REFERENCE_VIEWS = 4  # views of an identity rendered for sample.py --body-id and the stage's previews


def render_identities(data: BodiesDataset) -> dict:
    """Every view of a BodiesDataset rendered once, grouped by identity: {"image" [I, V, 3, H, W],
    "keypoints" [I, V, K, 2], "visible" [I, V, K], "pose_keypoints" [I, V, K, 2]} (I identities, V views each)."""
    items = [data[k] for k in range(len(data))]
    return {key: rearrange(torch.stack([it[key] for it in items]), "(i v) ... -> i v ...", v=data.views_per_identity)
            for key in VIEW_KEYS}


def identity_views(index: int, n: int = REFERENCE_VIEWS, size: int = 32, seed: int = 0) -> dict:
    """Identity `index` (of the stage's seed) in n fixed random views: {image [n, 3, H, W] in [-1, 1],
    keypoints [n, 17, 2], visible [n, 17]}. Indices past the training identities are people never seen."""
    if index < 0:
        raise ValueError(f"--body-id must be a non-negative identity number, got {index}.")
    rng = np.random.default_rng([seed, 3, index])
    shape = identity(index, seed)
    rendered = [render_body(shape, random_view(rng), size) for _ in range(n)]
    image = torch.from_numpy(np.stack([r[0] for r in rendered])).float() / 127.5 - 1
    return {"image": rearrange(image, "n h w c -> n c h w"),
            "keypoints": torch.from_numpy(np.stack([r[1] for r in rendered])),
            "visible": torch.from_numpy(np.stack([r[2] for r in rendered]))}
