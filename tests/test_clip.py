"""The small CLIP: the contrastive loss against closed forms, training, scores, checkpoints."""
import math

import numpy as np
import pytest
import torch

from minildm.checkpoint import CheckpointError, save_checkpoint
from minildm.clip import (
    CLIP,
    MAX_LOGIT_SCALE,
    CLIPConfig,
    clip_i,
    clip_loss,
    clip_t,
    distinct_batch,
    load_clip,
    save_clip,
    shapes_tokenizer,
    zero_shot_accuracy,
)
from minildm.data import shapes
from minildm.train.clip import train_clip

TINY = CLIPConfig(widths=(8, 16), d_img=32, text_dim=16, text_depth=1, text_heads=2, embed_dim=16)


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    tokenizer = shapes_tokenizer(TINY.max_len)
    return CLIP(TINY, tokenizer.vocab_size).eval(), tokenizer


def test_clip_loss_is_symmetric():
    g = torch.Generator().manual_seed(0)
    image_emb, text_emb = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    a = clip_loss(image_emb, text_emb, torch.tensor(2.0))
    b = clip_loss(text_emb, image_emb, torch.tensor(2.0))
    assert torch.allclose(a, b, atol=1e-6)
    # but not invariant to re-pairing: shuffling the captions changes it
    assert not torch.allclose(a, clip_loss(image_emb, text_emb.roll(1, dims=0), torch.tensor(2.0)))


@pytest.mark.parametrize("batch", [1, 2, 7, 64])
def test_clip_loss_of_equal_logits_is_log_batch(batch):
    """All images alike and all captions alike: every softmax is uniform over B, so L = log B."""
    g = torch.Generator().manual_seed(batch)
    image_emb = torch.randn(1, 8, generator=g).expand(batch, 8)
    text_emb = torch.randn(1, 8, generator=g).expand(batch, 8)
    loss = clip_loss(image_emb, text_emb, math.log(1 / 0.07))
    assert loss.item() == pytest.approx(math.log(batch), abs=1e-5)


def test_clip_loss_reference_value_2x2():
    """I = (1,0), (0,1); T = (1,0), (1,1)/sqrt 2; scale exp(0) = 1, so logits = [[1, c], [0, c]], c = 1/sqrt 2."""
    image_emb = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text_emb = torch.tensor([[2.0, 0.0], [3.0, 3.0]])  # lengths do not matter: the loss normalises
    c = 1 / math.sqrt(2)
    rows = -math.log(math.e / (math.e + math.exp(c))) - math.log(math.exp(c) / (1 + math.exp(c)))  # image -> text
    cols = -math.log(math.e / (math.e + 1)) - math.log(math.exp(c) / (math.exp(c) + math.exp(c)))  # text -> image
    expected = (rows / 2 + cols / 2) / 2
    assert clip_loss(image_emb, text_emb, 0.0).item() == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        clip_loss(image_emb, text_emb[:1], 0.0)


def test_logit_scale_starts_at_one_over_007_and_is_clamped_at_100():
    model, tokenizer = tiny_model()
    assert model.logit_scale.exp().item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(7.0)
    _, _, s = model(torch.zeros(1, 3, 32, 32), tokenizer.encode(["a red circle on the left"]))
    assert s.item() == pytest.approx(MAX_LOGIT_SCALE) and s.exp().item() == pytest.approx(100.0, rel=1e-5)


def test_distinct_batches_have_distinct_combinations():
    images, captions = distinct_batch(90, np.random.default_rng(0), "all", paraphrase_prob=0.5)
    assert images.shape == (90, 3, 32, 32) and images.min() >= -1 and images.max() <= 1
    assert len({shapes.parse_caption(c) for c in captions}) == 90
    with pytest.raises(ValueError, match="every caption in a batch is different"):
        distinct_batch(81, np.random.default_rng(0), "train")  # the train split has only 80 combinations


def test_a_few_training_steps_lower_the_loss():
    model, tokenizer, log = train_clip(steps=30, batch_size=24, seed=0, progress=False, cfg=TINY)
    losses = [v for _, v in log.history["loss"]]
    assert len(losses) == 30 and not model.training
    assert losses[0] > 0.9 * math.log(24)  # starts at chance or worse
    assert np.mean(losses[-5:]) < losses[0] - 0.5


def test_scores_are_cosines():
    model, tokenizer = tiny_model()
    images, captions = shapes.sample_batch(4, np.random.default_rng(1), "all")
    assert clip_i(model, images, images) == pytest.approx(1.0, abs=1e-6)  # cos(a, a) = 1
    with torch.no_grad():
        i, t = model.encode_image(images), model.encode_text(tokenizer.encode(captions))
    manual = torch.nn.functional.cosine_similarity(i, t, dim=-1).mean().item()
    assert clip_t(model, tokenizer, images, captions) == pytest.approx(manual, abs=1e-6)
    with pytest.raises(ValueError, match="one prompt per image"):
        clip_t(model, tokenizer, images, captions[:3])


def test_zero_shot_accuracy_compares_combinations():
    """Both caption forms of the same combination count as the same answer; the result is a fraction."""
    model, tokenizer = tiny_model()
    images, captions = shapes.sample_batch(8, np.random.default_rng(2), "all")
    paraphrased = [shapes.caption(*shapes.parse_caption(c), paraphrase=True) for c in captions]
    acc = zero_shot_accuracy(model, tokenizer, images, captions)
    assert acc == zero_shot_accuracy(model, tokenizer, images, paraphrased)
    assert acc in {k / 8 for k in range(9)}


def test_checkpoint_round_trip_and_wrong_kind(tmp_path):
    model, tokenizer = tiny_model(seed=3)
    path = save_clip(tmp_path / "clip.pt", model, tokenizer)
    loaded, loaded_tokenizer = load_clip(path)
    assert loaded.cfg == model.cfg and loaded_tokenizer.words == tokenizer.words
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    tokens = tokenizer.encode(["a red circle on the left", ""])
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images), model.encode_image(images))
        assert torch.equal(loaded.encode_text(tokens), model.encode_text(tokens))
    save_checkpoint(tmp_path / "other.pt", "lora", {})
    with pytest.raises(CheckpointError, match="'clip' checkpoint was expected"):
        load_clip(tmp_path / "other.pt")
