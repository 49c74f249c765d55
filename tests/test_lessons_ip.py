"""Graders of lessons 04 (clip_loss) and 14 (decoupled_cross_attention): a learner's own correct solution
passes and every realistic wrong version fails (tests/test_lessons_graders.py: references pass, stubs fail)."""
import math

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from lesson_helpers import failed
from minildm.clip import clip_loss

CLIP, IP = "04_clip", "14_ip_adapter"


# ----------------------------------------------------------------------------------------------------------
# Lesson 04: clip_loss
# ----------------------------------------------------------------------------------------------------------
def _logits(image_emb, text_emb, scale):
    return scale * F.normalize(image_emb, dim=-1) @ F.normalize(text_emb, dim=-1).T


def learner_clip_loss(image_emb, text_emb, logit_scale):
    """Written from the docstring with log_softmax instead of cross_entropy."""
    logits = _logits(image_emb, text_emb, torch.as_tensor(logit_scale).exp())
    return -(logits.log_softmax(dim=1).diagonal().mean() + logits.log_softmax(dim=0).diagonal().mean()) / 2


def one_direction(image_emb, text_emb, logit_scale):
    logits = _logits(image_emb, text_emb, torch.as_tensor(logit_scale).exp())
    return F.cross_entropy(logits, torch.arange(len(logits)))


def no_temperature(image_emb, text_emb, logit_scale):
    logits = _logits(image_emb, text_emb, 1.0)
    targets = torch.arange(len(logits))
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def scale_not_exponentiated(image_emb, text_emb, logit_scale):
    logits = _logits(image_emb, text_emb, torch.as_tensor(logit_scale))
    targets = torch.arange(len(logits))
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def wrong_axis(image_emb, text_emb, logit_scale):
    """Both terms take the softmax over the same axis (dim 0) of the logits."""
    logits = _logits(image_emb, text_emb, torch.as_tensor(logit_scale).exp())
    return -(logits.log_softmax(dim=0).diagonal().mean() + logits.log_softmax(dim=0).diagonal().mean()) / 2


def not_normalised(image_emb, text_emb, logit_scale):
    logits = torch.as_tensor(logit_scale).exp() * image_emb @ text_emb.T
    targets = torch.arange(len(logits))
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def summed_not_averaged(image_emb, text_emb, logit_scale):
    logits = _logits(image_emb, text_emb, torch.as_tensor(logit_scale).exp())
    targets = torch.arange(len(logits))
    return F.cross_entropy(logits, targets, reduction="sum") + F.cross_entropy(logits.T, targets, reduction="sum")


def test_lesson_04_a_learner_solution_passes():
    assert not failed(CLIP, clip_loss=learner_clip_loss)


@pytest.mark.parametrize("wrong", [one_direction, no_temperature, scale_not_exponentiated, wrong_axis,
                                   not_normalised, summed_not_averaged])
def test_lesson_04_wrong_versions_fail(wrong):
    assert failed(CLIP, clip_loss=wrong)


def test_equal_logits_give_log_batch_and_the_loss_is_symmetric():
    """The closed forms the lesson states, on the library."""
    same = torch.ones(7, 3)
    assert abs(clip_loss(same, same, math.log(1 / 0.07)).item() - math.log(7)) < 1e-6
    a, b = torch.randn(5, 4), torch.randn(5, 4)
    assert torch.allclose(clip_loss(a, b, 2.0), clip_loss(b, a, 2.0))


