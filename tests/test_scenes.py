"""Scenes of two objects: splits, captions, rendering, and the judge that reads both objects back."""
from collections import Counter

import numpy as np
import pytest
import torch

from minildm.data import scenes, shapes
from minildm.evaluate import format_scenes_report, scene_prompts

RED_CIRCLE, BLUE_SQUARE = ("red", "circle"), ("blue", "square")


def test_splits_hold_out_pairings_whose_objects_are_seen_elsewhere():
    assert len(scenes.ALL_PAIRS) == 90 and len(scenes.HELD_OUT_PAIRS) == 12 and len(scenes.SEEN_PAIRS) == 78
    assert not set(scenes.HELD_OUT_PAIRS) & set(scenes.SEEN_PAIRS)
    seen_objects = Counter(o for pair in scenes.SEEN_PAIRS for o in pair)
    assert all(seen_objects[o] >= 7 for o in scenes.OBJECTS)  # every object keeps most of its 10 partners
    train = {frozenset((a, b)) for a, b, _ in scenes.SPLITS["train"]}
    assert not train & {frozenset(p) for p in scenes.HELD_OUT_PAIRS}
    assert len(scenes.SPLITS["held_out"]) == 48 and len(scene_prompts("held_out")) == 48
    assert len(set(scene_prompts("seen"))) == 78


def test_captions_parse_back_in_both_phrase_orders():
    scene = (RED_CIRCLE, BLUE_SQUARE, 0)
    assert scenes.caption(scene) == "a red circle on the left and a blue square on the right"
    assert scenes.caption(scene, swap=True) == "a blue square on the right and a red circle on the left"
    want = {"left": RED_CIRCLE, "right": BLUE_SQUARE}
    assert scenes.parse_caption(scenes.caption(scene)) == scenes.parse_caption(scenes.caption(scene, True)) == want
    for bad in ("a red circle on the left", "a red circle on the left and a blue square on the top",
                "a red circle on the left and a red square on the right"):
        with pytest.raises(ValueError):
            scenes.parse_caption(bad)
    with pytest.raises(ValueError, match="two different colours"):
        scenes.caption((RED_CIRCLE, ("red", "square"), 0))


def test_rendering_is_the_two_single_shapes_and_repeatable():
    scene = (RED_CIRCLE, BLUE_SQUARE, 1)
    x = scenes.render_scenes([scene])
    assert x.shape == (1, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    top, bottom = x[0, :, :16], x[0, :, 16:]
    assert top[0].max() > 0.5 and top[2].max() < -0.5  # red on top, no blue there
    assert bottom[2].max() > 0.5 and bottom[0].max() < -0.5
    a = scenes.render_scenes([scene] * 3, np.random.default_rng(5))
    b = scenes.render_scenes([scene] * 3, np.random.default_rng(5))
    assert torch.equal(a, b) and not torch.equal(a[0], a[1])  # jittered, seeded


def test_judge_reads_at_least_99_percent_of_fresh_renders():
    rng = np.random.default_rng(123)
    picked = scenes.sample_scenes(400, rng, "all")
    images = (scenes.render_scenes(picked, rng) + 1) / 2
    report = scenes.binding_report(images, [scenes.caption(s, swap=i % 2 == 1) for i, s in enumerate(picked)])
    assert report["right"] >= 0.99


def draw(left=None, right=None) -> torch.Tensor:
    """A picture of the given (colour, shape) objects on the left and right, any combination: [3, 32, 32] in [0, 1]."""
    parts = [shapes.render(*obj, pos).astype(np.float32) for obj, pos in ((left, "left"), (right, "right")) if obj]
    return torch.from_numpy(np.maximum.reduce(parts + [np.zeros((32, 32, 3), np.float32)]) / 255).permute(2, 0, 1)


@pytest.mark.parametrize("drawn, verdict", [
    ((RED_CIRCLE, BLUE_SQUARE), "right"),
    ((("blue", "circle"), ("red", "square")), "colours swapped"),
    ((RED_CIRCLE, ("red", "square")), "one colour on both"),
    ((("red", "square"), ("blue", "circle")), "shapes swapped"),
    ((RED_CIRCLE, None), "object missing"),
    ((BLUE_SQUARE, RED_CIRCLE), "other"),  # each object at the other's place: a position error
    ((RED_CIRCLE, ("green", "square")), "other"),  # a colour from outside the prompt
])
def test_each_binding_error_is_named(drawn, verdict):
    want = {"left": RED_CIRCLE, "right": BLUE_SQUARE}
    assert scenes.score_scene(want, scenes.describe_scene(draw(*drawn))) == verdict


def test_judge_reads_single_objects_and_empty_images():
    assert scenes.describe_scene(draw(RED_CIRCLE)) == {"left": RED_CIRCLE}
    assert scenes.describe_scene(torch.zeros(3, 32, 32)) == {}


def test_report_table_lists_every_outcome():
    x = (scenes.render_scenes([(RED_CIRCLE, BLUE_SQUARE, 0)]) + 1) / 2
    r = scenes.binding_report(x, ["a red circle on the left and a blue square on the right"])
    assert r["right"] == 1 and r["binding errors"] == 0 and r["n"] == 1
    table = format_scenes_report({"run": {"seen": r, "held_out": r}})
    assert "colours swapped" in table and "**both objects right** | 1.000" in table
