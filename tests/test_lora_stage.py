"""The LoRA fine-tuning stage on a micro base: new words, exact identity at init, frozen base weights,
merge == unmerged on the real UNet, the file round trip through sample.py, and refusal of foreign files."""
import copy
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

import sample
import train
from minildm.adapters.lora import LoRALinear, inject_lora, merge_lora, set_lora_scale
from minildm.checkpoint import load_checkpoint
from minildm.config import micro
from minildm.data import shapes
from minildm.pipeline import LatentDiffusion
from minildm.train.autoencoder import train_autoencoder
from minildm.train.ldm import train_ldm
from minildm.train.lora import (LoRATrainConfig, NewWordEmbedding, add_words, apply_lora, apply_lora_file,
                                concept_prompts, finetune_concept, train_lora, trainable_counts)

CPU = torch.device("cpu")
CFG = LoRATrainConfig(steps=3, batch_size=8, concept_images=16, base_images=16, warmup=1)
BASE_PROMPTS = ["a red circle on the left", "a blue square in the center", ""]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("base")
    p = micro()
    p.vq_train = replace(p.vq_train, steps=4, batch_size=8, eval_images=16)
    p.ldm = replace(p.ldm, steps=4, batch_size=8, cache_size=32)
    train_autoencoder(p, run, CPU, show_progress=False)
    train_ldm(p, run, CPU, show_progress=False)
    return run


@pytest.fixture(scope="module")
def tuned(base_dir):
    """(fine-tuned pipe, adapter state): 3 steps on 'orange', enough to move every adapter weight."""
    pipe = LatentDiffusion.load(base_dir)
    state, _ = finetune_concept(pipe, "orange", CFG, show_progress=False)
    return pipe, state


