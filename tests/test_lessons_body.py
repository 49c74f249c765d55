"""Grader of lesson 15 (body VAE): the library passes, the untouched stubs fail, a learner's own correct
solution passes, and realistic wrong versions of every exercise fail."""
import math

import pytest
import torch

from lessons.grading import ROOT, grade, load_module

LESSON = ROOT / "lessons" / "15_body_vae"
GRADE = load_module(LESSON / "grade.py")
REFERENCE = GRADE.REFERENCE


def passes(**overrides) -> bool:
    """All checks pass with the reference functions, some of them replaced by `overrides`."""
    return all(ok for ok, _ in grade(GRADE.CHECKS, {**REFERENCE, **overrides}).values())


def failed_exercises(**overrides) -> set[str]:
    return {label.split(" #")[0] for label, (ok, _) in grade(GRADE.CHECKS, {**REFERENCE, **overrides}).items()
            if not ok}


# ---------------------------------------------------------------- learner solutions (written from the docstrings)
def _bumps(keypoints, visible, height, width, sigma, two=2.0):
    ys, xs = torch.meshgrid(torch.arange(height, dtype=keypoints.dtype), torch.arange(width, dtype=keypoints.dtype),
                            indexing="ij")
    d2 = (xs - keypoints[..., 0, None, None]) ** 2 + (ys - keypoints[..., 1, None, None]) ** 2  # [..., K, H, W]
    return torch.exp(-d2 / (two * sigma ** 2))


def _normalise(W):
    peak = W.flatten(-2).max(dim=-1).values[..., None, None]
    return torch.where(peak > 0, W / peak.clamp_min(1e-30), torch.ones_like(W))


def learner_weights(keypoints, visible, height, width, sigma):
    w = _bumps(keypoints, visible, height, width, sigma) * visible[..., None, None]
    return _normalise(w.max(dim=-3).values)


def learner_weight_image(image, weights, alpha):
    return image * (alpha + (1 - alpha) * weights[..., None, :, :])


def learner_reparameterize(mu, logvar, eps):
    return mu + (0.5 * logvar).exp() * eps


def learner_kl(mu, logvar):
    logvar = logvar.clamp(-30, 20)
    return 0.5 * (mu ** 2 + logvar.exp() - 1 - logvar).sum(-1)


LEARNER = {"gaussian_keypoint_weights": learner_weights, "weight_image": learner_weight_image,
           "reparameterize": learner_reparameterize, "kl_divergence": learner_kl}


# ---------------------------------------------------------------- realistic wrong versions
def weights_sum_not_max(keypoints, visible, height, width, sigma):
    return _normalise((_bumps(keypoints, visible, height, width, sigma) * visible[..., None, None]).sum(dim=-3))


def weights_ignore_visibility(keypoints, visible, height, width, sigma):
    return _normalise(_bumps(keypoints, visible, height, width, sigma).max(dim=-3).values)


def weights_missing_the_2(keypoints, visible, height, width, sigma):
    w = _bumps(keypoints, visible, height, width, sigma, two=1.0) * visible[..., None, None]
    return _normalise(w.max(dim=-3).values)


def weights_not_normalised(keypoints, visible, height, width, sigma):
    w = (_bumps(keypoints, visible, height, width, sigma) * visible[..., None, None]).max(dim=-3).values
    return torch.where(visible.any(-1)[..., None, None], w, torch.ones_like(w))


def weights_x_and_y_swapped(keypoints, visible, height, width, sigma):
    return learner_weights(keypoints.flip(-1), visible, height, width, sigma)


def weight_image_alpha_on_the_wrong_side(image, weights, alpha):
    return image * ((1 - alpha) + alpha * weights[..., None, :, :])


def weight_image_ignores_alpha(image, weights, alpha):
    return image * weights[..., None, :, :]


def reparameterize_variance_not_std(mu, logvar, eps):
    return mu + logvar.exp() * eps  # exp(logvar) instead of exp(logvar / 2)


def reparameterize_logvar_as_std(mu, logvar, eps):
    return mu + logvar * eps


def reparameterize_detached(mu, logvar, eps):
    return (mu + (0.5 * logvar).exp() * eps).detach()


def kl_sign_flipped(mu, logvar):
    return 0.5 * (1 + logvar - mu ** 2 - logvar.exp()).sum(-1)


def kl_mean_not_sum(mu, logvar):
    return -0.5 * (1 + logvar - mu ** 2 - logvar.exp()).mean(-1)


def kl_std_for_variance(mu, logvar):
    return -0.5 * (1 + logvar - mu ** 2 - (0.5 * logvar).exp()).sum(-1)


def kl_not_clamped(mu, logvar):
    return -0.5 * (1 + logvar - mu ** 2 - logvar.exp()).sum(-1)


WRONG = [
    ("gaussian_keypoint_weights", weights_sum_not_max),
    ("gaussian_keypoint_weights", weights_ignore_visibility),
    ("gaussian_keypoint_weights", weights_missing_the_2),
    ("gaussian_keypoint_weights", weights_not_normalised),
    ("gaussian_keypoint_weights", weights_x_and_y_swapped),
    ("weight_image", weight_image_alpha_on_the_wrong_side),
    ("weight_image", weight_image_ignores_alpha),
    ("reparameterize", reparameterize_variance_not_std),
    ("reparameterize", reparameterize_logvar_as_std),
    ("reparameterize", reparameterize_detached),
    ("kl_divergence", kl_sign_flipped),
    ("kl_divergence", kl_mean_not_sum),
    ("kl_divergence", kl_std_for_variance),
    ("kl_divergence", kl_not_clamped),
]


def test_the_library_and_a_learner_solution_pass():
    assert passes()
    assert passes(**LEARNER)


def test_the_untouched_stubs_fail_every_check():
    stubs = load_module(LESSON / "exercises.py")
    assert not any(ok for ok, _ in grade(GRADE.CHECKS, stubs).values())


@pytest.mark.parametrize("exercise,wrong", WRONG, ids=[w.__name__ for _, w in WRONG])
def test_a_wrong_version_fails_its_own_exercise(exercise, wrong):
    assert failed_exercises(**{exercise: wrong}) == {exercise}


def test_the_hint_names_the_mistake():
    """The check that fails for a classic mistake is the one whose hint talks about it."""
    def failed(exercise, wrong):
        return {label for label, (ok, _) in grade(GRADE.CHECKS, {**REFERENCE, exercise: wrong}).items() if not ok}
    assert "gaussian_keypoint_weights #2" in failed("gaussian_keypoint_weights", weights_sum_not_max)  # max
    assert "gaussian_keypoint_weights #3" in failed("gaussian_keypoint_weights", weights_ignore_visibility)
    assert "gaussian_keypoint_weights #1" in failed("gaussian_keypoint_weights", weights_missing_the_2)
    assert "weight_image #2" in failed("weight_image", weight_image_alpha_on_the_wrong_side)
    assert "reparameterize #2" in failed("reparameterize", reparameterize_variance_not_std)
    assert "kl_divergence #3" in failed("kl_divergence", kl_sign_flipped)


def test_the_by_hand_values_are_right():
    """The grader's hand-computed numbers, checked against torch.distributions."""
    q = torch.distributions.Normal(torch.ones(2), math.exp(0.5) * torch.ones(2))
    p = torch.distributions.Normal(torch.zeros(2), torch.ones(2))
    assert torch.distributions.kl_divergence(q, p).sum().item() == pytest.approx(math.e - 1, rel=1e-6)
