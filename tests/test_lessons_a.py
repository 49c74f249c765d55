"""Lessons 01, 02, 03, 05, 06: every grader fails realistic wrong versions (special tokens missing or shifted, no start token, the hinge with the wrong
sign, softmax over the wrong axis, no 1/sqrt(d), the mask read backwards, the straight-through estimator
with the detach on the wrong side, beta on the codebook term, the adaptive weight inverted or without its
epsilon, std instead of 1/std...).

tests/test_lessons_graders.py checks that the references pass and the stubs fail; .ci/lessons runs every
lesson.py with --quick.
"""
from __future__ import annotations

import re
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from einops import einsum, rearrange

from lesson_helpers import assert_two_wrong_versions_each, failed
from minildm.text.tokenizer import split_words

NAMES = ["01_conditional_generation", "02_gans", "03_image_tokens", "05_autoencoder", "06_prompt_model"]


# ---------------------------------------------------------------------------------------------------------
# Realistic wrong versions
# ---------------------------------------------------------------------------------------------------------
SPECIALS = ["<pad>", "<unk>", "<s>"]


def _counts(captions):
    return Counter(w for c in captions for w in split_words(c))


# lesson 01 ---------------------------------------------------------------
def vocab_without_specials(captions, min_count=1):
    return sorted(w for w, c in _counts(captions).items() if c >= min_count)


def vocab_specials_shifted(captions, min_count=1):
    """<s> first, as in some GPT-style vocabularies: every special id is off."""
    return ["<s>", "<pad>", "<unk>"] + vocab_without_specials(captions, min_count)


def vocab_in_order_of_appearance(captions, min_count=1):
    counts = _counts(captions)
    return SPECIALS + [w for w in counts if counts[w] >= min_count]


def vocab_strict_min_count(captions, min_count=1):
    return SPECIALS + sorted(w for w, c in _counts(captions).items() if c > min_count)


def vocab_case_sensitive(captions, min_count=1):
    counts = Counter(w for c in captions for w in re.findall(r"[A-Za-z]+", c))
    return SPECIALS + sorted(w for w, c in counts.items() if c >= min_count)


def _ids(caption, words):
    table = {w: i for i, w in enumerate(words)}
    return [table.get(w, 1) for w in split_words(caption)]


def _row(ids, max_len):
    row = torch.zeros(max_len, dtype=torch.long)
    row[: len(ids)] = torch.tensor(ids, dtype=torch.long)
    return row


def caption_without_start(caption, words, max_len):
    return _row(_ids(caption, words)[:max_len], max_len)


def caption_unknown_as_pad(caption, words, max_len):
    table = {w: i for i, w in enumerate(words)}
    return _row(([2] + [table.get(w, 0) for w in split_words(caption)])[:max_len], max_len)


def caption_unknown_skipped(caption, words, max_len):
    table = {w: i for i, w in enumerate(words)}
    return _row(([2] + [table[w] for w in split_words(caption) if w in table])[:max_len], max_len)


def caption_truncated_before_start(caption, words, max_len):
    """Cuts the words to max_len and then adds <s>: one id too many."""
    ids = [2] + _ids(caption, words)[:max_len]
    return _row(ids, max(max_len, len(ids)))


# lesson 02 ---------------------------------------------------------------
def hinge_d_sign_flipped(real, fake):
    return F.relu(1 + real).mean() + F.relu(1 + fake).mean()


def hinge_d_without_relu(real, fake):
    return (1 - real).mean() + (1 + fake).mean()


def hinge_d_halved(real, fake):
    return 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())


def hinge_d_mean_of_concatenation(real, fake):
    return torch.cat([F.relu(1 - real).flatten(), F.relu(1 + fake).flatten()]).mean() * 2


def hinge_g_plus(fake):
    return fake.mean()


def hinge_g_with_margin(fake):
    return F.relu(1 - fake).mean()


