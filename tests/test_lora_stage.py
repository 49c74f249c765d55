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
from minildm.adapters.lora import LoRALinear, apply_lora, apply_lora_file, inject_lora, merge_lora, set_lora_strength
from minildm.adapters.new_words import NewWordEmbedding, add_words
from minildm.checkpoint import load_checkpoint
from minildm.config import micro
from minildm.data import shapes
from minildm.data.describe import describe, prompt_accuracy
from minildm.pipeline import LatentDiffusion
from minildm.train.autoencoder import train_autoencoder
from minildm.train.ldm import train_ldm
from minildm.train.lora import LoRATrainConfig, concept_prompts, finetune_concept, trainable_counts

CPU = torch.device("cpu")
CFG = LoRATrainConfig(steps=3, batch_size=8, concept_images=16, base_images=16, warmup=1)
BASE_PROMPTS = ["a red circle on the left", "a blue square in the center", ""]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("base")
    p = micro()
    p.vq_train = replace(p.vq_train, steps=2, batch_size=4, eval_images=8)
    p.ldm = replace(p.ldm, steps=2, batch_size=4, cache_size=16)
    train_autoencoder(p, run, CPU, show_progress=False)
    train_ldm(p, run, CPU, show_progress=False)
    return run


@pytest.fixture(scope="module")
def base(base_dir):
    """A function returning a fresh copy of the loaded base pipe (a deep copy is cheaper than a load)."""
    pipe = LatentDiffusion.load(base_dir)
    return lambda: copy.deepcopy(pipe)


@pytest.fixture(scope="module")
def tuned(base):
    """(fine-tuned pipe, adapter state): 3 steps on 'corner', enough to move every adapter weight."""
    pipe = base()
    state, _ = finetune_concept(pipe, "corner", CFG, show_progress=False)
    return pipe, state


