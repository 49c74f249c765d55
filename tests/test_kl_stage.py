"""The KL autoencoder through the autoencoder stage: its loss term, training, the scale factor, the latent cache,
a run the pipeline loads and samples from, train.py's --autoencoder kl, and a checkpoint of the other kind.
(Ctrl-C and --resume: tests/test_training_loop.py.)"""
from dataclasses import replace

import pytest
import torch

import train
from minildm.autoencoder.kl import AutoencoderKL
from minildm.autoencoder.losses import VQGANLoss, VQGANLossConfig
from minildm.autoencoder.vqvae import VQVAE
from minildm.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from minildm.config import micro, with_kl_autoencoder
from minildm.data import shapes
from minildm.pipeline import LatentDiffusion, load_autoencoder
from minildm.progress import step_rng
from minildm.train.autoencoder import train_autoencoder
from minildm.train.ldm import encode_latent_cache, train_ldm

CPU = torch.device("cpu")


def kl_micro(steps: int = 6):
    p = with_kl_autoencoder(micro())
    p.vq_train = replace(p.vq_train, steps=steps, batch_size=8, eval_images=16, log_every=1)
    p.ldm = replace(p.ldm, steps=2, batch_size=8, cache_size=32)
    return p


def test_kl_term_is_ldms_weight_per_image_over_its_pixel_values():
    """L = mean|x - x_rec| + (w_kl / 3HW) mean_b KL_b: LDM sums |x - x_rec| over the image, we average it, so
    w_kl divides by the image's 3HW values (1e-6 straight on the mean would be 3HW = 3072 times LDM's weight)."""
    losses = VQGANLoss(VQGANLossConfig.tiny())
    x, x_rec = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    kl = torch.tensor(5000.0)
    loss, logs = losses.generator_loss(x, x_rec, kl, 0, torch.zeros(1), regularizer="kl")
    l1 = (x - x_rec).abs().mean()
    assert torch.allclose(loss, l1 + 1e-6 * 5000.0 / 3072) and logs["kl"] == 5000.0 and "vq" not in logs
    summed = (x - x_rec).abs().sum() / 2 + 1e-6 * kl  # CompVis' form (logvar 0): the same objective times 3HW
    assert torch.allclose(summed / 3072, loss)


def test_kl_stage_lowers_the_loss_and_stores_1_over_std_of_posterior_samples(tmp_path):
    preset = kl_micro(steps=20)
    path = train_autoencoder(preset, tmp_path, CPU, show_progress=False)
    state = load_checkpoint(path, "autoencoder")
    assert state["first_stage"] == "kl" and state["step"] == 20
    l1 = [v for _, v in state["log"]["l1"]]
    assert len(l1) == 20 and l1[-1] < 0.75 * l1[0]  # measured 0.63 from 1.01
    assert {"psnr", "kl", "posterior_std"} <= set(state["summary"]) and "usage" not in state["summary"]
    # scale_factor = 1 / std(z), z ~ q(z|x) on the stage's measuring batches, with its fixed generator
    model = load_autoencoder(tmp_path)
    assert isinstance(model, AutoencoderKL) and model.scale_factor == state["scale_factor"]
    data = [shapes.sample_batch(256, step_rng(0, i, stream=3), split="train", size=32)[0] for i in range(4)]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        z = torch.cat([model.encode(x).sample(gen).flatten() for x in data]).double()
    assert abs(state["scale_factor"] - 1 / z.std().item()) < 1e-5 * state["scale_factor"]
    assert state["config"]["scale_factor"] == state["scale_factor"]
    assert preset.kl.scale_factor == 1.0  # the measured scale went into the model's copy, not into the preset


@pytest.fixture(scope="module")
def kl_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("kl_run")
    preset = kl_micro()
    train_autoencoder(preset, run, CPU, show_progress=False)
    train_ldm(preset, run, CPU, show_progress=False)
    return run


def test_latent_cache_holds_scaled_posterior_samples(kl_run):
    """LDM's diffusion model trains on z ~ q(z|x), not on the mean: cache = s (mu + sigma n), n from the seed."""
    ae = load_autoencoder(kl_run)
    x = torch.rand(5, 3, 32, 32) * 2 - 1
    cache = encode_latent_cache(ae, x, batch_size=2, show_progress=False, seed=3)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        expected = torch.cat([ae.encode(x[i:i + 2]).sample(gen) for i in range(0, 5, 2)]) * ae.scale_factor
        mean = ae.encode(x).mode() * ae.scale_factor
    assert torch.allclose(cache, expected, atol=1e-6) and not torch.allclose(cache, mean, atol=1e-3)


def test_pipeline_loads_a_kl_run_and_generates_the_same_image_twice(kl_run):
    assert load_checkpoint(kl_run / "ldm.pt", "ldm")["step"] == 2
    pipe = LatentDiffusion.load(kl_run)
    assert isinstance(pipe.autoencoder, AutoencoderKL) and pipe.latent_shape() == (4, 8, 8)
    a = pipe.generate(["a red circle on the left"], steps=3, guidance_scale=3.0, seed=1)
    b = pipe.generate(["a red circle on the left"], steps=3, guidance_scale=3.0, seed=1)
    c = pipe.generate(["a red circle on the left"], steps=3, guidance_scale=3.0, seed=2)
    assert a.shape == (1, 3, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)


def test_a_checkpoint_of_the_other_kind_is_refused_in_one_sentence(tmp_path):
    vq_run, kl_run = tmp_path / "vq", tmp_path / "kl"
    save_checkpoint(vq_run / "autoencoder.pt", "autoencoder", {"config": {}, "model": {}, "step": 1, "log": {}})
    with pytest.raises(CheckpointError, match=r"holds a VQ autoencoder but this run trains a KL one: resume with"):
        train_autoencoder(kl_micro(), vq_run, CPU, resume=True, show_progress=False)  # no "first_stage": a VQ file
    save_checkpoint(kl_run / "autoencoder.pt", "autoencoder", {"first_stage": "kl", "config": {}, "model": {},
                                                               "step": 1, "log": {}})
    p = micro()
    with pytest.raises(CheckpointError, match=r"holds a KL autoencoder but this run trains a VQ one"):
        train_autoencoder(p, kl_run, CPU, resume=True, show_progress=False)
    save_checkpoint(kl_run / "autoencoder.pt", "autoencoder", {"first_stage": "gan", "config": {}, "model": {}})
    with pytest.raises(CheckpointError, match="reads 'vq' and 'kl'"):
        load_autoencoder(kl_run)


def test_train_py_autoencoder_kl_and_its_bad_combinations(tmp_path, capsys):
    assert train.main(["--preset", "micro", "--stage", "autoencoder", "--autoencoder", "kl", "--steps", "2",
                       "--out", str(tmp_path)]) == 0
    assert isinstance(load_autoencoder(tmp_path), AutoencoderKL)
    vq_out = str(tmp_path / "vq")
    assert train.main(["--preset", "micro", "--stage", "autoencoder", "--steps", "1", "--out", vq_out]) == 0
    assert isinstance(load_autoencoder(tmp_path / "vq"), VQVAE)  # the default stays the VQ-VAE
    for argv, words in ((["--stage", "ldm", "--autoencoder", "kl"], "--stage ldm uses the run's autoencoder.pt"),
                        (["--dry-run", "--autoencoder", "kl"], "--dry-run sizes the VQ-VAE stage only")):
        with pytest.raises(SystemExit) as e:
            train.main(argv)
        assert e.value.code == 2 and words in capsys.readouterr().err

