"""The one training loop (train/common.py: fit) and every stage that trains through it.

For each stage, a Ctrl-C (a KeyboardInterrupt raised from inside its loss function) must save a checkpoint at
the step reached, in the stage's ordinary format with the optimiser state; --resume must then continue to the
end, and the result must equal an uninterrupted run bit for bit (every batch comes from step_rng(seed, step),
so a resumed run sees exactly the batches it would have). Two stages draw from torch's global generator, which
a checkpoint does not hold, and resume to the same format and step count but not the same bits: the autoencoder
(the VQ-VAE's codebook initialisation and dead-code restarts; the KL autoencoder resumes exactly) and the body
VAE (its reparameterisation noise).
"""
import shutil
from dataclasses import replace

import pytest
import torch

from minildm.adapters.body_vae import BodyVAE, BodyVAEConfig
from minildm.adapters.keypoint_regressor import KeypointRegressor
from minildm.autoencoder.losses import VQGANLoss
from minildm.checkpoint import load_checkpoint
from minildm.config import micro, with_kl_autoencoder
from minildm.data.body_render import BodiesDataset, render_identities
from minildm.pipeline import LatentDiffusion
from minildm.train import body_adapter, clip as clip_stage, ip_adapter, ldm, lora
from minildm.train.autoencoder import train_autoencoder
from minildm.train.body import ADAPTER_FILE, body_stage_config, train_body_stage
from minildm.train.body_models import train_body_vae, train_keypoint_regressor
from minildm.train.clip import train_clip_stage
from minildm.train.common import EMA, Checkpoint, fit
from minildm.train.ip_adapter import IPAdapterTrainConfig, train_ip_adapter
from minildm.train.ldm import train_ldm
from minildm.train.lora import finetune_concept, lora_train_config

CPU = torch.device("cpu")
STOP = 3  # the loss function raises on its 3rd call: steps 0 and 1 are done, the checkpoint says step 2
TIMES = {"seconds", "train_seconds", "train_cpu_seconds", "base"}  # wall-clock entries and the base run's path


def interrupt_on_call(monkeypatch, owner, name, n=STOP):
    """Make owner.name raise KeyboardInterrupt on its n-th call (as Ctrl-C in the middle of a step would)."""
    original, calls = getattr(owner, name), [0]

    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapped)


