"""Procedural bodies: determinism, COCO order and sides, keypoints on the drawn body, yaw visibility, captions."""
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from minildm.data.bodies import (build_phrases, COCO_KEYPOINTS, COCO_SKELETON, identity, MEAN_SHAPE, pose_caption,
                                 POSE_NAMES, random_view, SHAPE_RANGES, shirt_name, SHIRTS, View)
from minildm.data.body_measure import arm_states, limb_ratios, pose_holds, true_limb_ratios
from minildm.data.body_render import BACKGROUND, BodiesDataset, plot_identity, pose_keypoints, render_body

K = {name: i for i, name in enumerate(COCO_KEYPOINTS)}


def foreground(image):
    """[H, W] bool: pixels that differ from the plain background."""
    return np.any(image != np.array(BACKGROUND, dtype=np.uint8), axis=-1)


def test_coco_tables():
    assert len(COCO_KEYPOINTS) == 17 and len(set(COCO_KEYPOINTS)) == 17
    assert COCO_KEYPOINTS[0] == "nose" and COCO_KEYPOINTS[5:7] == ("left_shoulder", "right_shoulder")
    assert COCO_KEYPOINTS[-2:] == ("left_ankle", "right_ankle")
    assert len(COCO_SKELETON) == 19 and len(set(COCO_SKELETON)) == 19
    named = {frozenset((COCO_KEYPOINTS[a], COCO_KEYPOINTS[b])) for a, b in COCO_SKELETON}
    for limb in [("left_shoulder", "left_elbow"), ("left_elbow", "left_wrist"), ("left_hip", "left_knee"),
                 ("left_knee", "left_ankle"), ("right_ear", "right_shoulder"), ("nose", "left_eye"),
                 ("left_shoulder", "right_shoulder"), ("left_hip", "right_hip")]:
        assert frozenset(limb) in named


def test_identities_are_deterministic_and_differ():
    assert identity(3, seed=1) == identity(3, seed=1)
    assert identity(3, seed=1) != identity(3, seed=2)
    heights = [identity(i).height for i in range(20)]
    shoulders = [identity(i).shoulder_width for i in range(20)]
    assert max(heights) - min(heights) > 0.08 and max(shoulders) - min(shoulders) > 0.05


def test_render_is_deterministic_and_seeded():
    a = BodiesDataset(3, 4, size=32, seed=5)
    b = BodiesDataset(3, 4, size=32, seed=5)
    c = BodiesDataset(3, 4, size=32, seed=6)
    for k in (0, 7):
        assert torch.equal(a[k]["image"], b[k]["image"]) and torch.equal(a[k]["keypoints"], b[k]["keypoints"])
        assert a[k]["caption"] == b[k]["caption"]
    assert not torch.equal(a[7]["image"], c[7]["image"])


def test_dataset_item_format():
    data = BodiesDataset(2, 3, size=32, seed=0)
    assert len(data) == 6
    item = data[4]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert -1.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert item["keypoints"].shape == (17, 2) and item["visible"].shape == (17,) and item["visible"].dtype == torch.bool
    assert item["identity"] == 1 and item["caption"].startswith("a person ")
    views = data.sample_views(1, 5, np.random.default_rng(0))
    assert views["image"].shape == (5, 3, 32, 32) and views["keypoints"].shape == (5, 17, 2)
    assert views["visible"].shape == (5, 17) and len(views["caption"]) == 5
    assert views["pose_keypoints"].shape == (5, 17, 2)


def test_pose_keypoints_are_the_view_on_the_mean_body():
    view = random_view(np.random.default_rng(3))
    _, kp_mean, _ = render_body(MEAN_SHAPE, view, size=48)
    assert np.allclose(pose_keypoints(view, 48), kp_mean)
    _, kp_person, _ = render_body(identity(0), view, size=48)
    assert not np.allclose(pose_keypoints(view, 48), kp_person, atol=0.5)  # the person's own lengths differ


def test_visible_keypoints_lie_on_the_body():
    rng = np.random.default_rng(0)
    for i in range(24):
        image, kp, vis = render_body(identity(i), random_view(rng), size=48)
        fg = foreground(image)
        assert vis.sum() >= 5
        for x, y in kp[vis]:
            col, row = int(round(x)), int(round(y))
            assert fg[max(0, row - 1):row + 2, max(0, col - 1):col + 2].any(), (i, x, y)


def test_front_view_sides_and_visibility():
    """Facing the viewer, the person's left appears on the image's right; everything is visible."""
    image, kp, vis = render_body(identity(0), View.from_pose("standing"), size=64)
    assert vis.all()
    for part in ("shoulder", "elbow", "wrist", "hip", "knee", "ankle", "eye", "ear"):
        assert kp[K[f"left_{part}"], 0] > kp[K[f"right_{part}"], 0], part
    rows = [kp[K[name], 1] for name in ("nose", "left_shoulder", "left_hip", "left_knee", "left_ankle")]
    assert rows == sorted(rows)  # head to feet, top to bottom
    assert foreground(image)[int(round(kp[K["left_shoulder"], 1])), int(round(kp[K["left_shoulder"], 0]))]


def test_large_yaw_hides_the_far_eye_and_ear():
    shape = identity(1)
    _, kp, vis = render_body(shape, View.from_pose("standing", yaw=1.35), size=64)  # turned to their left
    assert not vis[K["left_eye"]] and not vis[K["left_ear"]]
    assert vis[K["right_eye"]] and vis[K["right_ear"]] and vis[K["nose"]]
    _, kp_r, vis_r = render_body(shape, View.from_pose("standing", yaw=-1.35), size=64)
    assert not vis_r[K["right_eye"]] and not vis_r[K["right_ear"]] and vis_r[K["left_eye"]]
    _, kp0, _ = render_body(shape, View.from_pose("standing"), size=64)
    width = lambda k: abs(k[K["left_shoulder"], 0] - k[K["right_shoulder"], 0])  # noqa: E731
    assert width(kp) == pytest.approx(width(kp0) * math.cos(1.35), rel=1e-4)  # yaw narrows the body


