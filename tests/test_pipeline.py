"""End to end on a micro config: train.py stages, resume, sample.py, same seed -> same image, bad input."""
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

import sample
import train
from minildm.checkpoint import load_checkpoint
from minildm.config import micro
from minildm.diffusion.ddpm import diffusion_loss
from minildm.diffusion.schedule import NoiseSchedule
from minildm.modules.unet import UNet, UNetConfig
from minildm.pipeline import LatentDiffusion
from minildm.text.encoder import PromptEncoder, TextEncoderConfig
from minildm.text.tokenizer import Tokenizer
from minildm.train.autoencoder import train_autoencoder
from minildm.train.ldm import train_ldm


def micro_preset():
    p = micro()
    p.vq_train = replace(p.vq_train, steps=6, batch_size=8, eval_images=16)
    p.ldm = replace(p.ldm, steps=6, batch_size=8, cache_size=64)
    return p


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    preset = micro_preset()
    train_autoencoder(preset, run, torch.device("cpu"), show_progress=False)
    train_ldm(preset, run, torch.device("cpu"), show_progress=False)
    return run


def test_stages_write_their_checkpoints_and_figures(run_dir):
    ae = load_checkpoint(run_dir / "autoencoder.pt", "autoencoder")
    assert ae["step"] == 6 and ae["scale_factor"] > 0 and {"psnr", "usage", "perplexity"} <= set(ae["summary"])
    assert load_checkpoint(run_dir / "ldm.pt", "ldm")["step"] == 6
    for name in ("autoencoder_loss.png", "codebook_usage.png", "ldm_loss.png"):
        assert (run_dir / name).is_file()
    assert any((run_dir / "samples").glob("ldm_step*.png"))


def test_resume_continues_the_step_count(run_dir):
    preset = micro_preset()
    train_ldm(preset, run_dir, torch.device("cpu"), resume=True, steps=9, show_progress=False)
    assert load_checkpoint(run_dir / "ldm.pt", "ldm")["step"] == 9


def test_on_sample_sees_the_ema_model_at_every_grid_and_at_the_end(run_dir, tmp_path):
    """train_ldm's on_sample hook (benchmarks score a model while it trains): called after each progress grid,
    every sample_every steps and once at the end, with the EMA weights (what ldm.pt saves as "ema")."""
    import shutil
    shutil.copy(run_dir / "autoencoder.pt", tmp_path / "autoencoder.pt")
    preset = micro_preset()
    preset.ldm = replace(preset.ldm, steps=5, sample_every=2)
    seen = []

    def on_sample(step, pipe):
        assert isinstance(pipe, LatentDiffusion)
        seen.append((step, {k: v.clone() for k, v in pipe.unet.state_dict().items()}))

    train_ldm(preset, tmp_path, torch.device("cpu"), show_progress=False, on_sample=on_sample)
    assert [step for step, _ in seen] == [2, 4, 5]
    ema = load_checkpoint(tmp_path / "ldm.pt", "ldm")["ema"]
    last = seen[-1][1]
    for k, v in last.items():
        torch.testing.assert_close(v, ema[f"unet.{k}"], rtol=0, atol=0)
    assert any(not torch.equal(seen[0][1][k], last[k]) for k in last)  # a snapshot, not the live module


def test_generate_is_repeatable_and_in_range(run_dir):
    pipe = LatentDiffusion.load(run_dir)
    a = pipe.generate(["a red circle on the left", ""], steps=4, guidance_scale=3.0, seed=1)
    b = pipe.generate(["a red circle on the left", ""], steps=4, guidance_scale=3.0, seed=1)
    c = pipe.generate(["a red circle on the left", ""], steps=4, guidance_scale=3.0, seed=2)
    assert a.shape == (2, 3, 32, 32) and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    images, extras = pipe.generate(["a blue square"], steps=3, return_trajectory=True, return_attention=True)
    assert len(extras["trajectory"]) == 4
    L = pipe.tokenizer.max_len
    maps = extras["attention"]
    assert maps.shape[:2] == (1, L) and torch.allclose(maps.sum(1), torch.ones_like(maps.sum(1)), atol=1e-4)