def assert_same(a, b, where=""):
    """Two checkpoint entries equal: tensors bit for bit, everything else ==, wall-clock entries skipped."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) - TIMES == set(b) - TIMES, (where, set(a) ^ set(b))
        for k in set(a) - TIMES:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def stop_and_resume(monkeypatch, tmp_path, train_fn, owner, name, kind, exact=True):
    """train_fn(out_dir, resume) -> checkpoint path. Stop one run at STOP, resume it, compare with an unbroken run."""
    reference = load_checkpoint(train_fn(tmp_path / "ref", False), kind)
    with monkeypatch.context() as mp:
        interrupt_on_call(mp, owner, name)
        path = train_fn(tmp_path / "cut", False)
    stopped = load_checkpoint(path, kind)
    assert stopped["step"] == STOP - 1 and "optimizer" in stopped  # saved at the step reached, resumable
    assert set(stopped) == set(reference) | {"optimizer"}  # the stage's one format
    key = "loss" if "loss" in reference["log"] else next(iter(reference["log"]))
    logged = [s for s, _ in reference["log"][key]]
    assert [s for s, _ in stopped["log"].get(key, [])] == [s for s in logged if s < STOP]
    resumed = load_checkpoint(train_fn(tmp_path / "cut", True), kind)
    assert resumed["step"] == reference["step"]
    assert [s for s, _ in resumed["log"][key]] == logged  # each step logged once, none lost
    if exact:
        assert_same(resumed, reference)
    return reference, resumed


# ----------------------------------------------------------------------------------------------------------
# The loop itself
# ----------------------------------------------------------------------------------------------------------
def test_parameter_groups_train_at_lr_scale_times_their_own_peak():
    """Adam's first step moves every weight by lr * g / |g| = lr: a group with lr_scale s by s * lr, a group with
    its own peak_lr by that."""
    a, b, c = (torch.nn.Parameter(torch.zeros(3)) for _ in range(3))
    opt = torch.optim.Adam([{"params": [a]}, {"params": [b], "lr_scale": 0.1}, {"params": [c], "peak_lr": 0.03}])
    loss = lambda step: (sum((p - 1).pow(2).sum() for p in (a, b, c)), {})  # noqa: E731
    run = fit(loss, opt, 1, Checkpoint(None, "t", dict), lr=0.01, show_progress=False)
    assert run.finished and run.step == 1
    for p, moved in ((a, 0.01), (b, 0.001), (c, 0.03)):
        assert torch.allclose(p.detach(), torch.full((3,), moved), atol=1e-7)


def test_check_hook_sees_every_loss_and_can_stop_the_run():
    w = torch.nn.Parameter(torch.ones(1))
    seen = []

    def check(step, loss):
        seen.append((step, loss.item()))
        if step == 2:
            raise FloatingPointError("diverged")

    with pytest.raises(FloatingPointError):
        fit(lambda step: (w.pow(2).sum(), {}), torch.optim.SGD([w], lr=0.1), 5, Checkpoint(None, "t", dict),
            check=check, show_progress=False)
    assert [s for s, _ in seen] == [0, 1, 2] and seen[1][1] < seen[0][1]


def test_checkpoint_cadence_and_a_finished_file_without_optimizer(tmp_path):
    w = torch.nn.Parameter(torch.ones(1))
    saves = []
    ckpt = Checkpoint(tmp_path / "w.pt", "w", lambda: saves.append(1) or {"w": w.detach().clone()}, every=2,
                      keep_optimizer=False)
    run = fit(lambda step: (w.pow(2).sum(), {"loss": w.item()}), torch.optim.SGD([w], lr=0.1), 5, ckpt,
              show_progress=False)
    assert len(saves) == 3  # steps 2 and 4, and the end
    state = load_checkpoint(tmp_path / "w.pt", "w")
    assert state["step"] == 5 and "optimizer" not in state and len(state["log"]["loss"]) == 5
    assert run.log.history["loss"][-1][0] == 5


def test_a_last_step_on_the_cadence_is_saved_once(tmp_path):
    """steps = 4, every = 2: saves at step 2 and at the end, not twice at step 4."""
    w = torch.nn.Parameter(torch.ones(1))
    saves = []
    ckpt = Checkpoint(tmp_path / "w.pt", "w", lambda: saves.append(1) or {"w": w.detach().clone()}, every=2)
    fit(lambda step: (w.pow(2).sum(), {}), torch.optim.SGD([w], lr=0.1), 4, ckpt, show_progress=False)
    assert len(saves) == 2


def test_fit_trains_inside_a_callers_no_grad(tmp_path):
    """A benchmark may sample under torch.no_grad() and then train: fit turns gradients back on for its loop."""
    w = torch.nn.Parameter(torch.ones(1))
    with torch.no_grad():
        fit(lambda step: (w.pow(2).sum(), {}), torch.optim.SGD([w], lr=0.1), 3,
            Checkpoint(tmp_path / "w.pt", "w", lambda: {"w": w.detach().clone()}), show_progress=False)
    assert w.item() == pytest.approx(0.8 ** 3)


def test_ema_is_the_exponential_average_with_its_warm_up():
    """theta_ema <- d theta_ema + (1 - d) theta, d = min(decay, (1 + step) / (10 + step)); buffers copied."""
    model = torch.nn.BatchNorm1d(3)  # a weight, a bias and running-statistics buffers
    ema = EMA(model, decay=0.9)
    expected = model.weight.detach().clone()
    for step in range(20):
        with torch.no_grad():
            model.weight.add_(torch.randn(3))
            model.running_mean.add_(1.0)
        ema.update(model, step)
        d = min(0.9, (1 + step) / (10 + step))
        expected = d * expected + (1 - d) * model.weight.detach()
        assert torch.allclose(ema.model.weight, expected, atol=1e-6), step
    assert torch.equal(ema.model.running_mean, model.running_mean)
    assert not ema.model.weight.requires_grad


# ----------------------------------------------------------------------------------------------------------
# Every stage: Ctrl-C saves, --resume continues to the same result
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def preset():
    return micro()


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, preset):
    run = tmp_path_factory.mktemp("base")
    train_autoencoder(preset, run, CPU, show_progress=False)
    train_ldm(preset, run, CPU, show_progress=False)
    train_clip_stage(run, CPU, steps=2, batch_size=8, show_progress=False)
    return run


def test_autoencoder_stops_and_resumes(monkeypatch, tmp_path, preset):
    def train_fn(out, resume):
        return train_autoencoder(preset, out, CPU, resume=resume, steps=5, show_progress=False)

    reference, resumed = stop_and_resume(monkeypatch, tmp_path, train_fn, VQGANLoss, "generator_loss", "autoencoder",
                                         exact=False)
    assert resumed["summary"]["steps"] == 5 and set(resumed["summary"]) == set(reference["summary"])


def test_kl_autoencoder_stops_and_resumes_bit_for_bit(monkeypatch, tmp_path, preset):
    """The KL autoencoder draws its posterior noise from each step's generator, not torch's global one: exact."""
    kl_preset = with_kl_autoencoder(preset)

    def train_fn(out, resume):
        return train_autoencoder(kl_preset, out, CPU, resume=resume, steps=5, show_progress=False)

    reference, _ = stop_and_resume(monkeypatch, tmp_path, train_fn, VQGANLoss, "generator_loss", "autoencoder")
    assert reference["first_stage"] == "kl" and reference["summary"]["steps"] == 5


def test_ldm_stops_and_resumes_bit_for_bit(monkeypatch, tmp_path, preset, base_run):
    def train_fn(out, resume):
        out.mkdir(exist_ok=True)
        shutil.copy(base_run / "autoencoder.pt", out / "autoencoder.pt")
        return train_ldm(preset, out, CPU, resume=resume, steps=5, show_progress=False)

    stop_and_resume(monkeypatch, tmp_path, train_fn, ldm, "diffusion_loss", "ldm")


def test_lora_stops_and_resumes_bit_for_bit(monkeypatch, tmp_path, preset, base_run):
    cfg = replace(lora_train_config(preset), steps=4)

    def train_fn(out, resume):
        path = out / "lora_corner.pt"
        finetune_concept(LatentDiffusion.load(base_run), "corner", cfg, CPU, False, path, resume)
        return path

    reference, _ = stop_and_resume(monkeypatch, tmp_path, train_fn, lora, "diffusion_loss", "lora")
    assert "optimizer" not in reference  # a finished adapter file is small


def test_clip_stops_and_resumes_bit_for_bit(monkeypatch, tmp_path):
    def train_fn(out, resume):
        return train_clip_stage(out, CPU, steps=4, batch_size=8, show_progress=False, resume=resume)[0]

    stop_and_resume(monkeypatch, tmp_path, train_fn, clip_stage, "clip_loss", "clip")


def test_ip_adapter_stops_and_resumes_bit_for_bit(monkeypatch, tmp_path, base_run):
    cfg = replace(IPAdapterTrainConfig(), steps=4, batch_size=8, cache_size=32, preview_steps=0)

    def train_fn(out, resume):
        out.mkdir(exist_ok=True)
        shutil.copy(base_run / "clip.pt", out / "clip.pt")
        return train_ip_adapter(base_run, CPU, out_dir=out, cfg=cfg, show_progress=False, resume=resume)

    stop_and_resume(monkeypatch, tmp_path, train_fn, ip_adapter, "diffusion_loss", "ip-adapter")


@pytest.fixture(scope="module")
def views():
    return render_identities(BodiesDataset(3, 3, 32, seed=0))


def test_keypoint_regressor_stops_and_resumes_bit_for_bit(monkeypatch, tmp_path, views):
    def train_fn(out, resume):
        path = out / "regressor.pt"
        train_keypoint_regressor(views, steps=4, batch_size=4, path=path, resume=resume, show_progress=False)
        return path

    stop_and_resume(monkeypatch, tmp_path, train_fn, KeypointRegressor, "loss", "keypoint-regressor")


def test_body_vae_stops_and_resumes(monkeypatch, tmp_path, views):
    cfg = BodyVAEConfig(image_size=32, channels=(8, 16), feature_dim=16, latent_dim=8, keypoint_sigma=1.5)

    def train_fn(out, resume):
        path = out / "vae.pt"
        train_body_vae(cfg, views, steps=4, batch_size=2, path=path, resume=resume, show_progress=False)
        return path

    stop_and_resume(monkeypatch, tmp_path, train_fn, BodyVAE, "loss", "body-vae", exact=False)


def test_body_adapter_stops_and_resumes_bit_for_bit(monkeypatch, tmp_path):
    """The whole body stage once; then only its adapter again, stopped and resumed (the other steps are done)."""
    cfg = replace(body_stage_config("micro"), adapter_steps=4, preview_steps=0)
    assert train_body_stage(tmp_path / "ref", CPU, cfg, show_progress=False)
    shutil.copytree(tmp_path / "ref", tmp_path / "cut")
    (tmp_path / "cut" / ADAPTER_FILE).unlink()

    def train_fn(out, resume):
        train_body_stage(out, CPU, cfg, resume=True, show_progress=False)  # resume skips the finished steps
        return out / ADAPTER_FILE

    reference = load_checkpoint(tmp_path / "ref" / ADAPTER_FILE, "body-adapter")
    with monkeypatch.context() as mp:
        interrupt_on_call(mp, body_adapter, "bolid_loss")
        assert not train_body_stage(tmp_path / "cut", CPU, cfg, resume=True, show_progress=False)
    stopped = load_checkpoint(tmp_path / "cut" / ADAPTER_FILE, "body-adapter")
    assert stopped["step"] == STOP - 1 and "optimizer" in stopped
    assert train_body_stage(tmp_path / "cut", CPU, cfg, resume=True, show_progress=False)
    assert_same(load_checkpoint(tmp_path / "cut" / ADAPTER_FILE, "body-adapter"), reference)
