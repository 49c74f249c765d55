"""FID-shapes / IS-shapes (minildm/feature_net.py), the evaluation table (minildm/evaluate.py) and the
diagnostics (minildm/diagnostics.py), on a feature net trained here in seconds."""
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn as nn

from minildm import diagnostics, evaluate
from minildm.autoencoder.vqvae import VQVAE
from minildm.checkpoint import CheckpointError, save_checkpoint
from minildm.config import micro
from minildm.data import shapes
from minildm.diffusion.schedule import NoiseSchedule
from minildm.feature_net import (FeatureNetConfig, ShapesFeatureNet, classifier_accuracy, combo_labels, embed,
                                 fid_shapes, is_shapes, labelled_shapes, load_feature_net,
                                 load_or_train_feature_net, save_feature_net, train_feature_net)
from minildm.pipeline import LatentDiffusion
from minildm.text.encoder import PromptEncoder
from minildm.text.tokenizer import Tokenizer
from minildm.progress import step_rng

TINY = FeatureNetConfig(widths=(8, 16, 16), feature_dim=32)


@pytest.fixture(scope="module")
def judge():
    model, log = train_feature_net(steps=100, batch_size=48, lr=5e-3, cfg=TINY, progress=False)
    return model, log


def real(n_per_combo: int, seed: int) -> torch.Tensor:
    """n fresh renders of each of the 90 combinations, [90 n, 3, 32, 32] in [-1, 1]."""
    return shapes.render_combos([c for c in shapes.ALL_COMBOS for _ in range(n_per_combo)], np.random.default_rng(seed))


# ----------------------------------------------------------------------------------------------------------
# The feature net
# ----------------------------------------------------------------------------------------------------------
def test_labels_follow_all_combos():
    assert combo_labels(shapes.ALL_COMBOS).tolist() == list(range(90))
    assert combo_labels([("cyan", "triangle", "center")]).item() == 89


def test_the_feature_net_learns_the_90_combinations(judge):
    model, log = judge
    losses = [v for _, v in log.history["loss"]]
    assert losses[0] == pytest.approx(math.log(90), abs=0.3)  # starts at chance: -log(1/90)
    assert np.mean(losses[-10:]) < 0.5
    images, labels = labelled_shapes(360, step_rng(0, 0, stream=2))  # fresh images no batch used
    assert classifier_accuracy(model, images, labels) > 0.85  # chance is 1/90 = 0.011


def test_features_and_probabilities_have_the_documented_shapes(judge):
    features, probs = embed(judge[0], real(1, 0)[:7])
    assert features.shape == (7, TINY.feature_dim) and probs.shape == (7, 90)
    assert torch.allclose(probs.sum(dim=1), torch.ones(7), atol=1e-5)
    assert (features >= -0.2785).all()  # SiLU outputs are >= min SiLU = -0.2785
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        embed(judge[0], torch.zeros(3, 32, 32))