def hinge_g_non_saturating(fake):
    return F.softplus(-fake).mean()


# lesson 03 ---------------------------------------------------------------
def quantize_dot_product(z, codebook):
    b, d, h, w = z.shape
    flat = rearrange(z, "b d h w -> (b h w) d")
    indices = rearrange((flat @ codebook.t()).argmax(1), "(b h w) -> b h w", b=b, h=h, w=w)
    return rearrange(codebook[indices], "b h w d -> b d h w"), indices


def quantize_reshape_without_permute(z, codebook):
    b, d, h, w = z.shape
    flat = z.reshape(-1, d)  # mixes channels of neighbouring pixels
    indices = torch.cdist(flat, codebook).argmin(1).reshape(b, h, w)
    return rearrange(codebook[indices], "b h w d -> b d h w"), indices


def quantize_detached(z, codebook):
    b, d, h, w = z.shape
    flat = rearrange(z, "b d h w -> (b h w) d")
    indices = rearrange(torch.cdist(flat, codebook).argmin(1), "(b h w) -> b h w", b=b, h=h, w=w)
    return rearrange(codebook[indices], "b h w d -> b d h w").detach(), indices


def vq_loss_beta_on_codebook_term(z_e, z_q, beta=0.25):
    """taming-transformers' legacy quantizer."""
    return beta * F.mse_loss(z_q, z_e.detach()) + F.mse_loss(z_e, z_q.detach())


def vq_loss_without_stop_gradients(z_e, z_q, beta=0.25):
    return F.mse_loss(z_q, z_e) + beta * F.mse_loss(z_e, z_q)


def vq_loss_without_beta(z_e, z_q, beta=0.25):
    return F.mse_loss(z_q, z_e.detach()) + F.mse_loss(z_e, z_q.detach())


def vq_loss_summed(z_e, z_q, beta=0.25):
    return ((z_q - z_e.detach()) ** 2).sum() + beta * ((z_e - z_q.detach()) ** 2).sum()


def straight_through_detach_wrong_side(z_e, z_q):
    return z_q + (z_e - z_q).detach()


def straight_through_plain_z_q(z_e, z_q):
    return z_q


def straight_through_no_detach(z_e, z_q):
    return z_e + (z_q - z_e)


# lesson 05 ---------------------------------------------------------------
def _grad_norms(rec_loss, gan_loss, last_layer):
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    return g_rec.norm(), g_gan.norm()


def weight_inverted(rec_loss, gan_loss, last_layer, max_weight=1e4):
    rec, gan = _grad_norms(rec_loss, gan_loss, last_layer)
    return (gan / (rec + 1e-4)).clamp(0, max_weight).detach()


def weight_without_epsilon(rec_loss, gan_loss, last_layer, max_weight=1e4):
    rec, gan = _grad_norms(rec_loss, gan_loss, last_layer)
    return (rec / gan).clamp(0, max_weight).detach()


def weight_from_loss_values(rec_loss, gan_loss, last_layer, max_weight=1e4):
    return (rec_loss.abs() / (gan_loss.abs() + 1e-4)).clamp(0, max_weight).detach()


def weight_not_detached(rec_loss, gan_loss, last_layer, max_weight=1e4):
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True, create_graph=True)[0]
    g_gan = torch.autograd.grad(gan_loss, last_layer, retain_graph=True, create_graph=True)[0]
    return (g_rec.norm() / (g_gan.norm() + 1e-4)).clamp(0, max_weight)


def weight_with_backward(rec_loss, gan_loss, last_layer, max_weight=1e4):
    """Uses .backward() and reads .grad: pollutes the weights' gradients."""
    rec_loss.backward(retain_graph=True)
    g_rec = last_layer.grad.clone()
    last_layer.grad = None
    gan_loss.backward(retain_graph=True)
    g_gan = last_layer.grad.clone()
    return (g_rec.norm() / (g_gan.norm() + 1e-4)).clamp(0, max_weight).detach()


