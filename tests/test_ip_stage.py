"""The clip and ip-adapter stages on a micro base: CLIP trained first when missing, only adapter weights saved
and changed, lambda = 0 through the whole pipeline equals the text-only model exactly, the file round trip,
image files, and the CLIs."""
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

import sample
import train
from minildm.adapters.ip_adapter import DecoupledCrossAttention
from minildm.checkpoint import CheckpointError, load_checkpoint
from minildm.clip import CLIPConfig, save_clip
from minildm.config import micro
from minildm.data import shapes
from minildm.data.describe import describe
from minildm.pipeline import LatentDiffusion
from minildm.train import clip as clip_stage
from minildm.train import ip_adapter as ip_stage
from minildm.train.autoencoder import train_autoencoder
from minildm.adapters.image_prompt import ADAPTER_FILE, CLIP_FILE, load_image_file, load_image_prompter
from minildm.adapters.ip_adapter import set_ip_lambda
from minildm.train.clip import train_clip
from minildm.train.ip_adapter import POSITION_ONLY, IPAdapterTrainConfig, caption_choices, parameter_counts, train_ip_adapter
from minildm.train.ldm import train_ldm

CPU = torch.device("cpu")
CFG = IPAdapterTrainConfig(steps=3, batch_size=8, cache_size=32, lr=1e-2, preview_steps=2)
SMALL_CLIP = CLIPConfig(widths=(8, 16), d_img=32, text_dim=16, text_depth=1, text_heads=2, embed_dim=16)


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
def adapter_dir(base_dir, tmp_path_factory):
    """An adapter trained for 3 steps into its own folder; the run has no CLIP, so the stage trains one first."""
    out = tmp_path_factory.mktemp("adapter")
    with pytest.MonkeyPatch.context() as mp:  # the clip stage, shrunk to two steps of a small batch
        mp.setattr(clip_stage, "CLIP_STEPS", 2)
        mp.setattr(clip_stage, "CLIP_BATCH", 12)
        train_ip_adapter(base_dir, CPU, out_dir=out, cfg=CFG, show_progress=False)
    return out


def red_square_image(size=32):
    return torch.from_numpy(shapes.render("red", "square", "center", size=size)).permute(2, 0, 1)[None] / 127.5 - 1


def test_stage_trains_the_clip_first_and_saves_only_adapter_weights(base_dir, adapter_dir):
    assert (adapter_dir / CLIP_FILE).is_file() and not (base_dir / CLIP_FILE).exists()
    state = load_checkpoint(adapter_dir / ADAPTER_FILE, "ip-adapter")
    assert state["step"] == CFG.steps and state["config"]["num_tokens"] == 4 and state["config"]["drop_prob"] == 0.05
    assert all(key.endswith(("to_k_ip", "to_v_ip")) for key in state["weights"])  # no UNet weight in the file
    pipe = LatentDiffusion.load(base_dir)
    prompter = load_image_prompter(pipe, adapter_dir / ADAPTER_FILE)
    trainable, unet_params = parameter_counts(pipe, prompter.projection)
    saved = sum(w.numel() for w in state["weights"].values()) + sum(w.numel() for w in state["projection"].values())
    assert saved == trainable and 0 < trainable < unet_params
    assert unet_params == sum(p.numel() for p in LatentDiffusion.load(base_dir).unet.parameters())


def test_training_moved_only_the_adapter(base_dir, adapter_dir):
    base = LatentDiffusion.load(base_dir)
    pipe = LatentDiffusion.load(base_dir)
    load_image_prompter(pipe, adapter_dir / ADAPTER_FILE)
    layers = [m for m in pipe.unet.modules() if isinstance(m, DecoupledCrossAttention)]
    assert layers
    for layer in layers:  # W'_k, W'_v started as copies of W_k, W_v and trained away from them
        assert not torch.equal(layer.streams["to_k_ip"].weight, layer.base.to_k.weight)
        assert not torch.equal(layer.streams["to_v_ip"].weight, layer.base.to_v.weight)
    frozen = dict(base.unet.named_parameters())
    for name, p in pipe.unet.named_parameters():
        if "streams." not in name:  # every UNet weight is the base's (names gain ".base" inside decoupled layers)
            assert torch.equal(p, frozen[name.replace(".base.", ".")]), name
        assert not p.requires_grad or "streams." in name


def test_lambda_zero_through_the_pipeline_is_the_text_only_model_exactly(base_dir, adapter_dir):
    prompts = ["a red circle on the left", "a blue square in the center"]
    text_only = LatentDiffusion.load(base_dir).generate(prompts, steps=3, guidance_scale=3.0, seed=5)
    pipe = LatentDiffusion.load(base_dir)
    prompter = load_image_prompter(pipe, adapter_dir / ADAPTER_FILE, ip_lambda=0.0)
    tokens = prompter.extra_tokens(red_square_image())
    assert torch.equal(pipe.generate(prompts, steps=3, guidance_scale=3.0, seed=5, extra_tokens=tokens), text_only)
    set_ip_lambda(pipe.unet, 1.0)  # the image term is on: the UNet's eps moves (a micro base barely uses
    x, t = torch.randn(1, *pipe.latent_shape()), torch.tensor([500])  # attention, so compare eps, not images)
    context, mask = pipe.encode_prompts(prompts[:1])
    with torch.no_grad():
        eps_image = pipe.unet(x, t, torch.cat([context, tokens[0]], dim=1), mask)
        set_ip_lambda(pipe.unet, 0.0)
        eps_text = pipe.unet(x, t, torch.cat([context, tokens[0]], dim=1), mask)
    assert not torch.equal(eps_image, eps_text)