# ----------------------------------------------------------------------------------------------------------
# Lesson 14: decoupled_cross_attention
# ----------------------------------------------------------------------------------------------------------
def _attend(q, k, v, heads, mask=None):
    """softmax(Q K^T / sqrt d) V per head; q [B, N, H*d], k, v [B, M, H*d], mask [B, M] -> [B, N, H*d]."""
    q, k, v = (rearrange(t, "b m (h d) -> b h m d", h=heads) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    return rearrange(scores.softmax(dim=-1) @ v, "b h n d -> b n (h d)")


def learner_decoupled(x, text, text_mask, image_tokens, w, heads, scale):
    q = w["to_q"](x)
    z_text = _attend(q, w["to_k"](text), w["to_v"](text), heads, text_mask)
    z_image = _attend(q, w["to_k_ip"](image_tokens), w["to_v_ip"](image_tokens), heads)
    return w["to_out"](z_text + scale * z_image)


def image_branch_masked(x, text, text_mask, image_tokens, w, heads, scale):
    q = w["to_q"](x)
    z_text = _attend(q, w["to_k"](text), w["to_v"](text), heads, text_mask)
    z_image = _attend(q, w["to_k_ip"](image_tokens), w["to_v_ip"](image_tokens), heads, text_mask)
    return w["to_out"](z_text + scale * z_image)


def lambda_on_text(x, text, text_mask, image_tokens, w, heads, scale):
    q = w["to_q"](x)
    z_text = _attend(q, w["to_k"](text), w["to_v"](text), heads, text_mask)
    z_image = _attend(q, w["to_k_ip"](image_tokens), w["to_v_ip"](image_tokens), heads)
    return w["to_out"](scale * z_text + z_image)


def summed_after_to_out(x, text, text_mask, image_tokens, w, heads, scale):
    q = w["to_q"](x)
    z_text = _attend(q, w["to_k"](text), w["to_v"](text), heads, text_mask)
    z_image = _attend(q, w["to_k_ip"](image_tokens), w["to_v_ip"](image_tokens), heads)
    return w["to_out"](z_text) + scale * w["to_out"](z_image)


def k_prime_from_text(x, text, text_mask, image_tokens, w, heads, scale):
    q = w["to_q"](x)
    z_text = _attend(q, w["to_k"](text), w["to_v"](text), heads, text_mask)
    z_image = _attend(q, w["to_k_ip"](text), w["to_v_ip"](image_tokens), heads)
    return w["to_out"](z_text + scale * z_image)


def one_softmax_over_both(x, text, text_mask, image_tokens, w, heads, scale):
    """Concatenated keys: text and image tokens compete in one softmax (what IP-Adapter avoids)."""
    q = w["to_q"](x)
    k = torch.cat([w["to_k"](text), w["to_k_ip"](image_tokens)], dim=1)
    v = torch.cat([w["to_v"](text), scale * w["to_v_ip"](image_tokens)], dim=1)
    mask = None if text_mask is None else torch.cat([text_mask, text_mask.new_ones(image_tokens.shape[:2])], dim=1)
    return w["to_out"](_attend(q, k, v, heads, mask))


def single_head(x, text, text_mask, image_tokens, w, heads, scale):
    return learner_decoupled(x, text, text_mask, image_tokens, w, 1, scale)


def test_lesson_14_a_learner_solution_passes():
    assert not failed(IP, decoupled_cross_attention=learner_decoupled)


@pytest.mark.parametrize("wrong", [image_branch_masked, lambda_on_text, summed_after_to_out, k_prime_from_text,
                                   one_softmax_over_both, single_head])
def test_lesson_14_wrong_versions_fail(wrong):
    assert failed(IP, decoupled_cross_attention=wrong)


def test_lesson_14_each_mistake_fails_its_own_check():
    """The hint a learner sees names the concept they got wrong."""
    def failing(wrong):
        return failed(IP, decoupled_cross_attention=wrong)
    assert "decoupled_cross_attention #2" in failing(lambda_on_text)  # lambda = 0 is text-only
    assert "decoupled_cross_attention #3" in failing(summed_after_to_out)  # one to_out
    assert "decoupled_cross_attention #4" in failing(image_branch_masked)  # no mask on the image branch
    assert "decoupled_cross_attention #5" in failing(k_prime_from_text)  # K' from the image tokens
    assert "decoupled_cross_attention #6" in failing(one_softmax_over_both)  # two softmaxes
