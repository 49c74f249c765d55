"""The run directory a training writes into: checked before step 1, locked while training, never replaced by
accident, and its checkpoints kept consistent with each other.

Before the first step (`prepare`, on the main process):
- writable: a test file is written and removed, so a read-only folder or a full disk is one sentence now,
  not a traceback at the first save minutes later;
- locked: RUN/.train.lock holds the trainer's process id and host; a second training into the same folder
  is refused while that process lives, and a lock left by a dead process (kill -9, a crash) is taken over;
- not replaced: a stage whose checkpoint already exists continues it with --resume, and starts over only
  with --overwrite (a finished 2000-step ldm.pt is never silently replaced by a 5-step one);
- consistent: --resume with another preset than the checkpoint's is refused, and so is an ldm.pt whose
  autoencoder fingerprint (recorded when it trained) is not the fingerprint of the autoencoder.pt beside
  it: latents of another autoencoder would make it draw noise;
- tidy: temp files left by killed saves are removed.
"""
from __future__ import annotations

import os
import socket
import tempfile
from dataclasses import asdict
from pathlib import Path

from minildm.checkpoint import load_checkpoint, remove_stale_temp_files

LOCK_FILE = ".train.lock"


class RunDirError(ValueError):
    """The run directory cannot be trained into as asked (the message says why and what to do)."""


def check_writable(run_dir: Path) -> None:
    """Create run_dir and write, flush and remove a small file in it; RunDirError if any of that fails."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=run_dir, prefix=".write-check-") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise RunDirError(f"cannot write into the run directory {run_dir} ({e.strerror or e}): fix its permissions, "
                          "free disk space, or choose another --out.") from None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a live process of another user
        return True
    return True


class RunLock:
    """RUN/.train.lock while a training runs: `with RunLock(run_dir):` (see the module docstring)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.owned = False
        self.took_over: int | None = None  # the dead process whose lock was taken over

    def acquire(self) -> "RunLock":
        me = f"{os.getpid()} {socket.gethostname()}"
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pid, host = self._holder()
                if pid is not None and (host != socket.gethostname() or _alive(pid)):
                    where = "" if host == socket.gethostname() else f" on {host}"
                    raise RunDirError(f"{self.path.parent} is being trained by process {pid}{where} (lock file "
                                      f"{self.path}): wait for it or stop it, or train into another --out; delete "
                                      "the lock file only if no such training runs.") from None
                self.path.unlink(missing_ok=True)  # a dead process's (or unreadable) lock: take it over
                self.took_over = pid
                continue
            with os.fdopen(fd, "w") as f:
                f.write(me + "\n")
            self.owned = True
            return self
        raise RunDirError(f"could not lock {self.path.parent}: another training took it at the same moment.")

    def _holder(self) -> tuple[int | None, str | None]:
        try:
            pid, host = self.path.read_text().split()[:2]
            return int(pid), host
        except (OSError, ValueError):
            return None, None

    def release(self) -> None:
        if self.owned and self._holder()[0] == os.getpid():
            self.path.unlink(missing_ok=True)
        self.owned = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> bool:
        self.release()
        return False


def refuse_overwrite(run_dir: Path, files: list[str], resume: bool, overwrite: bool) -> None:
    """A stage about to write `files` into run_dir where one already exists needs --resume or --overwrite."""
    if resume or overwrite:
        return
    existing = [name for name in files if (run_dir / name).is_file()]
    if existing:
        steps = ""
        try:
            steps = f" ({load_checkpoint(run_dir / existing[0]).get('step', '?')} steps)"
        except RuntimeError:  # CheckpointError: a damaged file is still not replaced without --overwrite
            steps = " (unreadable)"
        raise RunDirError(f"{run_dir} already holds {', '.join(existing)}{steps}: continue it with --resume, train "
                          "into another --out, or pass --overwrite to replace it.")


def check_resume_fits(run_dir: Path, preset) -> None:
    """--resume with the preset the run's checkpoints were trained with, and an ldm.pt that belongs to the
    autoencoder.pt beside it; RunDirError (one sentence) otherwise."""
    ae_path, ldm_path = run_dir / "autoencoder.pt", run_dir / "ldm.pt"
    ae = load_checkpoint(ae_path, "autoencoder") if ae_path.is_file() else None
    ldm = load_checkpoint(ldm_path, "ldm") if ldm_path.is_file() else None
    def same_first_stage(s) -> bool:  # the KL autoencoder's config when the preset sets one, else the VQ-VAE's
        kl = getattr(preset, "kl", None)
        return s.get("config") == asdict(kl if s.get("first_stage") == "kl" and kl is not None else preset.vq)

    for path, state, same in ((ae_path, ae, same_first_stage),
                              (ldm_path, ldm, lambda s: s.get("unet_config") == asdict(preset.unet))):
        if state is not None and (state.get("preset", preset.name) != preset.name or not same(state)):
            was = state.get("preset", "another")
            if was == preset.name:  # same name, other networks: a run started before the preset's recipe changed
                raise RunDirError(f"{path} was trained with an earlier recipe of the {was} preset (its networks "
                                  f"differ from today's): start it over with --overwrite, or train into another --out.")
            raise RunDirError(f"{path} was trained with the {was} preset, not {preset.name}: resume with --preset "
                              f"{was}, or train {preset.name} into another --out.")
    if ae is not None and ldm is not None and ldm.get("autoencoder_fingerprint") not in (None, ae.get("fingerprint")):
        raise RunDirError(f"{ldm_path} was trained on another autoencoder than {ae_path} (the autoencoder was "
                          "retrained or resumed since): train the ldm stage again with --stage ldm --overwrite, or "
                          "put back the autoencoder.pt it was trained on.")


def prepare(run_dir: Path, files: list[str], resume: bool = False, overwrite: bool = False, preset=None) -> RunLock:
    """Everything before step 1 (module docstring); returns the held lock (release it when training ends)."""
    run_dir = Path(run_dir)
    check_writable(run_dir)
    lock = RunLock(run_dir).acquire()
    try:
        if lock.took_over is not None:
            print(f"note: took over the lock of process {lock.took_over}, which is no longer running.")
        remove_stale_temp_files(run_dir)
        refuse_overwrite(run_dir, files, resume, overwrite)
        if resume and preset is not None:
            check_resume_fits(run_dir, preset)
    except BaseException:
        lock.release()
        raise
    return lock