def eps_of(pipe, prompts, seed=0):
    """The UNet's eps for `prompts` at one fixed (x_t, t): [B, c, h, w]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(prompts), *pipe.latent_shape(), generator=g)
    t = torch.randint(0, 1000, (len(prompts),), generator=g)
    context, mask = pipe.encode_prompts(prompts)
    return pipe.unet(x, t, context, mask)


def test_concept_colour_renders_captions_and_reads_back_only_when_asked():
    rng = np.random.default_rng(0)
    combos = shapes.concept_combos("orange")
    assert len(combos) == 15 and concept_prompts("orange")[0] == "a orange circle on the left"
    images = (shapes.render_combos(combos, rng) + 1) / 2
    assert all(shapes.describe(x, concepts=("orange",)) == c for x, c in zip(images, combos))
    assert {shapes.describe(x)[0] for x in images} <= set(shapes.COLORS)  # the base checker never says orange
    assert shapes.prompt_accuracy(images, concept_prompts("orange"), concepts=("orange",)) == 1.0
    assert shapes.parse_caption("a square that is orange, on the top") == ("orange", "square", "top")
    assert "orange" not in shapes.VOCAB_WORDS and all(c[0] != "orange" for c in shapes.ALL_COMBOS)
    with pytest.raises(ValueError, match="unknown concept"):
        shapes.describe(images[0], concepts=("pink",))


def test_new_word_gets_the_next_id_and_old_prompts_encode_exactly_as_before(base_dir):
    pipe = LatentDiffusion.load(base_dir)
    V = pipe.tokenizer.vocab_size
    tokens, (context, mask) = pipe.tokenizer.encode(BASE_PROMPTS), pipe.encode_prompts(BASE_PROMPTS)
    row = torch.randn(1, pipe.text_encoder.cfg.dim)
    emb = add_words(pipe, ["orange"], row)
    assert isinstance(emb, NewWordEmbedding) and pipe.tokenizer.word_to_id["orange"] == V
    assert torch.equal(pipe.tokenizer.encode(BASE_PROMPTS), tokens)
    context2, mask2 = pipe.encode_prompts(BASE_PROMPTS)
    assert torch.equal(context2, context) and torch.equal(mask2, mask)
    assert torch.equal(pipe.text_encoder.token_emb(torch.tensor([[V]]))[0], row)  # E'[V] = the new row
    assert [n for n, p in pipe.text_encoder.named_parameters() if p.requires_grad] == ["token_emb.new_rows"]
    with pytest.raises(ValueError, match="already a word"):
        add_words(LatentDiffusion.load(base_dir), ["red"], row)


def test_fresh_adapter_leaves_the_pipeline_exactly_unchanged(base_dir):
    pipe = LatentDiffusion.load(base_dir)
    before = eps_of(pipe, BASE_PROMPTS)
    images = pipe.generate(BASE_PROMPTS[:1], steps=3)
    add_words(pipe, ["orange"], torch.randn(1, pipe.text_encoder.cfg.dim))
    inject_lora(pipe.unet, rank=4)  # B = 0
    assert torch.equal(eps_of(pipe, BASE_PROMPTS), before)
    assert torch.equal(pipe.generate(BASE_PROMPTS[:1], steps=3), images)


def test_finetuning_trains_only_the_adapter_and_leaves_every_base_weight_bit_identical(base_dir, tuned):
    pipe, state = tuned
    base = LatentDiffusion.load(base_dir)
    base_params = dict(base.unet.named_parameters())
    for name, p in pipe.unet.named_parameters():
        if "lora_" in name:
            continue
        key = name.replace(".base.", ".")  # LoRALinear keeps the original Linear as .base
        assert torch.equal(p, base_params[key]), name
    assert torch.equal(pipe.text_encoder.token_emb.base.weight, base.text_encoder.token_emb.weight)
    layers = [m for m in pipe.unet.modules() if isinstance(m, LoRALinear)]
    assert layers and all(torch.count_nonzero(m.lora_B.weight) > 0 for m in layers)  # B moved away from 0
    assert not torch.equal(state["word_rows"], base.text_encoder.token_emb.weight[-1:])
    adapter, total = trainable_counts(pipe)
    n_lora = sum(w.numel() for w in state["weights"].values())
    assert adapter == n_lora + pipe.text_encoder.cfg.dim  # A, B of every layer + one new row
    assert total == adapter + sum(p.numel() for m in (base.unet, base.text_encoder) for p in m.parameters())
    assert adapter / total < 0.05


def test_merged_equals_unmerged_on_the_finetuned_unet(tuned):
    pipe = copy.deepcopy(tuned[0])
    prompts = concept_prompts("orange")[:2] + BASE_PROMPTS
    set_lora_scale(pipe.unet, 0.8)
    unmerged = eps_of(pipe, prompts)
    merge_lora(pipe.unet)
    assert torch.allclose(eps_of(pipe, prompts), unmerged, atol=1e-5)


def test_adapter_state_round_trip_and_scale_zero_gives_the_base(base_dir, tuned):
    pipe, state = tuned
    prompts = concept_prompts("orange")[:2] + BASE_PROMPTS
    fresh = apply_lora(LatentDiffusion.load(base_dir), state)
    assert torch.equal(eps_of(fresh, prompts), eps_of(pipe, prompts))
    off = apply_lora(LatentDiffusion.load(base_dir), state, scale=0.0)
    assert torch.equal(eps_of(off, BASE_PROMPTS), eps_of(LatentDiffusion.load(base_dir), BASE_PROMPTS))


def test_file_for_another_model_is_refused_and_leaves_the_model_unchanged(base_dir, tuned):
    _, state = tuned
    cases = [
        ({**state, "base_words": state["base_words"][:-1] + ["zebra"]}, "another vocabulary"),
        ({**state, "base_fingerprint": state["base_fingerprint"] * 1.01}, "other base weights"),
        ({**state, "word_rows": torch.zeros(1, 7)}, "made for another model"),
        ({**state, "weights": {k: v[:, :-1] for k, v in state["weights"].items()}}, "made for another model"),
    ]
    for bad, message in cases:
        pipe = LatentDiffusion.load(base_dir)
        words = list(pipe.tokenizer.words)
        with pytest.raises(ValueError, match=message):
            apply_lora(pipe, bad)
        assert pipe.tokenizer.words == words and not any(isinstance(m, LoRALinear) for m in pipe.unet.modules())
    with pytest.raises(ValueError, match="unknown concept"):
        finetune_concept(LatentDiffusion.load(base_dir), "pink", CFG, show_progress=False)


def test_train_py_stage_writes_a_small_file_that_sample_py_uses(base_dir, tmp_path):
    out = tmp_path / "adapter"
    assert train.main(["--stage", "lora", "--preset", "micro", "--base", str(base_dir), "--concept", "orange",
                       "--rank", "2", "--steps", "2", "--out", str(out), "--device", "cpu"]) == 0
    path = out / "lora_orange_r2.pt"
    state = load_checkpoint(path, "lora")
    assert state["rank"] == 2 and state["new_words"] == ["orange"] and state["steps"] == 2
    assert path.stat().st_size < 0.2 * (base_dir / "ldm.pt").stat().st_size
    assert (out / "samples" / "lora_orange_r2.png").is_file()

    png = tmp_path / "orange.png"
    args = ["a orange circle on the left", "--run", str(base_dir), "--lora", str(path), "--lora-scale", "0.5",
            "--n", "2", "--steps", "2", "--out", str(png), "--device", "cpu"]
    assert sample.main(args) == 0
    assert Image.open(png).size[0] > 2 * 32
    pipe = apply_lora_file(LatentDiffusion.load(base_dir), path, 0.5)
    assert "orange" in pipe.tokenizer.word_to_id and pipe.tokenizer.unknown_counts == {}
    assert sample.main(args[:1] + ["--run", str(tmp_path / "nowhere")] + args[3:]) == 2  # no base: clear error
