"""Reading a body back from its keypoints: limb-length ratios and arm states, the checker of generated
people (as data/describe.py is of shapes). The keypoints are the renderer's or the keypoint regressor's.
"""
import math

import numpy as np

from minildm.data.bodies import COCO_KEYPOINTS, BodyShape, check_pose_name


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
    check_pose_name(pose_name)
    seen = [(got, want) for got, want in zip(arm_states(keypoints, visible), POSE_ARMS[pose_name]) if got is not None]
    return bool(seen) and all(got == want for got, want in seen)