def test_keypoints_outside_the_image_are_invisible():
    _, kp, vis = render_body(identity(2), View.from_pose("standing", translation=(0.0, -0.6)), size=32)
    outside = (kp[:, 1] < 0) | (kp[:, 1] > 31)
    assert outside.any() and not vis[outside].any()


def test_captions_match_poses():
    assert pose_caption("raising the left arm") == "a person raising the left arm"
    with pytest.raises(ValueError):
        pose_caption("dancing")
    shape = identity(4)
    kp = {name: render_body(shape, View.from_pose(name), size=64)[1] for name in POSE_NAMES}
    y = lambda name, joint: kp[name][K[joint], 1]  # noqa: E731  (rows grow downward)
    x = lambda name, joint: kp[name][K[joint], 0]  # noqa: E731
    above_head = lambda name, side: y(name, f"{side}_wrist") < y(name, "nose")  # noqa: E731
    assert not above_head("standing", "left") and not above_head("standing", "right")
    assert above_head("raising the left arm", "left") and not above_head("raising the left arm", "right")
    assert above_head("raising the right arm", "right") and not above_head("raising the right arm", "left")
    assert above_head("raising both arms", "left") and above_head("raising both arms", "right")
    out = "holding both arms out"
    assert abs(y(out, "left_wrist") - y(out, "left_shoulder")) < 2
    assert x(out, "left_wrist") > x(out, "left_elbow") > x(out, "left_shoulder")
    # sitting: thighs point at the viewer, so knees project close to the hips (foreshortening)
    thigh = lambda name: abs(y(name, "left_knee") - y(name, "left_hip"))  # noqa: E731
    assert thigh("sitting") < 0.3 * thigh("standing")
    # walking, seen from the side: the feet are apart
    _, side, _ = render_body(shape, View.from_pose("walking", yaw=math.pi / 2 - 0.2), size=64)
    assert abs(side[K["left_ankle"], 0] - side[K["right_ankle"], 0]) > 6


def test_captions_say_build_and_shirt():
    assert pose_caption("standing", ["long arms", "short legs"], "red") == \
        "a person with long arms and short legs in a red shirt standing"
    assert pose_caption("sitting", [], "teal") == "a person in a teal shirt sitting"
    assert build_phrases(MEAN_SHAPE) == []                                     # average: nothing to say
    at = lambda key, f: SHAPE_RANGES[key][0] + f * (SHAPE_RANGES[key][1] - SHAPE_RANGES[key][0])  # noqa: E731
    # thirds of each range: bottom -> short, middle -> nothing, top -> long
    body = replace(MEAN_SHAPE, arm_length=at("arm_length", 0.3), leg_length=at("leg_length", 0.7),
                   torso_length=at("torso_length", 0.5))
    assert build_phrases(body) == ["short arms", "long legs"]
    body = replace(body, torso_length=at("torso_length", 0.1), arm_length=at("arm_length", 0.5))
    assert build_phrases(body) == ["long legs", "short torso"]
    assert [shirt_name(replace(MEAN_SHAPE, shirt=c)) for c in SHIRTS] == ["red", "blue", "green", "yellow", "purple",
                                                                           "teal"]
    assert shirt_name(replace(MEAN_SHAPE, shirt=(210, 40, 60))) == "red"      # any colour: the nearest word


def test_plot_identity_writes_png(tmp_path):
    path = tmp_path / "identity.png"
    plot_identity(identity(0), 4, path, size=32)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_limb_ratios_read_the_body_back_from_its_keypoints():
    shape = identity(7)
    _, kp, vis = render_body(shape, View.from_pose("standing"), 64)
    # standing, facing the viewer: limbs hang nearly in the image plane, so 2-D lengths give the true ratios
    assert np.allclose(limb_ratios(kp, vis), true_limb_ratios(shape), atol=0.06)
    assert true_limb_ratios(shape).tolist() == [shape.arm_length / shape.torso_length,
                                                shape.leg_length / shape.torso_length]
    hidden = vis.copy()
    hidden[[K["left_wrist"], K["right_wrist"]]] = False
    ratios = limb_ratios(kp, hidden)
    assert math.isnan(ratios[0]) and not math.isnan(ratios[1])  # no full arm visible: that ratio is unknown
    # scale-free: the same view at another scale reads the same ratios
    _, kp2, vis2 = render_body(shape, View.from_pose("standing", scale=0.7), 64)
    assert np.allclose(limb_ratios(kp2, vis2), limb_ratios(kp, vis), atol=0.05)


@pytest.mark.parametrize("pose,arms", [("standing", ("down", "down")), ("raising the left arm", ("up", "down")),
                                       ("raising the right arm", ("down", "up")), ("raising both arms", ("up", "up")),
                                       ("holding both arms out", ("out", "out"))])
def test_arm_states_and_pose_holds(pose, arms):
    for yaw in (-0.8, 0.0, 0.8):  # only heights are used: a yaw does not change the reading
        _, kp, vis = render_body(identity(2), View.from_pose(pose, yaw=yaw), 32)
        got = arm_states(kp, vis)
        assert all(g in (a, None) for g, a in zip(got, arms)) and any(g is not None for g in got)
        assert pose_holds(pose, kp, vis)
    _, kp, vis = render_body(identity(2), View.from_pose("raising the left arm"), 32)
    assert not pose_holds("raising the right arm", kp, vis)
    assert not pose_holds("standing", kp, np.zeros(17, dtype=bool))  # nothing readable: not held