@pytest.mark.parametrize("kwargs, message", [
    ({"steps": 1001}, "steps must be between 1 and T"),
    ({"steps": 0}, "steps must be between 1 and T"),
    ({"guidance_scale": -1.0}, "guidance_scale must be a finite number >= 0"),
    ({"guidance_scale": float("nan")}, "guidance_scale must be a finite number >= 0"),
    ({"guidance_scale": float("inf")}, "guidance_scale must be a finite number >= 0"),
    ({"eta": float("nan")}, "eta must lie in"),
    ({"seed": 2**32}, r"seed must be an integer with seed \+ 0 <= 4294967295"),
    ({"seed": -1}, "seed must be an integer"),
    ({"seed": [1, 2]}, "or a list of 1 such seeds"),
    ({"sampler": "euler"}, "unknown sampler"),
    ({"eta": 2.0}, "eta must lie in"),
])
def test_generate_rejects_nonsense(run_dir, kwargs, message):
    pipe = LatentDiffusion.load(run_dir)
    with pytest.raises(ValueError, match=message):
        pipe.generate(["a red circle"], **kwargs)


def test_sample_cli_writes_the_same_png_for_the_same_seed(run_dir, tmp_path, capsys):
    args = ["a green triangle on the top", "--run", str(run_dir), "--n", "2", "--steps", "3", "--seed", "5"]
    assert sample.main(args + ["--out", str(tmp_path / "a.png")]) == 0
    assert sample.main(args + ["--out", str(tmp_path / "b.png")]) == 0
    a, b = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in "ab")
    assert a.shape[2] == 3 and np.array_equal(a, b)


def test_sample_cli_warns_about_unknown_words(run_dir, tmp_path):
    with pytest.warns(UserWarning, match="zebra"):
        assert sample.main(["a zebra circle", "--run", str(run_dir), "--n", "1", "--steps", "2",
                            "--out", str(tmp_path / "z.png")]) == 0


def test_sample_cli_explains_a_missing_run(tmp_path, capsys):
    assert sample.main(["a red circle", "--run", str(tmp_path / "nothing")]) == 2
    assert "no trained model in" in capsys.readouterr().err


def test_sample_cli_rejects_bad_arguments(run_dir, capsys):
    assert sample.main(["x", "--run", str(run_dir), "--sampler", "magic"]) == 2
    assert "unknown sampler" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sample.main(["x", "--n", "0"])


def test_train_cli_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        train.main(["--stage", "everything"])
    assert train.main(["--preset", "huge"]) == 2
    assert "unknown preset" in capsys.readouterr().err


def test_train_cli_dry_run_prints_both_presets(capsys):
    assert train.main(["--dry-run"]) == 0
    assert train.main(["--dry-run", "--preset", "3090"]) == 0
    out = capsys.readouterr().out
    assert "UNet" in out and "8192 codes" in out


def test_twenty_steps_lower_the_diffusion_loss():
    torch.manual_seed(0)
    tok = Tokenizer.build(["a red circle on the left", "a blue square on the right"], max_len=8)
    text = PromptEncoder(TextEncoderConfig(vocab_size=tok.vocab_size, max_len=8, dim=32, depth=1, heads=2, dim_head=16))
    unet = UNet(UNetConfig(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
                           heads=2, dim_head=8, context_dim=32, norm_groups=8))
    schedule = NoiseSchedule(1000)
    z0 = torch.randn(16, 4, 8, 8).clamp(-1, 1)
    tokens = tok.encode(["a red circle on the left", "a blue square on the right"] * 8)
    t, eps = torch.randint(0, 1000, (16,)), torch.randn_like(z0)
    params = list(text.parameters()) + list(unet.parameters())
    opt = torch.optim.Adam(params, lr=2e-3)

    def loss_now():
        context, mask = text(tokens)
        return diffusion_loss(lambda x_t, t_: unet(x_t, t_, context, mask), schedule, z0, t=t, eps=eps)

    first = loss_now().item()
    for _ in range(20):
        loss = loss_now()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss_now().item() < 0.7 * first


def test_learning_rate_warms_up_then_decays_to_zero_by_cosine():
    from minildm.train.common import learning_rate
    peak, warmup, total = 1e-3, 10, 110
    assert learning_rate(0, total, peak, warmup) == pytest.approx(peak / warmup)  # (s + 1) / warmup, not s / warmup
    assert learning_rate(warmup - 1, total, peak, warmup) == pytest.approx(peak)
    assert learning_rate(warmup, total, peak, warmup) == pytest.approx(peak)  # the cosine starts at its peak
    assert learning_rate(warmup + 50, total, peak, warmup) == pytest.approx(peak / 2)  # half-way: cos(pi / 2) = 0
    assert learning_rate(warmup + 25, total, peak, warmup) == pytest.approx(peak * (1 + 2**-0.5) / 2)
    assert learning_rate(total, total, peak, warmup) == pytest.approx(0.0, abs=1e-12)
    assert learning_rate(0, 100, peak) == pytest.approx(peak)  # no warm-up: the autoencoder's schedule