def eps_of(pipe, prompts, seed=0):
    """The UNet's eps for `prompts` at one fixed (x_t, t): [B, c, h, w]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(prompts), *pipe.latent_shape(), generator=g)
    t = torch.randint(0, 1000, (len(prompts),), generator=g)
    context, mask = pipe.encode_prompts(prompts)
    return pipe.unet(x, t, context, mask)


def test_concept_words_render_caption_and_read_back_only_when_asked():
    rng = np.random.default_rng(0)
    for concept, n in (("corner", 18), ("orange", 15), ("diamond", 30)):
        combos = shapes.concept_combos(concept)
        assert len(combos) == n and all(concept in combo for combo in combos)
        images = (shapes.render_combos(combos, rng) + 1) / 2
        assert all(describe(x, concepts=(concept,)) == c for x, c in zip(images, combos)), concept
        assert all(concept not in describe(x) for x in images)  # the base checker never says it
        assert prompt_accuracy(images, concept_prompts(concept), concepts=shapes.CONCEPTS) == 1.0
        assert concept not in shapes.VOCAB_WORDS and all(concept not in c for c in shapes.ALL_COMBOS)
    assert concept_prompts("corner")[0] == "a red circle in the corner"
    assert concept_prompts("orange")[0] == "a orange circle on the left"
    assert shapes.parse_caption("a square that is blue, in the corner") == ("blue", "square", "corner")
    corner = shapes.render("red", "square", "corner", size=32)  # canonical: centre (0.27, 0.27) of the side
    ys, xs = np.nonzero(corner.max(-1) > 127)
    assert abs(xs.mean() + 0.5 - 0.27 * 32) < 0.5 and abs(ys.mean() + 0.5 - 0.27 * 32) < 0.5
    with pytest.raises(ValueError, match="unknown concept"):
        describe(images[0], concepts=("pink",))
    with pytest.raises(ValueError, match="unknown concept"):
        shapes.concept_combos("red")


def test_new_word_gets_the_next_id_and_old_prompts_encode_exactly_as_before(base):
    pipe = base()
    V = pipe.tokenizer.vocab_size
    tokens, (context, mask) = pipe.tokenizer.encode(BASE_PROMPTS), pipe.encode_prompts(BASE_PROMPTS)
    row = torch.randn(1, pipe.text_encoder.cfg.dim)
    emb = add_words(pipe, ["corner"], row)
    assert isinstance(emb, NewWordEmbedding) and pipe.tokenizer.word_to_id["corner"] == V
    assert torch.equal(pipe.tokenizer.encode(BASE_PROMPTS), tokens)
    context2, mask2 = pipe.encode_prompts(BASE_PROMPTS)
    assert torch.equal(context2, context) and torch.equal(mask2, mask)
    assert torch.equal(pipe.text_encoder.token_emb(torch.tensor([[V]]))[0], row)  # E'[V] = the new row
    assert [n for n, p in pipe.text_encoder.named_parameters() if p.requires_grad] == ["token_emb.new_rows"]
    with pytest.raises(ValueError, match="already a word"):
        add_words(base(), ["red"], row)


def test_fresh_adapter_leaves_the_pipeline_exactly_unchanged(base):
    pipe = base()
    before = eps_of(pipe, BASE_PROMPTS)
    images = pipe.generate(BASE_PROMPTS[:1], steps=3)
    add_words(pipe, ["corner"], torch.randn(1, pipe.text_encoder.cfg.dim))
    inject_lora(pipe.unet, rank=4)  # B = 0
    assert torch.equal(eps_of(pipe, BASE_PROMPTS), before)
    assert torch.equal(pipe.generate(BASE_PROMPTS[:1], steps=3), images)


def test_finetuning_trains_only_the_adapter_and_leaves_every_base_weight_bit_identical(base_dir, tuned):
    pipe, state = tuned
    base = LatentDiffusion.load(base_dir)  # from disk: the fine-tuning must not have touched the base weights
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
    prompts = concept_prompts("corner")[:2] + BASE_PROMPTS
    set_lora_strength(pipe.unet, 0.8)
    unmerged = eps_of(pipe, prompts)
    merge_lora(pipe.unet)
    assert torch.allclose(eps_of(pipe, prompts), unmerged, atol=1e-5)


def test_adapter_state_round_trip_and_scale_zero_gives_the_base(base, tuned):
    pipe, state = tuned
    prompts = concept_prompts("corner")[:2] + BASE_PROMPTS
    fresh = apply_lora(base(), state)
    assert torch.equal(eps_of(fresh, prompts), eps_of(pipe, prompts))
    off = apply_lora(base(), state, lora_strength=0.0)
    assert torch.equal(eps_of(off, BASE_PROMPTS), eps_of(base(), BASE_PROMPTS))


def test_file_for_another_model_is_refused_and_leaves_the_model_unchanged(base, tuned):
    _, state = tuned
    cases = [
        ({**state, "base_words": state["base_words"][:-1] + ["zebra"]}, "another vocabulary"),
        ({**state, "base_fingerprint": state["base_fingerprint"] * 1.01}, "other base weights"),
        ({**state, "word_rows": torch.zeros(1, 7)}, "made for another model"),
        ({**state, "weights": {k: v[:, :-1] for k, v in state["weights"].items()}}, "made for another model"),
    ]
    for bad, message in cases:
        pipe = base()
        words = list(pipe.tokenizer.words)
        with pytest.raises(ValueError, match=message):
            apply_lora(pipe, bad)
        assert pipe.tokenizer.words == words and not any(isinstance(m, LoRALinear) for m in pipe.unet.modules())
    with pytest.raises(ValueError, match="unknown concept"):
        finetune_concept(base(), "pink", CFG, show_progress=False)


def test_train_py_stage_writes_a_small_file_that_sample_py_uses(base_dir, tmp_path):
    out = tmp_path / "adapter"
    assert train.main(["--stage", "lora", "--preset", "micro", "--base", str(base_dir), "--concept", "corner",
                       "--rank", "2", "--steps", "2", "--out", str(out), "--device", "cpu"]) == 0
    path = out / "lora_corner_r2.pt"
    state = load_checkpoint(path, "lora")
    assert state["rank"] == 2 and state["new_words"] == ["corner"] and state["steps"] == 2
    assert path.stat().st_size < 0.2 * (base_dir / "ldm.pt").stat().st_size
    assert (out / "samples" / "lora_corner_r2.png").is_file()

    png = tmp_path / "corner.png"
    args = ["a red circle in the corner", "--run", str(base_dir), "--lora", str(path), "--lora-strength", "0.5",
            "--n", "2", "--steps", "2", "--out", str(png), "--device", "cpu"]
    assert sample.main(args) == 0
    assert Image.open(png).size[0] > 2 * 32
    pipe = apply_lora_file(LatentDiffusion.load(base_dir), path, 0.5)
    assert "corner" in pipe.tokenizer.word_to_id and pipe.tokenizer.unknown_counts == {}
    assert sample.main(args[:1] + ["--run", str(tmp_path / "nowhere")] + args[3:]) == 2  # no base: clear error