def weight_without_retain_graph(rec_loss, gan_loss, last_layer, max_weight=1e4):
    g_rec = torch.autograd.grad(rec_loss, last_layer)[0]
    g_gan = torch.autograd.grad(gan_loss, last_layer)[0]
    return (g_rec.norm() / (g_gan.norm() + 1e-4)).clamp(0, max_weight).detach()


def weight_unclamped(rec_loss, gan_loss, last_layer, max_weight=1e4):
    rec, gan = _grad_norms(rec_loss, gan_loss, last_layer)
    return (rec / (gan + 1e-4)).detach()


def scale_std(z):
    return z.std()


def scale_inverse_variance(z):
    return 1 / z.var()


def scale_inverse_rms(z):
    return 1 / z.pow(2).mean().sqrt()


def scale_per_channel(z):
    return 1 / z.std(dim=(0, 2, 3))


def scale_inverse_abs_max(z):
    return 1 / z.abs().max()


# lesson 06 ---------------------------------------------------------------
def _scores(q, k):
    return einsum(q, k, "b h n d, b h m d -> b h n m") / q.shape[-1] ** 0.5


def _key_mask(mask):
    return rearrange(mask, "b m -> b 1 1 m")


def _finish(scores, v, mask=None):
    probs = scores.softmax(dim=-1)
    if mask is not None:
        probs = probs.masked_fill(~_key_mask(mask).any(-1, keepdim=True), 0.0)
    return einsum(probs, v, "b h n m, b h m e -> b h n e")


def attention_softmax_over_queries(q, k, v, mask=None):
    scores = _scores(q, k)
    if mask is not None:
        scores = scores.masked_fill(~_key_mask(mask), float("-inf"))
    probs = torch.nan_to_num(scores.softmax(dim=-2))
    return einsum(probs, v, "b h n m, b h m e -> b h n e")


def attention_without_scale(q, k, v, mask=None):
    scores = einsum(q, k, "b h n d, b h m d -> b h n m")
    if mask is not None:
        scores = scores.masked_fill(~_key_mask(mask), float("-inf"))
    return _finish(scores, v, mask)


def attention_scaled_by_value_size(q, k, v, mask=None):
    scores = einsum(q, k, "b h n d, b h m d -> b h n m") / v.shape[-1] ** 0.5
    if mask is not None:
        scores = scores.masked_fill(~_key_mask(mask), float("-inf"))
    return _finish(scores, v, mask)


def attention_mask_true_means_pad(q, k, v, mask=None):
    """PyTorch's key_padding_mask convention."""
    scores = _scores(q, k)
    if mask is not None:
        scores = scores.masked_fill(_key_mask(mask), float("-inf"))
    return torch.nan_to_num(einsum(scores.softmax(dim=-1), v, "b h n m, b h m e -> b h n e"))


def attention_mask_after_softmax(q, k, v, mask=None):
    probs = _scores(q, k).softmax(dim=-1)
    if mask is not None:
        probs = probs * _key_mask(mask)
    return einsum(probs, v, "b h n m, b h m e -> b h n e")


def attention_nan_for_empty_rows(q, k, v, mask=None):
    scores = _scores(q, k)
    if mask is not None:
        scores = scores.masked_fill(~_key_mask(mask), float("-inf"))
    return einsum(scores.softmax(dim=-1), v, "b h n m, b h m e -> b h n e")


def mask_true_means_pad(tokens):
    return tokens == 0


def mask_drops_special_tokens(tokens):
    return tokens > 2


def mask_drops_unknown(tokens):
    return tokens > 1


def mask_as_long(tokens):
    return (tokens != 0).long()


