"""Tests for minildm/data/shapes.py: vocabulary, held-out split, captions, rendering, dataset, describe()."""
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from minildm.data.describe import attribute_accuracy, describe, prompt_accuracy
from minildm.data.shapes import (_render_batch, ALL_COMBOS, caption, CENTER_JITTER, COLORS, HELD_OUT, parse_caption,
                                 POSITIONS, RADIUS, RADIUS_RANGE, render, render_combos, sample_batch, SEEN, SHAPES,
                                 ShapesDataset, VOCAB_WORDS)


def to_unit(images):
    """[-1, 1] model range -> [0, 1] public range."""
    return (images + 1) / 2


def blur(images):
    """Slight blur: 3x3 binomial kernel on [N, 3, H, W]."""
    k = torch.tensor([1.0, 2.0, 1.0]) / 4
    kernel = (k[:, None] * k[None, :]).expand(3, 1, 3, 3)
    return F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)


def add_noise(images, std, seed):
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
    return (images + std * noise).clamp(0, 1)


# ---------------------------------------------------------------------------------------------------------
# Vocabulary and splits
# ---------------------------------------------------------------------------------------------------------
def test_vocabulary_is_the_fixed_one():
    assert COLORS == {
        "red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 90, 230),
        "yellow": (230, 210, 40), "purple": (150, 60, 200), "cyan": (40, 200, 210),
    }
    assert SHAPES == ("circle", "square", "triangle")
    assert POSITIONS == {
        "left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73), "center": (0.5, 0.5)
    }
    assert len(ALL_COMBOS) == 90 == len(set(ALL_COMBOS))
    assert set(ALL_COMBOS) == set(itertools.product(COLORS, SHAPES, POSITIONS))
    assert ALL_COMBOS[0] == ("red", "circle", "left") and ALL_COMBOS[-1] == ("cyan", "triangle", "center")