def test_extra_tokens_are_checked_and_uncond_is_the_zero_embedding(base_dir, adapter_dir):
    pipe = LatentDiffusion.load(base_dir)
    prompter = load_image_prompter(pipe, adapter_dir / ADAPTER_FILE)
    cond, uncond = prompter.extra_tokens(torch.cat([red_square_image()] * 3))
    assert cond.shape == (3, 4, pipe.unet.cfg.context_dim) and uncond.shape == (1, 4, pipe.unet.cfg.context_dim)
    assert torch.allclose(uncond, prompter.projection(torch.zeros(1, prompter.projection.d_img)))
    no_image, also_uncond = prompter.extra_tokens(None)
    assert torch.equal(no_image, uncond) and torch.equal(also_uncond, uncond)
    with pytest.raises(ValueError, match="extra_tokens must be"):
        pipe.generate(["a red circle", "a blue square"], steps=2, extra_tokens=(cond, uncond))  # 3 image prompts for 2 prompts


def test_an_adapter_refuses_another_clip(base_dir, adapter_dir, tmp_path):
    shutil.copy(adapter_dir / ADAPTER_FILE, tmp_path / ADAPTER_FILE)
    model, tokenizer, _ = train_clip(steps=1, batch_size=4, progress=False, cfg=SMALL_CLIP, seed=3)
    save_clip(tmp_path / CLIP_FILE, model, tokenizer)
    with pytest.raises(CheckpointError, match="not the CLIP"):
        load_image_prompter(LatentDiffusion.load(base_dir), tmp_path / ADAPTER_FILE)
    with pytest.raises(CheckpointError, match="no IP-Adapter"):
        load_image_prompter(LatentDiffusion.load(base_dir), tmp_path / "missing" / ADAPTER_FILE)


def test_image_files_become_rgb_model_inputs(tmp_path):
    big = shapes.render("red", "square", "center", size=96)  # uint8 [96, 96, 3]
    wide = np.zeros((96, 160, 3), np.uint8)
    wide[:, 32:128] = big  # the central square of a wide picture is the shape
    Image.fromarray(wide).convert("RGBA").save(tmp_path / "wide.png")
    Image.fromarray(big).convert("L").save(tmp_path / "gray.jpg")
    x = load_image_file(tmp_path / "wide.png", 32)
    assert x.shape == (1, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert describe((x[0] + 1) / 2) == ("red", "square", "center")
    gray = load_image_file(tmp_path / "gray.jpg", 32)
    assert torch.allclose(gray[:, 0], gray[:, 1]) and torch.allclose(gray[:, 1], gray[:, 2])  # L -> RGB
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(ValueError, match="cannot read .* as an image"):
        load_image_file(tmp_path / "bad.png", 32)
    with pytest.raises(ValueError, match="does not exist"):
        load_image_file(tmp_path / "nothing.png", 32)


def test_clis_train_both_stages_and_sample_with_an_image_prompt(base_dir, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    shutil.copytree(base_dir, run)
    assert train.main(["--stage", "clip", "--out", str(run), "--steps", "2", "--batch-size", "8", "--device", "cpu"]) == 0
    assert "zero-shot accuracy among all 90 captions" in capsys.readouterr().out
    monkeypatch.setattr(ip_stage, "IPAdapterTrainConfig", lambda: replace(CFG, steps=5))
    assert train.main(["--stage", "ip-adapter", "--base", str(run), "--steps", "2", "--batch-size", "4",
                       "--device", "cpu"]) == 0
    assert "trainable parameters against the frozen UNet" in capsys.readouterr().out
    assert load_checkpoint(run / ADAPTER_FILE, "ip-adapter")["step"] == 2
    Image.fromarray(shapes.render("blue", "circle", "left", size=64)).save(tmp_path / "prompt.jpg")
    out = tmp_path / "grid.png"
    assert sample.main(["--run", str(run), "--image-prompt", str(tmp_path / "prompt.jpg"), "--ip-lambda", "0.5",
                        "--n", "2", "--steps", "2", "--device", "cpu", "--out", str(out)]) == 0
    assert out.is_file()
    capsys.readouterr()
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    assert sample.main(["on the left", "--run", str(run), "--image-prompt", str(tmp_path / "bad.png"),
                        "--steps", "2", "--device", "cpu"]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0  # one sentence, no traceback


@pytest.mark.parametrize("mix", [(0.5, 0.5, 0.5, 0.5), (1.2, -0.2, 0.0, 0.0), (0.5, 0.5)])
def test_caption_mix_must_be_four_probabilities(mix):
    with pytest.raises(ValueError, match="caption_mix"):
        IPAdapterTrainConfig(caption_mix=mix)


def test_caption_choices_follow_the_order_of_caption_mix():
    # (full caption, colour + shape, position, empty): a swap here would train the look-alike image prompts
    # with the wrong texts
    assert caption_choices("red", "circle", "left") == ["a red circle on the left", "a red circle", "on the left", ""]
    assert caption_choices("cyan", "triangle", "center")[POSITION_ONLY] == "in the center"
