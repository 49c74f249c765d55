"""sample.py and LatentDiffusion.generate under bad input and faults: one sentence, a non-zero exit, and no
finished image lost. Per-image seeds: an image depends on its prompt and seed only, never on its batch."""
import errno
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

import sample
from minildm.checkpoint import load_checkpoint, save_checkpoint
from minildm.config import micro
from minildm.data.images import read_image
from minildm.pipeline import LatentDiffusion
from minildm.train.autoencoder import train_autoencoder
from minildm.train.ldm import train_ldm

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    p = micro()
    p.vq_train = replace(p.vq_train, steps=4, batch_size=8, eval_images=16, save_every=0)
    p.ldm = replace(p.ldm, steps=4, batch_size=8, cache_size=32, save_every=0)
    train_autoencoder(p, run, CPU, show_progress=False)
    train_ldm(p, run, CPU, show_progress=False)
    return run


def cli(run, *args):
    return sample.main([*args, "--run", str(run), "--steps", "2"])


def png(path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(int)


# ---------------------------------------------------------------- per-image seeds
@pytest.mark.parametrize("sampler, eta", [("ddim", 0.0), ("ddim", 1.0)])
def test_an_image_does_not_depend_on_its_batch_neighbours(run, sampler, eta):
    pipe = LatentDiffusion.load(run)
    kw = dict(steps=3, guidance_scale=3.0, sampler=sampler, eta=eta)
    batch = pipe.generate(["a red circle on the left", "a blue square on the top", ""], seed=10, **kw)
    for i, prompt in enumerate(["a red circle on the left", "a blue square on the top", ""]):
        alone = pipe.generate([prompt], seed=10 + i, **kw)  # image i of a batch is seed + i
        assert torch.allclose(alone[0], batch[i], atol=1e-5)
    other = pipe.generate(["a blue square on the top", "a red circle on the left"], seed=[11, 10], **kw)
    assert torch.allclose(other[1], batch[0], atol=1e-5) and not torch.allclose(batch[0], batch[1], atol=1e-3)


def test_sample_cli_one_picture_of_a_grid_alone_and_batch_size_changes_nothing(run, tmp_path):
    assert cli(run, "a red circle on the left", "a blue square on the top", "--n", "3", "--seed", "7",
               "--out", str(tmp_path / "grid.png")) == 0
    assert cli(run, "a red circle on the left", "a blue square on the top", "--n", "3", "--seed", "7",
               "--batch-size", "2", "--out", str(tmp_path / "grid_b2.png")) == 0
    assert cli(run, "a blue square on the top", "--n", "1", "--seed", "9", "--out", str(tmp_path / "one.png")) == 0
    grid, one = png(tmp_path / "grid.png"), png(tmp_path / "one.png")
    assert np.abs(grid - png(tmp_path / "grid_b2.png")).max() <= 1  # float rounding of another batch shape
    side = one.shape[0] - 4  # the tile is the image without the 2-pixel border
    r, c = 1, 2  # row 1 = the second prompt, column 2 = seed 7 + 2
    tile = grid[2 + r * (side + 2): 2 + r * (side + 2) + side, 2 + c * (side + 2): 2 + c * (side + 2) + side]
    assert np.abs(tile - one[2:-2, 2:-2]).max() <= 1


# ---------------------------------------------------------------- output path checked before sampling
@pytest.fixture
def no_sampling(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("sampled although the output path was bad")
    monkeypatch.setattr(LatentDiffusion, "generate", fail)


def test_out_with_a_wrong_suffix_is_refused_before_sampling(run, tmp_path, capsys, no_sampling):
    assert cli(run, "a red circle", "--out", str(tmp_path / "grid.txt")) == 2
    err = capsys.readouterr().err
    assert "not a .png file name" in err and err.count("\n") == 1


def test_out_folder_gets_the_default_name(run, tmp_path):
    folder = tmp_path / "pictures"
    assert cli(run, "a red circle", "--n", "1", "--out", str(folder) + "/") == 0
    assert [p.name for p in folder.iterdir()] == ["a-red-circle_seed0.png"]
    assert cli(run, "a red circle", "--n", "1", "--seed", "3", "--out", str(folder)) == 0  # an existing folder
    assert (folder / "a-red-circle_seed3.png").is_file()


def test_unwritable_out_is_refused_before_sampling(run, tmp_path, capsys, monkeypatch, no_sampling):
    def read_only(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(sample.tempfile, "NamedTemporaryFile", read_only)
    assert cli(run, "a red circle", "--out", str(tmp_path / "ro" / "grid.png")) == 2
    err = capsys.readouterr().err
    assert "cannot write into" in err and "Permission denied" in err and "choose another --out" in err


def test_a_grid_too_large_for_memory_is_refused_up_front(run, capsys, no_sampling):
    assert cli(run, "a red circle", "--n", str(10**9)) == 2
    err = capsys.readouterr().err
    assert "GB, more than half the free memory" in err and "ask for at most" in err


def test_a_failed_write_after_sampling_keeps_the_images(run, tmp_path, capsys, monkeypatch):
    import minildm.viz
    real = minildm.viz.save_grid

    def disk_full(images, path, **kw):
        if tmp_path / "full" in path.parents:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(images, path, **kw)
    monkeypatch.setattr(minildm.viz, "save_grid", disk_full)
    monkeypatch.setattr(sample.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    assert cli(run, "a red circle", "--n", "2", "--out", str(tmp_path / "full" / "grid.png")) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "saved to" in err
    assert png(tmp_path / "tmp" / "grid.png").shape[1] > 2 * 32  # both images are there


@pytest.mark.parametrize("fault, code", [(torch.OutOfMemoryError, 1), (KeyboardInterrupt, 130)])
def test_out_of_memory_or_ctrl_c_halfway_writes_the_finished_images(run, tmp_path, capsys, monkeypatch, fault, code):
    real, calls = LatentDiffusion.generate, []

    def second_batch_fails(self, prompts, **kw):
        calls.append(prompts)
        if len(calls) == 2:
            raise fault("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, prompts, **kw)
    monkeypatch.setattr(LatentDiffusion, "generate", second_batch_fails)
    assert cli(run, "a red circle", "--n", "3", "--batch-size", "2", "--out", str(tmp_path / "g.png")) == code
    err = capsys.readouterr().err
    assert "The 2 images finished before are in" in err
    if fault is torch.OutOfMemoryError:
        assert "lower --batch-size (now 2)" in err
    assert (tmp_path / "g_partial.png").is_file() and not (tmp_path / "g.png").exists()


# ---------------------------------------------------------------- arguments
@pytest.mark.parametrize("args, message", [
    (["--guidance", "nan"], "--guidance must be a finite number"),
    (["--guidance", "inf"], "--guidance must be a finite number"),
    (["--eta", "nan"], "--eta must be a finite number"),
    (["--ip-lambda", "inf"], "--ip-lambda must be a finite number"),
    (["--seed", "4294967296", "--n", "1"], "--seed must lie in [0, 4294967295]"),
    (["--seed", str(2**64)], "--seed must lie in"),
    (["--seed", "-1"], "--seed must lie in"),
    (["--seed", "4294967295", "--n", "2"], "--seed must lie in [0, 4294967294]"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
])
def test_bad_numbers_are_one_sentence(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        sample.main(["a red circle", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_the_largest_seed_still_draws_its_own_image(run):
    pipe = LatentDiffusion.load(run)
    top = pipe.generate(["a red circle"], steps=2, seed=2**32 - 1)
    assert not torch.allclose(top, pipe.generate(["a red circle"], steps=2, seed=0))


@pytest.mark.parametrize("prompt", ["赤い丸", "🔴🟦", "ein roter Kreis"])
def test_a_prompt_with_no_known_word_is_said(run, tmp_path, prompt):
    with pytest.warns(UserWarning, match="has no word the model knows.*unconditional image"):
        assert cli(run, prompt, "--n", "1", "--out", str(tmp_path / "x.png")) == 0


# ---------------------------------------------------------------- checkpoints that cannot or do not belong
def copy_run(run, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(run, out)
    return out


def test_non_finite_weights_are_refused_at_sample_time(run, tmp_path, capsys):
    bad = copy_run(run, tmp_path)
    state = dict(load_checkpoint(bad / "ldm.pt"))
    state["ema"] = {k: v.clone() for k, v in state["ema"].items()}
    next(v for v in state["ema"].values() if v.is_floating_point()).fill_(float("nan"))
    torch.save(state, bad / "ldm.pt")  # written behind save_checkpoint's back, as by an older minildm
    assert cli(bad, "a red circle", "--out", str(tmp_path / "x.png")) == 2
    assert "holds NaN or inf" in capsys.readouterr().err and not (tmp_path / "x.png").exists()


def test_a_checkpoint_with_a_missing_field_is_one_sentence(run, tmp_path, capsys):
    bad = copy_run(run, tmp_path)
    state = dict(load_checkpoint(bad / "ldm.pt"))
    del state["tokenizer"]
    torch.save(state, bad / "ldm.pt")
    assert cli(bad, "a red circle", "--out", str(tmp_path / "x.png")) == 2
    err = capsys.readouterr().err
    assert "has no 'tokenizer' field" in err and "train that stage again" in err


def test_a_config_field_this_minildm_does_not_know_is_one_sentence(run, tmp_path, capsys):
    bad = copy_run(run, tmp_path)
    state = dict(load_checkpoint(bad / "ldm.pt"))
    state["unet_config"] = {**state["unet_config"], "warp_drive": True}
    torch.save(state, bad / "ldm.pt")
    assert cli(bad, "a red circle", "--out", str(tmp_path / "x.png")) == 2
    assert "does not fit this minildm's models" in capsys.readouterr().err


def test_an_autoencoder_from_another_run_is_refused(run, tmp_path, capsys):
    other = copy_run(run, tmp_path)
    state = dict(load_checkpoint(other / "autoencoder.pt"))
    state["model"] = {k: v + 1e-3 if v.is_floating_point() else v for k, v in state["model"].items()}
    save_checkpoint(other / "autoencoder.pt", "autoencoder", state)  # new weights -> new fingerprint
    assert cli(other, "a red circle", "--out", str(tmp_path / "x.png")) == 2
    assert "was trained on another autoencoder" in capsys.readouterr().err


def test_gaussian_noise_draws_each_image_from_its_own_generator():
    from minildm.diffusion.ddpm import gaussian_noise
    z = gaussian_noise(torch.empty(2, 4, 2, 2), [torch.Generator().manual_seed(s) for s in (3, 4)])
    assert torch.equal(z[1], torch.randn(4, 2, 2, generator=torch.Generator().manual_seed(4)))
    assert torch.equal(z[0], torch.randn(4, 2, 2, generator=torch.Generator().manual_seed(3)))
    with pytest.raises(ValueError, match="one generator per image: got 2 for a batch of 3"):
        gaussian_noise(torch.empty(3, 1), [torch.Generator(), torch.Generator()])


# ---------------------------------------------------------------- --sd --init-image: read by data/images.py, whole
@pytest.fixture
def fake_sd(monkeypatch):
    """sample.py --sd without weights: from_stable_diffusion hands back a stand-in whose generate records its
    arguments (what the CLI made of --init-image) and returns grey images of the asked size."""
    calls = []

    class FakeSD:
        def generate(self, prompts, **kwargs):
            calls.append(kwargs)
            init = kwargs["init_images"]
            return torch.full((len(prompts), 3, *init.shape[2:]), 0.5)

    def load(path, **kwargs):
        calls.append("loaded")
        return FakeSD()

    monkeypatch.setattr(LatentDiffusion, "from_stable_diffusion", load)
    return calls


def sd_cli(tmp_path, image, *args):
    return sample.main(["--sd", "weights.safetensors", "a cat", "--init-image", str(image), "--steps", "2",
                        "--out", str(tmp_path / "out.png"), *args])


def test_init_image_keeps_its_aspect_ratio(tmp_path, fake_sd, capsys):
    picture = np.random.default_rng(0).integers(0, 256, (30, 60, 3), dtype=np.uint8)  # h 30 x w 60
    Image.fromarray(picture).save(tmp_path / "wide.png")
    for args, size in [([], (512, 1024)),  # shorter side 512, the other follows
                       (["--height", "64"], (64, 128)), (["--width", "256"], (128, 256)),
                       (["--height", "192", "--width", "128"], (192, 128))]:  # both given: exactly that
        assert sd_cli(tmp_path, tmp_path / "wide.png", *args) == 0
        kwargs = fake_sd[-1]
        assert tuple(kwargs["init_images"].shape) == (1, 3, *size) and (kwargs["height"], kwargs["width"]) == size
        assert f"read whole at {size[0]}x{size[1]}" in capsys.readouterr().out
    Image.fromarray(picture[:, :30].copy()).save(tmp_path / "square.png")  # what the square reader sees, in [0, 1]
    assert sd_cli(tmp_path, tmp_path / "square.png", "--height", "64", "--width", "64") == 0
    assert torch.equal(fake_sd[-1]["init_images"][0],
                       torch.from_numpy(read_image(tmp_path / "square.png", 64)).permute(2, 0, 1) / 255)


def test_init_image_gets_the_treatment_of_every_image_input(tmp_path, fake_sd, capsys):
    grey = np.full((64, 64), 30000, np.uint16)  # 16 bits: 30000 >> 8 = 117
    Image.fromarray(grey).save(tmp_path / "g16.png")
    assert sd_cli(tmp_path, tmp_path / "g16.png", "--height", "64", "--width", "64") == 0
    assert torch.allclose(fake_sd[-1]["init_images"], torch.full((1, 3, 64, 64), 117 / 255))
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., :3] = (0, 255, 0)  # fully transparent green: shows as the white background
    Image.fromarray(rgba, "RGBA").save(tmp_path / "clear.png")
    assert sd_cli(tmp_path, tmp_path / "clear.png", "--height", "64", "--width", "64") == 0
    assert (fake_sd[-1]["init_images"] == 1).all()
    fake_sd.clear()
    capsys.readouterr()
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)  # a damaged file
    assert sd_cli(tmp_path, tmp_path / "broken.png") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot read") and "give a PNG or JPG file." in err and err.count("\n") == 1
    assert fake_sd == []  # said before loading the weights
    with pytest.raises(SystemExit):
        sample.main(["a cat", "--init-image", str(tmp_path / "g16.png")])  # no --sd: not silently ignored
    assert "--init-image (image-to-image) is for Stable Diffusion weights" in capsys.readouterr().err


@pytest.mark.parametrize("flags", [["--height", "64"], ["--width", "128"], ["--tokenizer", "tok"],
                                   ["--dtype", "float16"]])
def test_stable_diffusion_flags_without_sd_are_refused(flags, capsys):
    """A minildm run draws at its training size: --height and friends are not silently ignored."""
    with pytest.raises(SystemExit):
        sample.main(["a red circle", *flags])
    assert "apply to Stable Diffusion weights (--sd)" in capsys.readouterr().err


def test_generate_takes_its_size_from_the_init_images(run):
    pipe = LatentDiffusion.load(run)
    init = torch.rand(1, 3, pipe.image_size, 2 * pipe.image_size, generator=torch.Generator().manual_seed(0))
    images = pipe.generate(["a red circle"], steps=2, init_images=init, strength=0.5)
    assert images.shape == init.shape
    side = pipe.image_size
    with pytest.raises(ValueError, match=rf"init_images are {side}x{2 * side} but height x width asks for "
                                         rf"{side}x{side}"):
        pipe.generate(["a red circle"], steps=2, init_images=init, height=side, width=side)
    with pytest.raises(ValueError, match="height and width must be multiples of"):
        pipe.generate(["a red circle"], steps=2, init_images=init[..., :-pipe.size_multiple // 2])