def test_fid_shapes_real_vs_real_is_small_and_real_vs_noise_large(judge):
    model = judge[0]
    a, b = real(2, 1), real(2, 2)
    noise = torch.rand(a.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    same = fid_shapes(model, a, b)
    assert fid_shapes(model, a, a) == pytest.approx(0.0, abs=1e-6)
    assert fid_shapes(model, a, b) == pytest.approx(fid_shapes(model, b, a), rel=1e-9)
    assert same < 0.05 * fid_shapes(model, a, noise)
    # one combination for every prompt (mode collapse) is far from the data too
    assert same < 0.1 * fid_shapes(model, a, a[:1].expand_as(a))


def test_fid_falls_as_the_images_approach_the_data(judge):
    """The reverse process in one picture: x = sqrt(abar) x_0 + sqrt(1 - abar) eps with abar rising to 1,
    as a sampler (or a model during training) gets closer to the data. FID-shapes must fall all the way."""
    model = judge[0]
    reference, x0 = real(2, 3), real(2, 4)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    fids = [fid_shapes(model, reference, math.sqrt(abar) * x0 + math.sqrt(1 - abar) * eps)
            for abar in (0.0, 0.3, 0.7, 0.9, 0.97, 0.995, 1.0)]
    assert all(later < earlier for earlier, later in zip(fids, fids[1:])), fids
    assert fids[-1] < 0.05 * fids[0]


def test_is_shapes_is_high_for_real_shapes_and_one_for_a_single_image(judge):
    model = judge[0]
    a = real(2, 5)
    assert is_shapes(model, a)[0] > 45  # at most 90: confident and every class used
    assert is_shapes(model, a[:1].expand(40, -1, -1, -1))[0] == pytest.approx(1.0, abs=1e-6)
    assert is_shapes(model, a[:90])[0] < 0.6 * is_shapes(model, a)[0]  # half the classes (mode dropping): IS <= 45


def test_save_load_and_cache(judge, tmp_path, monkeypatch):
    model = judge[0]
    path = save_feature_net(tmp_path / "feature_net.pt", model, {"accuracy": 1.0})
    loaded = load_feature_net(path)
    images = real(1, 6)[:10]
    assert torch.equal(embed(model, images)[0], embed(loaded, images)[0])
    monkeypatch.setattr("minildm.feature_net.train_feature_net", lambda *a, **k: pytest.fail("trained again"))
    assert isinstance(load_or_train_feature_net(path), ShapesFeatureNet)  # the cache is used
    save_checkpoint(tmp_path / "other.pt", "clip", {"weights": {}})
    with pytest.raises(CheckpointError, match="'feature-net' checkpoint was expected"):
        load_feature_net(tmp_path / "other.pt")


# ----------------------------------------------------------------------------------------------------------
# The evaluation table, on stand-in "models" that draw real shapes
# ----------------------------------------------------------------------------------------------------------
class DrawsShapes:
    """A perfect stand-in for LatentDiffusion.generate: real renders of the prompt's combination (or, with
    ignore_prompt, of another combination: perfect images, wrong content). Same seed -> same images."""

    def __init__(self, ignore_prompt: bool = False):
        self.ignore_prompt = ignore_prompt

    def generate(self, prompts, steps=50, guidance_scale=3.0, sampler="ddim", eta=0.0, seed=0):
        combos = [shapes.parse_caption(p) for p in prompts]
        if self.ignore_prompt:
            combos = [shapes.ALL_COMBOS[(shapes.ALL_COMBOS.index(c) + 45) % 90] for c in combos]
        return (shapes.render_combos(combos, np.random.default_rng(1000 + seed)) + 1) / 2


def test_a_perfect_model_scores_like_real_shapes_and_fid_is_prompt_blind(judge):
    model = judge[0]
    reference = evaluate.real_reference(model, n=1)
    perfect = evaluate.evaluation_report(DrawsShapes(), model, n=1, progress=False)
    blind = evaluate.evaluation_report(DrawsShapes(ignore_prompt=True), model, n=1, progress=False)
    assert perfect["images"] == blind["images"] == 90
    assert perfect["seen"]["all"] == 1.0 and perfect["held_out"]["all"] == 1.0
    assert blind["seen"]["all"] == 0.0 and blind["held_out"]["all"] == 0.0
    # FID and IS never look at the prompts: drawing the wrong shapes well scores as well as drawing the right ones
    for report in (perfect, blind):
        assert report["fid_shapes"] < 2 * reference["fid_shapes"]
        assert report["is_shapes"] > 0.8 * reference["is_shapes"]
        assert report["clip_t"] is None
    table = evaluate.format_evaluation({"real shapes": reference, "perfect": perfect})
    assert "| FID-shapes (lower is better) |" in table and "| CLIP-T (higher) | - | - |" in table
    assert "| prompt accuracy, seen (80 prompts) | 1.000 | 1.000 |" in table


def test_the_old_prompt_accuracy_report_still_works():
    report = evaluate.prompt_accuracy_report(DrawsShapes(), n=1, progress=False)
    assert report["seen"]["samples"] == 80 and report["held_out"]["samples"] == 10
    assert report["seen"]["all"] == 1.0
    assert "**1.000**" in evaluate.format_report(report)


def test_evaluate_cli_explains_a_missing_run(tmp_path, capsys):
    assert evaluate.main(["--run", str(tmp_path / "nothing")]) == 2
    assert "train.py" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# Diagnostics: closed forms on a micro pipeline with stand-in UNets
# ----------------------------------------------------------------------------------------------------------
class OracleUNet(nn.Module):
    """Knows the clean latents z0 [B, c, h, w]: returns the true noise eps = (x_t - sqrt(abar_t) z0) / sqrt(1 - abar_t)
    (scale = 1), or zeros (scale = 0). The loss is then 0, or E[eps^2] = 1, at every t."""

    def __init__(self, schedule: NoiseSchedule, z0: torch.Tensor, scale: float):
        super().__init__()
        self.schedule, self.z0, self.scale = schedule, z0, scale
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x_t, t, context, mask):
        if self.scale == 0:
            return torch.zeros_like(x_t)
        return self.schedule.predict_eps(x_t, t, self.z0).float()


