"""Lesson 18's grader fails realistic wrong versions of score_scene, excite_loss and swap_maps
(tests/test_lessons_graders.py: the library's versions pass, the untouched stubs fail)."""
import pytest

from lesson_helpers import assert_two_wrong_versions_each, failed
from minildm.diffusion.attend_excite import gaussian_smooth

LESSON = "18_binding"


def score_ignoring_positions(wanted, seen):
    """Compares the objects as a set: a picture with both objects at each other's place counts as right."""
    if len(seen) < 2:
        return "object missing"
    if sorted(seen.values()) == sorted(wanted.values()):
        return "right"
    return "other"


def score_missing_by_count(wanted, seen):
    """'object missing' only when fewer than two objects were read, wherever they are."""
    (pa, (ca, sa)), (pb, (cb, sb)) = sorted(wanted.items())
    if len(seen) < 2:
        return "object missing"
    (fca, fsa), (fcb, fsb) = seen.get(pa, ("?", "?")), seen.get(pb, ("?", "?"))
    if (fca, fsa, fcb, fsb) == (ca, sa, cb, sb):
        return "right"
    if (fsa, fsb) == (sa, sb) and (fca, fcb) == (cb, ca):
        return "colours swapped"
    if fca == fcb and fca in (ca, cb):
        return "one colour on both"
    if (fca, fcb) == (ca, cb) and (fsa, fsb) == (sb, sa):
        return "shapes swapped"
    return "other"


def score_swaps_by_colour_alone(wanted, seen):
    """Colours swapped whenever the colours are, whatever the shapes; any shared colour is 'one colour on both'."""
    (pa, (ca, sa)), (pb, (cb, sb)) = sorted(wanted.items())
    if pa not in seen or pb not in seen:
        return "object missing"
    (fca, fsa), (fcb, fsb) = seen[pa], seen[pb]
    if (fca, fsa, fcb, fsb) == (ca, sa, cb, sb):
        return "right"
    if (fca, fcb) == (cb, ca):
        return "colours swapped"
    if fca == fcb:
        return "one colour on both"
    if (fsa, fsb) == (sb, sa):
        return "shapes swapped"
    return "other"


def excite_strongest_token(maps, sigma=0.5):
    """min over tokens: excites the token that is already attended most."""
    return (1 - gaussian_smooth(maps, sigma).flatten(2).amax(-1)).amin(-1)


def excite_mean_attention(maps, sigma=0.5):
    """The mean of each map instead of its peak (every token's mean is about 1 / h w)."""
    return (1 - gaussian_smooth(maps, sigma).flatten(2).mean(-1)).amax(-1)


def excite_unsmoothed(maps, sigma=0.5):
    """The peak of the raw map: one noisy pixel can satisfy the loss."""
    return (1 - maps.flatten(2).amax(-1)).amax(-1)


def swap_both_halves(probs, n):
    """Also overwrites the unconditional maps of the edits (they read the empty prompt)."""
    out = probs.clone()
    out[n:2 * n] = probs[:n]
    if len(probs) == 4 * n:
        out[3 * n:] = probs[2 * n:3 * n]
    return out


def swap_backwards(probs, n):
    """The source takes the edit's maps: the source image changes, the edit does not."""
    cond = 0 if len(probs) == 2 * n else 2 * n
    out = probs.clone()
    out[cond:cond + n] = probs[cond + n:cond + 2 * n]
    return out


def swap_in_place(probs, n):
    cond = 0 if len(probs) == 2 * n else 2 * n
    probs[cond + n:cond + 2 * n] = probs[cond:cond + n]
    return probs


def swap_ignoring_guidance(probs, n):
    """Always edits rows n..2n: under guidance those are the unconditional edits."""
    out = probs.clone()
    out[n:2 * n] = probs[:n]
    return out


WRONG = [
    (LESSON, "score_scene", score_ignoring_positions),
    (LESSON, "score_scene", score_missing_by_count),
    (LESSON, "score_scene", score_swaps_by_colour_alone),
    (LESSON, "excite_loss", excite_strongest_token),
    (LESSON, "excite_loss", excite_mean_attention),
    (LESSON, "excite_loss", excite_unsmoothed),
    (LESSON, "swap_maps", swap_both_halves),
    (LESSON, "swap_maps", swap_backwards),
    (LESSON, "swap_maps", swap_in_place),
    (LESSON, "swap_maps", swap_ignoring_guidance),
]


def test_every_exercise_has_two_wrong_versions():
    assert_two_wrong_versions_each(WRONG, [LESSON])


@pytest.mark.parametrize("lesson, exercise, fn", WRONG, ids=[fn.__name__ for _, _, fn in WRONG])
def test_grader_fails_wrong_version(lesson, exercise, fn):
    assert failed(lesson, only=exercise, **{exercise: fn})


def test_a_named_error_fails_on_the_check_that_names_it():
    assert "score_scene #2" in failed(LESSON, only="score_scene", score_scene=score_ignoring_positions)
    assert "score_scene #3" in failed(LESSON, only="score_scene", score_scene=score_swaps_by_colour_alone)
    assert failed(LESSON, only="excite_loss", excite_loss=excite_strongest_token) >= {"excite_loss #2"}
    assert "swap_maps #1" in failed(LESSON, only="swap_maps", swap_maps=swap_in_place)
