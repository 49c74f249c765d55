"""The one checkpoint format of minildm.

Every stage (autoencoder, ldm, lora, clip, ip-adapter, body) saves the same kind of file: a dict of
tensors and plain Python values (configs as dicts, the tokenizer's word list, the latent scale factor,
the step count) plus three header fields:

    {"format": FORMAT_VERSION, "kind": "autoencoder" | "ldm" | ..., "fingerprint": "3f9a...", ...state}

Why so strict?
- Written atomically (temp file in the same folder, then `os.replace`), so Ctrl-C, a kill or a full disk
  in the middle of a save never leaves a half-written checkpoint where a good one was. A temp file left by
  a killed save carries its writer's process id and is deleted by the next save into the folder.
- Read with `torch.load(weights_only=True)`, which refuses to unpickle arbitrary objects: opening a
  checkpoint someone sent you cannot run their code.
- Weights holding NaN or inf (a diverged training) are never written, and never read back.
- A missing, damaged, wrong-kind or incomplete file, or a failed write, raises `CheckpointError` with one
  sentence naming the file and what to do, instead of a pickle traceback or a KeyError.
- `fingerprint` is a hash of the file's weights: a checkpoint trained on top of another one (the LDM on
  an autoencoder, an adapter on an LDM) records the fingerprint of what it was trained on, so that a
  pair that no longer belongs together is refused instead of sampling silently wrong images.
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

FORMAT_VERSION = 1
NOT_WEIGHTS = ("optimizer", "optimizer_d", "log")  # left out of the fingerprint: they do not change the model


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, damaged, of the wrong kind or unwritable (the message says which)."""


class Checkpoint(dict):
    """A loaded checkpoint: a dict whose missing fields raise CheckpointError naming the file, not KeyError."""

    path: Path = Path("?")

    def __missing__(self, key):
        raise CheckpointError(f"checkpoint {self.path} has no '{key}' field (another minildm version wrote it, or it "
                              "was edited): train that stage again.")


def tensors(state, prefix: str = ""):
    """(dotted name, tensor) of every tensor inside nested dicts / lists, in a fixed order."""
    if isinstance(state, torch.Tensor):
        yield prefix, state
    elif isinstance(state, dict):
        for k in sorted(state, key=str):
            yield from tensors(state[k], f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            yield from tensors(v, f"{prefix}.{i}")


def first_non_finite(state) -> str | None:
    """The name of the first floating-point tensor holding NaN or inf, or None if all are finite."""
    for name, t in tensors(state):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def fingerprint(state: dict) -> str:
    """sha256 over the names, shapes and bytes of the weights (optimiser and log left out), 16 hex digits."""
    h = hashlib.sha256()
    for name, t in tensors({k: v for k, v in state.items() if k not in NOT_WEIGHTS}):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temp files that killed saves left in `folder` (those whose writer process is gone)."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for tmp in folder.glob(".*.tmp"):
        m = re.fullmatch(r"\..+\.pt\.(\d+)\.[^.]+\.tmp", tmp.name)
        if m is None or (int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1)))):
            try:
                tmp.unlink()
                removed.append(tmp)
            except OSError:
                pass
    return removed


def save_checkpoint(path: str | os.PathLike, kind: str, state: dict) -> Path:
    """Write `state` (tensors, state_dicts, plain values) atomically to `path`; returns the path.

    Refuses (CheckpointError) to write NaN / inf weights; a failed write (full disk, read-only folder) is
    one CheckpointError sentence and leaves the previous file at `path` untouched."""
    path = Path(path)
    bad = first_non_finite(state)
    if bad is not None:
        raise CheckpointError(f"not saving {path}: '{bad}' holds NaN or inf (the training diverged); "
                              f"{'the previous ' + path.name + ' is kept' if path.exists() else 'nothing was written'}"
                              "; train again with a lower learning rate.")
    payload = {"format": FORMAT_VERSION, "kind": kind, **state, "fingerprint": fingerprint(state)}
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(path.parent)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX and Windows: readers see the old or the new file
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as RuntimeError (inline_container.cc)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else "the write failed: is the disk full?"
        kept = f"the previous {path.name} is kept" if path.exists() else "nothing was written"
        raise CheckpointError(f"could not write {path} ({reason}): {kept}; free disk space, fix the folder's "
                              "permissions or choose another --out, then --resume.") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
    return path


def load_checkpoint(path: str | os.PathLike, kind: str | None = None, map_location="cpu") -> Checkpoint:
    """Read a checkpoint written by `save_checkpoint`, refusing anything else with one clear sentence."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist: train it first or check the path.")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, random bytes, a pickle with arbitrary objects, ...
        raise CheckpointError(
            f"checkpoint {path} is damaged or not a minildm checkpoint ({type(e).__name__}): "
            "delete it and train again, or resume from an earlier copy."
        ) from None
    if not isinstance(state, dict) or "format" not in state or "kind" not in state:
        raise CheckpointError(f"{path} is not a minildm checkpoint (no format/kind header).")
    if state["format"] != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format {state['format']} but this minildm reads format {FORMAT_VERSION}."
        )
    if kind is not None and state["kind"] != kind:
        raise CheckpointError(f"{path} holds a '{state['kind']}' checkpoint, but a '{kind}' checkpoint was expected.")
    bad = first_non_finite(state)
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} holds NaN or inf in '{bad}' (its training diverged): "
                              "train it again with a lower learning rate.")
    state = Checkpoint(state)
    state.path = path
    return state


def check_entries(state, keys, what: str, made_by: str) -> None:
    """A loader's first check: `state` is a dict holding every entry in `keys`, else ValueError
    "this is not <what>: expected <made_by>." (a file of the wrong kind, or not a state at all)."""
    if not isinstance(state, dict) or not set(keys) <= state.keys():
        raise ValueError(f"this is not {what}: expected {made_by}.")


def copy_checked(saved: dict, targets: dict, what: str, made_for: str, error: type[Exception] = ValueError) -> None:
    """Copy saved[name] into the tensor targets[name] for every name, in place, after checking all of them: a
    missing or unexpected tensor or a wrong shape raises `error` naming it, then `made_for` (why, and what to
    do). Nothing is copied unless everything fits."""
    missing, unexpected = sorted(set(targets) - set(saved)), sorted(set(saved) - set(targets))
    if missing or unexpected:
        name, problem = (missing[0], "is missing") if missing else (unexpected[0], "is not in this model")
        raise error(f"{what} {name} {problem}: {made_for}.")
    for name, target in targets.items():
        if tuple(saved[name].shape) != tuple(target.shape):
            raise error(f"{what} {name} has shape {list(saved[name].shape)} but this model needs "
                        f"{list(target.shape)}: {made_for}.")
    with torch.no_grad():
        for name, target in targets.items():
            target.copy_(saved[name])


OLD_NAMES = {"scale": "ip_lambda", "lambda_b": "body_lambda", "lambda_ref": "ref_lambda"}  # adapter configs, renamed


def current_names(config: dict) -> dict:
    """An adapter config as saved, with the names of files written before the "scale" renames brought up to date
    (IP-Adapter's lambda was `scale`, BoLID's `lambda_b` / `lambda_ref`): trained runs keep loading."""
    return {OLD_NAMES.get(k, k): v for k, v in config.items()}


@contextmanager
def fits(state: dict):
    """Turn a checkpoint whose fields do not fit the models of this minildm (a config field it does not know,
    weights of other shapes) into one CheckpointError sentence instead of a TypeError or RuntimeError."""
    try:
        yield
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {getattr(state, 'path', '')} does not fit this minildm's models ({first}): "
                              "train that stage again.") from None