def micro_pipe(images: torch.Tensor, scale: float) -> LatentDiffusion:
    preset = micro()
    torch.manual_seed(0)
    autoencoder = VQVAE(preset.vq).eval().requires_grad_(False)
    autoencoder.scale_factor.fill_(2.0)
    tokenizer = Tokenizer.build([" ".join(shapes.VOCAB_WORDS)], max_len=preset.text.max_len)
    text = PromptEncoder(replace(preset.text, vocab_size=tokenizer.vocab_size))
    schedule = NoiseSchedule(**preset.schedule)
    with torch.no_grad():
        z0 = autoencoder.encode(images) * autoencoder.scale_factor
    return LatentDiffusion(autoencoder, tokenizer, text, OracleUNet(schedule, z0, scale), schedule, 32).eval()


def test_diagnostics_closed_forms(tmp_path):
    images, captions = diagnostics.fresh_shapes(64)
    pipe = micro_pipe(images, scale=0.0)
    stats = diagnostics.latent_stats(pipe.autoencoder, images, tmp_path / "latents.png")
    assert stats["std"] == pytest.approx(2.0 * stats["std_z"], rel=1e-5)  # std(z * scale) = scale std(z)
    assert (tmp_path / "latents.png").is_file()

    zero = diagnostics.loss_by_timestep(pipe, images, captions, buckets=4, out=tmp_path / "loss.png")
    assert zero["edges"] == [0, 250, 500, 750, 1000]
    assert np.allclose(zero["cond"], 1.0, atol=0.05) and zero["cond"] == zero["uncond"]  # predicting 0: E eps^2 = 1

    x0 = diagnostics.x0_predictions(pipe, images[:3], captions[:3], timesteps=(10, 500, 990))
    abar = pipe.schedule.alphas_cumprod[[10, 500, 990]]
    assert np.allclose(x0["mse"], ((1 - abar) / abar).numpy() * np.array(x0["eps_mse"]), rtol=1e-4)  # x0 error = eps error scaled

    oracle = micro_pipe(images[:3], scale=1.0)
    x0 = diagnostics.x0_predictions(oracle, images[:3], captions[:3], timesteps=(10, 500, 990), out=tmp_path / "x0.png")
    assert x0["t"] == [10, 500, 990] and max(x0["mse"]) < 1e-4  # the true eps gives back z0 exactly (Property 3)
    assert diagnostics.loss_by_timestep(oracle, images[:3], captions[:3], buckets=2)["cond"] == pytest.approx([0, 0], abs=1e-8)
    assert (tmp_path / "loss.png").is_file() and (tmp_path / "x0.png").is_file()


def test_fid_falls_as_a_model_trains(judge, tmp_path):
    """A real micro LDM after 2 and after 300 steps on one micro autoencoder. The LDM learns the distribution
    of that autoencoder's latents, so FID-shapes is measured against the autoencoder's reconstructions of
    real shapes: it must fall several-fold (measured 122 -> 10). Against real shapes it would not: a micro
    autoencoder loses colour (its reconstructions alone score ~250), a floor no LDM can go below."""
    import shutil

    from minildm.pipeline import load_autoencoder
    from minildm.train.autoencoder import train_autoencoder
    from minildm.train.ldm import train_ldm

    preset = micro()
    preset.vq_train = replace(preset.vq_train, steps=60)
    preset.ldm = replace(preset.ldm, lr=3e-3, warmup=10)
    early, late = tmp_path / "early", tmp_path / "late"
    train_autoencoder(preset, early, torch.device("cpu"), show_progress=False)
    shutil.copytree(early, late)
    train_ldm(preset, early, torch.device("cpu"), steps=2, show_progress=False)
    train_ldm(preset, late, torch.device("cpu"), steps=300, show_progress=False)
    autoencoder = load_autoencoder(early)
    with torch.no_grad():
        reference = autoencoder.decode(autoencoder.encode(real(1, 7))).clamp(-1, 1)  # what the LDM can reach
    fids, inception = [], []
    for run in (early, late):
        images, _ = evaluate.generate_split(LatentDiffusion.load(run), shapes.ALL_COMBOS, 1, steps=10, progress=False)
        fids.append(fid_shapes(judge[0], reference, images * 2 - 1))
        inception.append(is_shapes(judge[0], images * 2 - 1)[0])
    assert fids[1] < 0.3 * fids[0], fids
    assert inception[1] > inception[0], inception


def test_the_feature_net_trains_inside_a_callers_no_grad():
    """The evaluation trains its judge on first use, often from code that samples under torch.no_grad()."""
    from minildm.feature_net import train_feature_net

    with torch.no_grad():
        model, log = train_feature_net(steps=2, batch_size=8, progress=False)
    assert len(log.history["loss"]) == 2 and not model.training