def test_held_out_follows_the_documented_rule():
    colors, positions = list(COLORS), list(POSITIONS)
    expected = [(colors[k % 6], SHAPES[(k + k // 6) % 3], positions[(2 * k + 1) % 5]) for k in range(10)]
    assert list(HELD_OUT) == expected
    assert HELD_OUT[0] == ("red", "circle", "right") and HELD_OUT[9] == ("yellow", "square", "center")


def test_held_out_is_disjoint_and_every_attribute_and_pair_is_seen():
    assert len(HELD_OUT) == 10 == len(set(HELD_OUT))
    assert len(SEEN) == 80
    assert not set(HELD_OUT) & set(SEEN)
    assert set(HELD_OUT) | set(SEEN) == set(ALL_COMBOS)
    for i, vocabulary in enumerate((COLORS, SHAPES, POSITIONS)):
        assert {combo[i] for combo in SEEN} == set(vocabulary)
    # stronger: every pair of attributes of a held-out combo still occurs together in training
    for (i, j) in ((0, 1), (0, 2), (1, 2)):
        seen_pairs = {(combo[i], combo[j]) for combo in SEEN}
        assert all((combo[i], combo[j]) in seen_pairs for combo in HELD_OUT)


# ---------------------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------------------
def test_caption_reference_strings():
    assert caption("red", "circle", "left") == "a red circle on the left"
    assert caption("blue", "square", "center") == "a blue square in the center"
    assert caption("cyan", "triangle", "top", paraphrase=True) == "a triangle that is cyan, on the top"
    assert caption("green", "circle", "center", paraphrase=True) == "a circle that is green, in the center"


def test_captions_parse_back_and_use_only_vocab_words():
    words = set()
    for combo in ALL_COMBOS:
        for paraphrase in (False, True):
            text = caption(*combo, paraphrase=paraphrase)
            assert parse_caption(text) == combo
            words |= set(text.replace(",", " , ").split())
    assert words == set(VOCAB_WORDS)
    assert parse_caption("  A Red   CIRCLE on the LEFT ") == ("red", "circle", "left")
    assert parse_caption("a square that is blue ,in the center") == ("blue", "square", "center")


@pytest.mark.parametrize(
    "text", ["", "a pink circle on the left", "a red circle on the center", "a red circle", "red circle on the left"]
)
def test_parse_caption_rejects_other_text(text):
    with pytest.raises(ValueError):
        parse_caption(text)


def test_bad_inputs_raise_value_error():
    with pytest.raises(ValueError):
        caption("pink", "circle", "left")
    with pytest.raises(ValueError):
        render("red", "hexagon", "left")
    with pytest.raises(ValueError):
        ShapesDataset(split="test")
    with pytest.raises(ValueError):
        sample_batch(4, np.random.default_rng(0), split="validation")
    with pytest.raises(ValueError):
        describe(torch.zeros(1, 32, 32))


# ---------------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape, area", [("circle", math.pi), ("square", math.pi), ("triangle", 2.0)])
def test_render_area_colour_and_orientation(shape, area):
    """Canonical render at 64x64: the summed coverage is the shape's area (x r^2), interior pixels are the
    exact palette colour, and a triangle has most of its mass in its lower half (it points up)."""
    size = 64
    image = render("purple", shape, "center", size=size)
    assert image.dtype == np.uint8 and image.shape == (size, size, 3)
    coverage = image.max(axis=-1) / 200.0  # purple's largest channel is 200
    assert coverage.sum() == pytest.approx(area * (RADIUS * size) ** 2, rel=0.02)  # 4x supersampling: ~1% error
    assert tuple(image[size // 2, size // 2]) == COLORS["purple"]
    upper, lower = coverage[: size // 2].sum(), coverage[size // 2 :].sum()
    if shape == "triangle":
        assert lower > 2.5 * upper  # area below the box centre: 3/4 of the triangle
    else:
        assert lower == pytest.approx(upper, rel=0.02)


def test_render_canonical_is_deterministic_and_jitter_moves_the_shape():
    a, b = render("red", "square", "left"), render("red", "square", "left")
    assert np.array_equal(a, b)
    jittered = [render("red", "square", "left", rng=np.random.default_rng(seed)) for seed in range(3)]
    assert not np.array_equal(jittered[0], jittered[1])
    assert np.array_equal(jittered[2], render("red", "square", "left", rng=np.random.default_rng(2)))


def test_render_combos_without_rng_draws_the_canonical_shapes():
    """rng None: every combination exactly as `render` draws it without jitter (up to render's uint8 rounding)."""
    combos = [("red", "square", "left"), ("blue", "circle", "center"), ("green", "triangle", "top")]
    batch = render_combos(combos, rng=None)
    for image, combo in zip(batch, combos):
        canonical = torch.from_numpy(render(*combo)).permute(2, 0, 1).float() / 127.5 - 1
        torch.testing.assert_close(image, canonical, atol=1 / 127.5, rtol=0)
    assert not torch.equal(batch[0], render_combos(combos[:1], np.random.default_rng(0))[0])


def test_render_stays_in_bounds_even_with_the_largest_jitter():
    """No foreground on the border: the worst case (largest shape pushed towards the edge) and 500 random ones."""
    combos, offsets = [], []
    for shape in SHAPES:
        for position in POSITIONS:
            for dx, dy in itertools.product((-CENTER_JITTER, CENTER_JITTER), repeat=2):
                combos.append(("yellow", shape, position))
                offsets.append((dx, dy))
    worst = _render_batch(combos, np.array(offsets), np.full(len(combos), RADIUS_RANGE[1]), size=32)
    random_images, _ = sample_batch(500, np.random.default_rng(0), split="all")
    for images in (torch.from_numpy(worst), to_unit(random_images).permute(0, 2, 3, 1)):  # [N, H, W, 3]
        border = torch.cat([images[:, 0], images[:, -1], images[:, :, 0], images[:, :, -1]], dim=1)
        assert border.abs().max() == 0


def test_sample_batch_shapes_range_and_determinism():
    images, captions = sample_batch(16, np.random.default_rng(3), size=32)
    assert images.shape == (16, 3, 32, 32) and images.dtype == torch.float32 and len(captions) == 16
    assert images.min() == -1 and images.max() <= 1
    again, captions_again = sample_batch(16, np.random.default_rng(3), size=32)
    assert torch.equal(images, again) and captions == captions_again
    from_torch = sample_batch(8, torch.Generator().manual_seed(5))
    assert torch.equal(from_torch[0], sample_batch(8, torch.Generator().manual_seed(5))[0])


def test_train_split_never_yields_a_held_out_combo():
    _, captions = sample_batch(1000, np.random.default_rng(0), split="train")
    combos = {parse_caption(text) for text in captions}
    assert combos == set(SEEN)  # all 80 seen combos show up, no held-out one
    dataset = ShapesDataset(split="train", length=100, seed=1, paraphrase_prob=0.5)
    assert not {parse_caption(dataset[i][1]) for i in range(len(dataset))} & set(HELD_OUT)
    _, held_captions = sample_batch(200, np.random.default_rng(0), split="held_out")
    assert {parse_caption(text) for text in held_captions} == set(HELD_OUT)


# ---------------------------------------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------------------------------------
def test_dataset_is_deterministic_and_cache_matches_on_the_fly():
    lazy = ShapesDataset(size=32, split="all", length=40, seed=7, paraphrase_prob=0.3)
    cached = ShapesDataset(size=32, split="all", length=40, seed=7, paraphrase_prob=0.3, cache=True)
    for i in range(len(lazy)):
        image, text = lazy[i]
        assert image.shape == (3, 32, 32) and -1 <= image.min() and image.max() <= 1
        assert torch.equal(image, lazy[i][0]) and text == lazy[i][1]  # same index, same item
        assert torch.equal(image, cached[i][0]) and text == cached[i][1]  # cache == on the fly
        assert describe(to_unit(image)) == parse_caption(text)
    assert len({lazy[i][0].numpy().tobytes() for i in range(len(lazy))}) == len(lazy)  # items differ
    shorter = ShapesDataset(size=32, split="all", length=10, seed=7, paraphrase_prob=0.3)
    assert all(torch.equal(shorter[i][0], lazy[i][0]) for i in range(10))  # item i depends on (seed, i) only
    other_seed = ShapesDataset(size=32, split="all", length=40, seed=8)
    assert not all(torch.equal(lazy[i][0], other_seed[i][0]) for i in range(10))
    assert any("that is" in lazy[i][1] for i in range(len(lazy)))  # paraphrases appear with p = 0.3
    with pytest.raises(IndexError):
        lazy[40]


# ---------------------------------------------------------------------------------------------------------
# describe / accuracy
# ---------------------------------------------------------------------------------------------------------
def test_describe_is_right_on_1000_fresh_shapes_at_32():
    images, captions = sample_batch(1000, np.random.default_rng(123), split="all", size=32)
    assert prompt_accuracy(to_unit(images), captions) >= 0.99


def test_describe_is_right_at_64_and_on_uint8_arrays():
    images, captions = sample_batch(200, np.random.default_rng(7), split="all", size=64)
    assert prompt_accuracy(to_unit(images), captions) >= 0.99
    rng = np.random.default_rng(0)
    for combo in ALL_COMBOS:
        assert describe(render(*combo, size=32, rng=rng)) == combo


@pytest.mark.parametrize("noise_std, blurred", [(0.05, False), (0.0, True), (0.05, True), (0.1, True)])
def test_describe_is_robust_to_noise_and_blur(noise_std, blurred):
    """Generated images are noisy and soft; std 0.1 + blur is harsher than a decent sampler's output."""
    images, captions = sample_batch(250, np.random.default_rng(11), split="all", size=32)
    images = to_unit(images)
    if blurred:
        images = blur(images)
    images = add_noise(images, std=noise_std, seed=0)
    assert prompt_accuracy(images, captions) >= 0.99


def test_describe_no_foreground_and_ignores_specks():
    assert describe(torch.zeros(3, 32, 32)) == (None, None, None)
    assert describe(add_noise(torch.zeros(3, 32, 32), std=0.03, seed=1)) == (None, None, None)
    image = torch.from_numpy(render("green", "triangle", "right")).permute(2, 0, 1) / 255.0
    image[:, 3:5, 3:5] = 1.0  # two white 2x2 specks away from the shape
    image[:, 27:29, 5:7] = 1.0
    assert describe(image) == ("green", "triangle", "right")


def test_attribute_accuracy_scores_each_attribute():
    """Images of known combos against prompts with exactly one attribute swapped."""
    images, captions = sample_batch(30, np.random.default_rng(2), split="all")
    images = to_unit(images)
    combos = [parse_caption(text) for text in captions]
    swap = {"red": "blue", "green": "red", "blue": "green", "yellow": "cyan", "purple": "yellow", "cyan": "purple"}
    wrong_color = [caption(swap[c], s, p) for c, s, p in combos]
    assert attribute_accuracy(images, wrong_color) == {"color": 0.0, "shape": 1.0, "position": 1.0, "all": 0.0}
    wrong_shape = [caption(c, SHAPES[(SHAPES.index(s) + 1) % 3], p, paraphrase=True) for c, s, p in combos]
    assert attribute_accuracy(images, wrong_shape) == {"color": 1.0, "shape": 0.0, "position": 1.0, "all": 0.0}
    half_right = captions[:15] + [caption(c, s, "center" if p != "center" else "left") for c, s, p in combos[15:]]
    assert attribute_accuracy(images, half_right)["position"] == pytest.approx(0.5)
    assert prompt_accuracy(images, half_right) == pytest.approx(0.5)


def test_partial_captions_keep_colour_and_shape_or_position_or_nothing():
    from minildm.data.shapes import caption, partial_captions

    assert partial_captions("red", "circle", "left") == ["a red circle", "on the left", ""]
    assert partial_captions("cyan", "triangle", "center") == ["a cyan triangle", "in the center", ""]
    for combo in ALL_COMBOS:  # the three cuts together hold exactly the words of the caption
        words = " ".join(partial_captions(*combo)).split()
        assert sorted(words) == sorted(caption(*combo).split())
    with pytest.raises(ValueError):
        partial_captions("mauve", "circle", "left")  # not a colour of the data
