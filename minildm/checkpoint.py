"""The one checkpoint format of minildm.

Every stage (autoencoder, ldm, lora, clip, ip-adapter, body) saves the same kind of file: a dict of
tensors and plain Python values (configs as dicts, the tokenizer's word list, the latent scale factor,
the step count) plus two header fields:

    {"format": FORMAT_VERSION, "kind": "autoencoder" | "ldm" | ..., ...state}

Why so strict?
- Written atomically (temp file in the same folder, then `os.replace`), so Ctrl-C or a full disk in the
  middle of a save never leaves a half-written checkpoint where a good one was.
- Read with `torch.load(weights_only=True)`, which refuses to unpickle arbitrary objects: opening a
  checkpoint someone sent you cannot run their code.
- A missing, damaged or wrong-kind file raises `CheckpointError` with one sentence naming the file and
  what to do, instead of a pickle traceback.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, damaged, or of the wrong kind (the message says which)."""


def save_checkpoint(path: str | os.PathLike, kind: str, state: dict) -> Path:
    """Write `state` (tensors, state_dicts, plain values) atomically to `path`; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT_VERSION, "kind": kind, **state}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX and Windows: readers see the old or the new file
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def load_checkpoint(path: str | os.PathLike, kind: str | None = None, map_location="cpu") -> dict:
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
