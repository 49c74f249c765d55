"""The body stage end to end on the micro config: train.py --stage body, its checkpoints, resume, the text-only
reduction through the whole pipeline, and sample.py --body-id / --body-views / --image-prompt with bad input."""
import pytest
import torch
from PIL import Image

import sample
import train
from minildm.adapters.body import (ADAPTER_FILE, REGRESSOR_FILE, VAE_FILE, load_body_prompter, load_unet_weights,
                                   set_body_lambdas)
from minildm.adapters.ip_adapter import DecoupledCrossAttention
from minildm.autoencoder.vqvae import VQVAE
from minildm.checkpoint import CheckpointError, load_checkpoint
from minildm.data.bodies import build_phrases, identity, shape_vector, shirt_name
from minildm.modules.transformer import SpatialTransformer
from minildm.modules.unet import ResBlock, UNet
from minildm.pipeline import LatentDiffusion
from minildm.data.body_render import identity_views
from minildm.train.body import body_base_preset, body_stage_config, train_body_stage
from minildm.train.body_data import encoder_views, render_stage_data, vae_views


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("body")
    assert train.main(["--stage", "body", "--preset", "micro", "--out", str(out)]) == 0
    return out


def test_base_captions_describe_the_person_and_adapter_captions_only_the_pose():
    cfg = body_stage_config("micro")
    cfg.num_identities, cfg.views_per_identity = 8, 6
    data = render_stage_data(cfg)
    said = 0
    for k, (caption, pose) in enumerate(zip(data["captions"], data["pose_captions"])):
        shape = identity(k // cfg.views_per_identity, cfg.seed)
        pose_name = pose.removeprefix("a person ")
        assert caption.startswith("a person") and caption.endswith(pose_name)
        middle = caption.removeprefix("a person").removesuffix(pose_name)
        for phrase in ("short arms", "long arms", "short legs", "long legs", "short torso", "long torso"):
            assert phrase not in middle or phrase in build_phrases(shape)  # only this person's words
        assert "shirt" not in middle or f"in a {shirt_name(shape)} shirt" in middle
        said += middle.strip() != ""
    assert 0 < said < len(data["captions"])  # caption_keep = 0.5: some captions say more than the pose, some do not
    assert data["captions"] == render_stage_data(cfg)["captions"]  # deterministic


def test_body_base_draws_in_16x16_latents_with_attention_off_the_finest_level():
    """f = 2, because a person's build is a sub-cell detail of 8x8 latents; no attention over 256 positions."""
    preset = body_base_preset()
    torch.manual_seed(0)
    z = VQVAE(preset.vq).encode(torch.zeros(2, 3, preset.image_size, preset.image_size))
    assert z.shape == (2, 4, 16, 16)
    unet = UNet(preset.unet)
    down = [isinstance(b[-1], SpatialTransformer) for b in unet.input_blocks if isinstance(b[0], ResBlock)]
    assert down == [False, True, True]  # levels at 16x16, 8x8, 4x4
    context = torch.randn(2, preset.text.max_len, preset.unet.context_dim)
    assert unet(z, torch.tensor([0, 999]), context).shape == z.shape


def test_vae_gets_its_own_further_people_and_their_true_shapes():
    """vae_people are appended after encoder_views, in the same number of views, each with its own shape_vector,
    drawn with seed + 3 (not the stage's people, whose unseen identities the bench tests on)."""
    cfg = body_stage_config("micro")
    everything, shapes = encoder_views(cfg)
    views, vae_shapes = vae_views(cfg, everything, shapes)
    n = len(shapes)
    assert views["image"].shape == (n + cfg.vae_people, *everything["image"].shape[1:])
    assert torch.equal(views["image"][:n], everything["image"]) and torch.equal(vae_shapes[:n], shapes)
    for k in range(cfg.vae_people):
        assert torch.equal(vae_shapes[n + k], torch.from_numpy(shape_vector(identity(k, cfg.seed + 3))))
        assert not torch.equal(vae_shapes[n + k], torch.from_numpy(shape_vector(identity(k, cfg.seed))))
    cfg.vae_people = 0
    assert vae_views(cfg, everything, shapes)[0] is everything


def test_stage_writes_every_checkpoint(run):
    cfg = body_stage_config("micro")
    for name, kind, steps in (("autoencoder.pt", "autoencoder", cfg.base.vq_train.steps),
                              ("ldm.pt", "ldm", cfg.base.ldm.steps), (REGRESSOR_FILE, "keypoint-regressor", cfg.regressor_steps),
                              (VAE_FILE, "body-vae", cfg.vae_steps), (ADAPTER_FILE, "body-adapter", cfg.adapter_steps)):
        assert load_checkpoint(run / name, kind)["step"] == steps, name
    state = load_checkpoint(run / ADAPTER_FILE, "body-adapter")
    assert all(k.endswith("to_k_body") or k.endswith("to_v_body") for k in state["body"]["weights"])
    assert state["train_config"]["alpha_id"] > 0 and state["train_config"]["beta_clip"] == 0
    assert (run / "samples" / "body.png").is_file()


def test_lesson15_numbers_name_the_body_recipe_only_for_a_run_of_todays_recipe(run, monkeypatch):
    """bench/lesson_numbers.py writes "body stage <fingerprint>" into lesson15_body's first line (which
    tests/test_lesson_numbers.py requires) only when the run's checkpoints record today's body recipe: the
    micro run is not the body preset's; with the micro config standing in for today's recipe it passes."""
    from lessons.grading import ROOT, load_module
    import minildm.train.body as body

    numbers = load_module(ROOT / "bench" / "lesson_numbers.py", "lesson_numbers_body")
    assert numbers.recipe_of("lesson15_body") == ("body stage", numbers.body_fingerprint())
    line = numbers.provenance("lesson15_body", run)
    assert "body stage" not in line and "not the recipe of today's minildm/train/body.py" in line, line
    micro = body_stage_config("micro")
    monkeypatch.setattr(body, "body_stage_config", lambda name="body": micro)
    line = numbers.provenance("lesson15_body", run)
    assert f"(body stage {numbers.body_fingerprint()}, LDM trained {micro.base.ldm.steps} steps" in line, line
    assert numbers.body_fingerprint() != numbers.recipe_fingerprint()


def test_resume_skips_finished_steps(run):
    before = {f: (run / f).stat().st_mtime_ns for f in ("autoencoder.pt", "ldm.pt", REGRESSOR_FILE, VAE_FILE)}
    cfg = body_stage_config("micro")
    cfg.preview_steps = 0
    assert train_body_stage(run, torch.device("cpu"), cfg, resume=True, show_progress=False)
    assert {f: (run / f).stat().st_mtime_ns for f in before} == before  # finished steps are not trained again


def test_zero_scales_and_no_reference_are_the_unet_alone_exactly(run):
    """body_lambda = ref_lambda = 0 leaves the stage's UNet (fine-tuned with the adapter) without any stream."""
    state = load_checkpoint(run / ADAPTER_FILE, "body-adapter")
    base = LatentDiffusion.load(run)
    base_image = base.generate(["a person raising both arms"], steps=2, seed=3)
    load_unet_weights(dict(base.unet.named_parameters()), state["unet"], run / ADAPTER_FILE)
    expected = base.generate(["a person raising both arms"], steps=2, seed=3)
    assert not torch.equal(expected, base_image)  # the UNet did fine-tune (ldm.pt stays the base)
    pipe = LatentDiffusion.load(run)
    prompter = load_body_prompter(pipe, run, body_lambda=0.0, ref_lambda=1.0)
    assert any(isinstance(m, DecoupledCrossAttention) for m in pipe.unet.modules())
    views = identity_views(1, size=pipe.image_size, seed=prompter.seed)
    c_body = prompter.c_body(views["image"], views["keypoints"], views["visible"])
    got = pipe.generate(["a person raising both arms"], steps=2, seed=3, extra_tokens=prompter.extra_tokens(c_body))
    assert torch.equal(got, expected)
    set_body_lambdas(pipe.unet, 0.0, 1.0)  # the body stream on changes the picture
    moved = pipe.generate(["a person raising both arms"], steps=2, seed=3, extra_tokens=prompter.extra_tokens(c_body))
    assert not torch.equal(moved, expected)


def test_frozen_unet_when_unet_lr_scale_is_zero(run, tmp_path):
    cfg = body_stage_config("micro")
    cfg.unet_lr_scale, cfg.preview_steps = 0.0, 0
    assert train_body_stage(tmp_path, torch.device("cpu"), cfg, base_dir=run, show_progress=False)
    state = load_checkpoint(tmp_path / ADAPTER_FILE, "body-adapter")
    assert "unet" not in state
    base, pipe = LatentDiffusion.load(run), LatentDiffusion.load(run)
    prompter = load_body_prompter(pipe, tmp_path, body_lambda=0.0, ref_lambda=0.0)  # the base model exactly
    assert torch.equal(pipe.generate(["a person standing"], steps=2, seed=1, extra_tokens=prompter.extra_tokens(None)),
                       base.generate(["a person standing"], steps=2, seed=1))


def test_fine_tuned_unet_for_another_base_is_refused(run, tmp_path):
    state = load_checkpoint(run / ADAPTER_FILE, "body-adapter")
    bad = {**state["unet"]}
    bad.pop(next(iter(bad)))
    pipe = LatentDiffusion.load(run)
    with pytest.raises(CheckpointError, match="another base model"):
        load_unet_weights(dict(pipe.unet.named_parameters()), bad, tmp_path / ADAPTER_FILE)


def test_sample_cli_body_id_views_and_image_prompt(run, tmp_path):
    out = tmp_path / "id.png"
    assert sample.main(["a person standing", "--run", str(run), "--body-id", "5", "--n", "2", "--steps", "2",
                        "--out", str(out)]) == 0
    assert Image.open(out).size[0] > 0
    views = tmp_path / "views"
    views.mkdir()
    images = identity_views(2, size=32)["image"]
    for k, image in enumerate(images[:2]):
        Image.fromarray(((image.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()).save(views / f"{k}.png")
    out2 = tmp_path / "views.png"
    assert sample.main(["a person standing", "--run", str(run), "--body-views", str(views), "--image-prompt",
                        str(views / "0.png"), "--ip-lambda", "0.5", "--body-lambda", "1.5", "--n", "1", "--steps", "2",
                        "--out", str(out2)]) == 0
    assert out2.is_file()


def test_sample_cli_bad_input_is_one_sentence(run, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    for argv, message in ((["--body-views", str(empty)], "has no .png file"),
                          (["--body-views", str(tmp_path / "missing")], "is not a folder"),
                          (["--body-id", "-1"], "non-negative identity")):
        assert sample.main(["x", "--run", str(run), "--steps", "2", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    tiny = tmp_path / "text_only_run"  # a run without a body adapter
    tiny.mkdir()
    for f in ("autoencoder.pt", "ldm.pt"):
        (tiny / f).write_bytes((run / f).read_bytes())
    assert sample.main(["x", "--run", str(tiny), "--body-id", "1", "--steps", "2"]) == 2
    assert "no body adapter" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sample.parse_args(["x", "--body-id", "1", "--body-views", str(empty)])