WRONG = [
    ("01_conditional_generation", "build_vocab", vocab_without_specials),
    ("01_conditional_generation", "build_vocab", vocab_specials_shifted),
    ("01_conditional_generation", "build_vocab", vocab_in_order_of_appearance),
    ("01_conditional_generation", "build_vocab", vocab_strict_min_count),
    ("01_conditional_generation", "build_vocab", vocab_case_sensitive),
    ("01_conditional_generation", "encode_caption", caption_without_start),
    ("01_conditional_generation", "encode_caption", caption_unknown_as_pad),
    ("01_conditional_generation", "encode_caption", caption_unknown_skipped),
    ("01_conditional_generation", "encode_caption", caption_truncated_before_start),
    ("02_gans", "hinge_d_loss", hinge_d_sign_flipped),
    ("02_gans", "hinge_d_loss", hinge_d_without_relu),
    ("02_gans", "hinge_d_loss", hinge_d_halved),
    ("02_gans", "hinge_d_loss", hinge_d_mean_of_concatenation),
    ("02_gans", "hinge_g_loss", hinge_g_plus),
    ("02_gans", "hinge_g_loss", hinge_g_with_margin),
    ("02_gans", "hinge_g_loss", hinge_g_non_saturating),
    ("03_image_tokens", "quantize", quantize_dot_product),
    ("03_image_tokens", "quantize", quantize_reshape_without_permute),
    ("03_image_tokens", "quantize", quantize_detached),
    ("03_image_tokens", "vq_loss", vq_loss_beta_on_codebook_term),
    ("03_image_tokens", "vq_loss", vq_loss_without_stop_gradients),
    ("03_image_tokens", "vq_loss", vq_loss_without_beta),
    ("03_image_tokens", "vq_loss", vq_loss_summed),
    ("03_image_tokens", "straight_through", straight_through_detach_wrong_side),
    ("03_image_tokens", "straight_through", straight_through_plain_z_q),
    ("03_image_tokens", "straight_through", straight_through_no_detach),
    ("05_autoencoder", "adaptive_weight", weight_inverted),
    ("05_autoencoder", "adaptive_weight", weight_without_epsilon),
    ("05_autoencoder", "adaptive_weight", weight_from_loss_values),
    ("05_autoencoder", "adaptive_weight", weight_not_detached),
    ("05_autoencoder", "adaptive_weight", weight_with_backward),
    ("05_autoencoder", "adaptive_weight", weight_without_retain_graph),
    ("05_autoencoder", "adaptive_weight", weight_unclamped),
    ("05_autoencoder", "latent_scale", scale_std),
    ("05_autoencoder", "latent_scale", scale_inverse_variance),
    ("05_autoencoder", "latent_scale", scale_inverse_rms),
    ("05_autoencoder", "latent_scale", scale_per_channel),
    ("05_autoencoder", "latent_scale", scale_inverse_abs_max),
    ("06_prompt_model", "attention", attention_softmax_over_queries),
    ("06_prompt_model", "attention", attention_without_scale),
    ("06_prompt_model", "attention", attention_scaled_by_value_size),
    ("06_prompt_model", "attention", attention_mask_true_means_pad),
    ("06_prompt_model", "attention", attention_mask_after_softmax),
    ("06_prompt_model", "attention", attention_nan_for_empty_rows),
    ("06_prompt_model", "padding_mask", mask_true_means_pad),
    ("06_prompt_model", "padding_mask", mask_drops_special_tokens),
    ("06_prompt_model", "padding_mask", mask_drops_unknown),
    ("06_prompt_model", "padding_mask", mask_as_long),
]


@pytest.mark.parametrize("name, exercise, wrong", WRONG, ids=[w.__name__ for _, _, w in WRONG])
def test_realistic_wrong_version_fails(name, exercise, wrong):
    failing = failed(name, **{exercise: wrong})
    assert failing, f"{wrong.__name__} passes every check of {name}"
    assert all(label.startswith(exercise + " ") for label in failing), f"checks of other exercises failed: {failing}"


def test_every_exercise_has_at_least_two_wrong_versions():
    assert_two_wrong_versions_each(WRONG, NAMES)
