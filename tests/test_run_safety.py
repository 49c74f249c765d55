"""train.py at the edges: Ctrl-C and kill -9 (through a subprocess), a locked, read-only or finished run
directory, --resume with another preset or onto another autoencoder, --steps without --stage, divergence.
Every refusal: a non-zero exit, one sentence naming what is wrong and what to do, and no checkpoint lost."""
import errno
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import train
from minildm.checkpoint import load_checkpoint, save_checkpoint
from minildm.config import micro
from minildm.train.autoencoder import train_autoencoder
from minildm.train.divergence import DivergenceCheck, DivergenceError
from minildm.train.ldm import train_ldm
from minildm.train.run_dir import LOCK_FILE, RunDirError, RunLock, check_resume_fits, check_writable

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[1]
DEAD_PID = 2**22 + 12345  # above the default pid_max: no such process


def preset(steps=3):
    p = micro()
    p.vq_train = replace(p.vq_train, steps=steps, batch_size=8, eval_images=16, save_every=0)
    p.ldm = replace(p.ldm, steps=steps, batch_size=8, cache_size=32, save_every=0)
    return p


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    train_autoencoder(preset(), run, CPU, show_progress=False)
    train_ldm(preset(), run, CPU, show_progress=False)
    return run


def one_sentence(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def no_training(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("a stage trained although the run directory was refused")
    monkeypatch.setattr("minildm.train.autoencoder.train_autoencoder", fail)
    monkeypatch.setattr("minildm.train.ldm.train_ldm", fail)


# ---------------------------------------------------------------- finished and running runs
def test_training_again_without_resume_never_replaces_a_run(run, capsys, no_training):
    before = (run / "ldm.pt").read_bytes()
    assert train.main(["--preset", "micro", "--out", str(run), "--steps", "2"]) == 2
    err = one_sentence(capsys.readouterr().err)
    assert "already holds autoencoder.pt, ldm.pt (3 steps)" in err and "--resume" in err and "--overwrite" in err
    assert train.main(["--preset", "micro", "--stage", "ldm", "--out", str(run)]) == 2
    assert (run / "ldm.pt").read_bytes() == before


def test_overwrite_starts_over_and_resume_overwrite_together_are_refused(tmp_path, capsys):
    out = str(tmp_path / "r")
    assert train.main(["--preset", "micro", "--out", out, "--steps", "2"]) == 0
    assert load_checkpoint(Path(out) / "ldm.pt")["step"] == 2  # --steps holds for both stages of a whole run
    assert load_checkpoint(Path(out) / "autoencoder.pt")["step"] == 2
    assert train.main(["--preset", "micro", "--out", out, "--stage", "ldm", "--steps", "1", "--overwrite"]) == 0
    assert load_checkpoint(Path(out) / "ldm.pt")["step"] == 1
    with pytest.raises(SystemExit):
        train.main(["--preset", "micro", "--out", out, "--resume", "--overwrite"])
    assert not (Path(out) / LOCK_FILE).exists()  # released after every command


def test_a_running_training_locks_its_directory(tmp_path, capsys, no_training):
    with RunLock(tmp_path):
        assert (tmp_path / LOCK_FILE).read_text().split() == [str(os.getpid()), socket.gethostname()]
        with pytest.raises(RunDirError, match=f"being trained by process {os.getpid()}"):
            RunLock(tmp_path).acquire()
        assert train.main(["--preset", "micro", "--out", str(tmp_path)]) == 2
        assert "is being trained by process" in one_sentence(capsys.readouterr().err)
    assert not (tmp_path / LOCK_FILE).exists()


@pytest.mark.parametrize("content", [f"{DEAD_PID} {socket.gethostname()}\n", "garbage"])
def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path, content):
    (tmp_path / LOCK_FILE).write_text(content)
    with RunLock(tmp_path) as lock:
        assert lock.owned and (tmp_path / LOCK_FILE).read_text().split()[0] == str(os.getpid())


def test_a_lock_from_another_host_is_not_guessed_at(tmp_path):
    (tmp_path / LOCK_FILE).write_text(f"{DEAD_PID} some-other-machine\n")
    with pytest.raises(RunDirError, match="process .* on some-other-machine .*delete the lock file only if"):
        RunLock(tmp_path).acquire()


# ---------------------------------------------------------------- unwritable directory, before step 1
def test_an_unwritable_run_directory_is_refused_before_step_one(tmp_path, capsys, monkeypatch, no_training):
    target = tmp_path / "ro"
    target.mkdir()
    if os.geteuid() != 0:
        os.chmod(target, 0o500)
    else:  # root writes anywhere: the refusal of a read-only folder, by hand
        def read_only(*a, **k):
            raise PermissionError(errno.EACCES, "Permission denied")
        monkeypatch.setattr("minildm.train.run_dir.tempfile.NamedTemporaryFile", read_only)
    try:
        with pytest.raises(RunDirError, match="cannot write into the run directory .*Permission denied"):
            check_writable(target)
        assert train.main(["--preset", "micro", "--out", str(target)]) == 2
    finally:
        os.chmod(target, 0o700)
    assert "choose another --out" in one_sentence(capsys.readouterr().err)


def test_a_full_disk_is_refused_before_step_one(tmp_path, monkeypatch, no_training, capsys):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr("minildm.train.run_dir.os.fsync", full)
    assert train.main(["--preset", "micro", "--out", str(tmp_path / "r")]) == 2
    assert "No space left on device" in one_sentence(capsys.readouterr().err)


# ---------------------------------------------------------------- checkpoints that belong together
def test_resume_with_another_preset_is_one_sentence(run, capsys, no_training):
    with pytest.raises(RunDirError, match="trained with the micro preset, not tiny: resume with --preset micro"):
        check_resume_fits(run, __import__("minildm.config", fromlist=["tiny"]).tiny())
    assert train.main(["--preset", "tiny", "--out", str(run), "--resume"]) == 2
    assert "--preset micro" in one_sentence(capsys.readouterr().err)


def test_resume_of_an_earlier_recipe_of_the_same_preset_is_one_sentence(run, tmp_path):
    """A run started before the preset's networks changed (same name, other UNet config) is not resumed."""
    from minildm.checkpoint import load_checkpoint, save_checkpoint
    from minildm.config import micro

    old = tmp_path / "old"
    old.mkdir()
    state = load_checkpoint(run / "ldm.pt", "ldm")
    state["unet_config"] = {**state["unet_config"], "kernel": "chunked"}
    save_checkpoint(old / "ldm.pt", "ldm", state)
    with pytest.raises(RunDirError, match="trained with an earlier recipe of the micro preset"):
        check_resume_fits(old, micro())


def changed_autoencoder(run, out):
    import shutil
    shutil.copytree(run, out)
    state = dict(load_checkpoint(out / "autoencoder.pt"))
    state["model"] = {k: v * 1.001 if v.is_floating_point() else v for k, v in state["model"].items()}
    save_checkpoint(out / "autoencoder.pt", "autoencoder", state)  # as a resumed or retrained autoencoder


def test_an_ldm_is_not_resumed_on_another_autoencoder(run, tmp_path, capsys, no_training):
    out = tmp_path / "changed"
    changed_autoencoder(run, out)
    before = (out / "ldm.pt").read_bytes()
    for stage in ("ldm", "all"):
        assert train.main(["--preset", "micro", "--out", str(out), "--stage", stage, "--resume"]) == 2
        assert "was trained on another autoencoder" in one_sentence(capsys.readouterr().err)
    assert (out / "ldm.pt").read_bytes() == before


def test_resume_never_trains_the_autoencoder_under_an_ldm(run, tmp_path, capsys, no_training):
    import shutil
    out = tmp_path / "more"
    shutil.copytree(run, out)
    before = (out / "autoencoder.pt").read_bytes()
    assert train.main(["--preset", "micro", "--out", str(out), "--resume", "--steps", "5"]) == 2
    assert "--stage ldm --resume" in one_sentence(capsys.readouterr().err)
    assert (out / "autoencoder.pt").read_bytes() == before


# ---------------------------------------------------------------- divergence
def test_a_diverging_training_stops_and_keeps_its_last_checkpoint(run, tmp_path):
    import shutil
    out = tmp_path / "div"
    shutil.copytree(run, out)
    before = (out / "ldm.pt").read_bytes()
    p = preset(steps=8)
    p.ldm = replace(p.ldm, lr=1e6)
    with pytest.raises(DivergenceError, match=r"the ldm training diverged at step \d+ \(the loss became .*\); ldm.pt "
                                              r"keeps the last checkpoint saved before it: try a lower learning rate"):
        train_ldm(p, out, CPU, resume=True, show_progress=False)
    assert (out / "ldm.pt").read_bytes() == before


def test_divergence_check_catches_nan_inf_and_a_finite_explosion():
    check = DivergenceCheck("ldm")
    check(0, torch.tensor(1.0))
    check(1, 9999.0)  # under 1e4 x the first loss: a bad step, not a divergence
    for step, bad in enumerate((float("nan"), float("inf"), 1e28), start=2):
        with pytest.raises(DivergenceError, match=f"diverged at step {step}.*nothing of this stage was saved"):
            check(step, torch.tensor(bad))


# ---------------------------------------------------------------- Ctrl-C and kill -9, in a real process
def start_training(out: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--preset", "micro", "--out", str(out),
                             "--threads", "1", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    end = time.time() + timeout
    while not path.is_file():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < end, f"{path} never appeared"
        time.sleep(0.1)


def test_ctrl_c_in_the_autoencoder_stage_stops_the_whole_command(tmp_path):
    out = tmp_path / "r"
    proc = start_training(out, "--steps", "100000")  # micro saves every 5 steps: the first save is in stage 1
    wait_for(out / "autoencoder.pt", proc)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 130, stderr
    assert "stopped after saving; continue with: python train.py --resume" in stderr
    assert not (out / "ldm.pt").exists() and "encoding latent cache" not in stderr  # the ldm stage never began
    assert 0 < load_checkpoint(out / "autoencoder.pt", "autoencoder")["step"] < 100000
    assert not (out / LOCK_FILE).exists()


def test_kill_9_loses_at_most_a_few_steps_and_resume_takes_the_lock_over(tmp_path, capsys):
    out = tmp_path / "r"
    proc = start_training(out, "--steps", "100000")
    wait_for(out / "autoencoder.pt", proc)
    proc.kill()
    proc.communicate()
    assert (out / LOCK_FILE).is_file()  # a dead process's lock
    saved = load_checkpoint(out / "autoencoder.pt", "autoencoder")["step"]
    assert saved >= 5
    assert train.main(["--preset", "micro", "--out", str(out), "--stage", "autoencoder", "--resume", "--steps",
                       str(saved + 2)]) == 0
    assert f"took over the lock of process {proc.pid}" in capsys.readouterr().out
    assert load_checkpoint(out / "autoencoder.pt", "autoencoder")["step"] == saved + 2
    assert not list(out.glob(".*.tmp")) and not (out / LOCK_FILE).exists()


@pytest.mark.parametrize("fault, code, message", [
    (torch.OutOfMemoryError("CUDA out of memory"), 1, "lower --batch-size, add --grad-checkpoint"),
    (KeyboardInterrupt(), 130, "every checkpoint saved so far stays: continue with --resume"),
])
def test_out_of_memory_or_ctrl_c_outside_the_loop_is_one_sentence(tmp_path, capsys, monkeypatch, fault, code,
                                                                  message):
    def fails(*a, **k):
        raise fault
    monkeypatch.setattr("minildm.train.autoencoder.train_autoencoder", fails)
    assert train.main(["--preset", "micro", "--out", str(tmp_path / "r")]) == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not (tmp_path / "r" / LOCK_FILE).exists()


def test_bad_lr_scale_is_refused(capsys):
    for bad in ("0", "-1", "nan", "inf"):
        with pytest.raises(SystemExit):
            train.main(["--lr-scale", bad])
        assert "--lr-scale must be a positive number" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.main(["--stage", "clip", "--lr-scale", "0.3"])
    assert "does not apply to the clip stage" in capsys.readouterr().err
