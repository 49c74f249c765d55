"""The safetensors weight format, read and written by hand (the format Stable Diffusion weights ship in).

A .safetensors file is three parts, nothing else:

    bytes 0..8          N, the header's length: an unsigned 64-bit little-endian integer
    bytes 8..8+N        the header: UTF-8 JSON (padded with spaces), one entry per tensor
                            {"unet.conv_in.weight": {"dtype": "F16", "shape": [320, 4, 3, 3],
                                                     "data_offsets": [begin, end]}, ...,
                             "__metadata__": {"format": "pt"}}          (optional, str -> str only)
    bytes 8+N..         the data: every tensor's raw little-endian bytes, row-major (C order), at
                        [8 + N + begin, 8 + N + end); the ranges tile the data exactly, no gaps.

Unlike a pickled `.ckpt`, nothing in the file is executed when it is read: it is only numbers and a
JSON table of contents. Reading is lazy: we memory-map the file and every tensor is a view into the
mapping (`torch.frombuffer`), so an 860M-parameter UNet is not read into RAM and then copied again;
the operating system pages bytes in when a tensor is used (e.g. copied into a model by load_state_dict).
The mapping is copy-on-write: writing into a loaded tensor changes this process's copy, never the file.

Bad files (half-downloaded, not safetensors, offsets past the end, unknown dtype) raise
`SafetensorsError` (a `CheckpointError`) with one sentence naming the file and the problem.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import struct
import sys
import tempfile
from pathlib import Path

import torch

from minildm.checkpoint import CheckpointError

# The format's dtype names -> torch dtypes (every dtype SD / LoRA files use, plus the other easy ones).
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
DTYPES.update({  # float8 since torch 2.1, unsigned 16/32/64-bit since torch 2.3
    name: getattr(torch, attr) for name, attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
                                                 ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"))
    if hasattr(torch, attr)
})
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
MAX_HEADER_BYTES = 100_000_000  # the reference reader's limit: a bigger "header" is a damaged file


class SafetensorsError(CheckpointError):
    """A .safetensors file is truncated, damaged, or not safetensors (the message says which)."""


def _check_little_endian() -> None:
    if sys.byteorder != "little":  # the data is little-endian; we view it in place, without byte swaps
        raise SafetensorsError("minildm's safetensors reader/writer needs a little-endian machine.")


def _read_header(f, path: Path, file_size: int) -> tuple[dict, int]:
    """-> (validated header dict, offset of the data section). `f` is open in binary mode."""
    if file_size < 8:
        raise SafetensorsError(f"{path} is only {file_size} bytes: it is truncated or not a safetensors file.")
    (n,) = struct.unpack("<Q", f.read(8))  # N: u64, little-endian
    if n > MAX_HEADER_BYTES:
        raise SafetensorsError(f"{path} is not a safetensors file (its first 8 bytes announce a {n}-byte header).")
    if 8 + n > file_size:
        raise SafetensorsError(
            f"{path} is truncated (half-downloaded?): its header needs {8 + n} bytes but the file has {file_size}."
        )
    try:
        header = json.loads(f.read(n).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(f"{path} has a damaged header (not UTF-8 JSON: {e}).") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path} has a damaged header (JSON {type(header).__name__}, expected an object).")
    _validate(header, path, data_size=file_size - 8 - n)
    return header, 8 + n


def _validate(header: dict, path: Path, data_size: int) -> None:
    """Every entry well-formed, its byte range the size of its shape x dtype, the ranges tiling the data."""
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise SafetensorsError(f"{path} has a damaged header: __metadata__ must map strings to strings.")
    ranges = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not (isinstance(entry, dict) and {"dtype", "shape", "data_offsets"} <= entry.keys()):
            raise SafetensorsError(f"{path} has a damaged header: entry {name!r} lacks dtype/shape/data_offsets.")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in DTYPES:
            raise SafetensorsError(
                f"{path}: tensor {name!r} has dtype {dtype!r}, which minildm does not read "
                f"(known: {', '.join(DTYPES)})."
            )
        ints = lambda xs: isinstance(xs, list) and all(isinstance(x, int) and x >= 0 for x in xs)  # noqa: E731
        if not ints(shape) or not ints(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
            raise SafetensorsError(f"{path} has a damaged header: bad shape or data_offsets for {name!r}.")
        nbytes = math.prod(shape) * DTYPES[dtype].itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise SafetensorsError(
                f"{path} has a damaged header: {name!r} is {dtype} {shape} ({nbytes} bytes) "
                f"but its data_offsets span {offsets[1] - offsets[0]} bytes."
            )
        ranges.append((offsets[0], offsets[1], name))
    end = 0
    for begin, stop, name in sorted(ranges):
        if begin != end:
            raise SafetensorsError(f"{path} has a damaged header: {name!r} starts at byte {begin}, expected {end}.")
        end = stop
    if end > data_size:
        raise SafetensorsError(
            f"{path} is truncated (half-downloaded?): its header lists {end} bytes of tensor data "
            f"but the file holds {data_size}; download it again."
        )
    if end < data_size:
        raise SafetensorsError(f"{path} is damaged: {data_size - end} bytes follow the last tensor.")


def safetensors_header(path: str | os.PathLike) -> dict:
    """The validated header, without reading tensor data: {name: {"dtype", "shape", "data_offsets"}, ...}
    plus "__metadata__" (str -> str) when the file has one. Use it to check a file's keys and shapes."""
    _check_little_endian()
    path = Path(path)
    if not path.is_file():
        raise SafetensorsError(f"{path} does not exist.")
    with open(path, "rb") as f:
        return _read_header(f, path, os.fstat(f.fileno()).st_size)[0]


def load_safetensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file, in file order of names. On "cpu" the tensors are views into a
    copy-on-write memory map of the file (nothing is read until used); other devices get a copy there."""
    _check_little_endian()
    path = Path(path)
    if not path.is_file():
        raise SafetensorsError(f"{path} does not exist.")
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        header, data_start = _read_header(f, path, size)
        # ACCESS_COPY: a private mapping, so tensors are writable (torch.frombuffer wants that) yet the
        # file is never modified. The mapping outlives `f`; each tensor keeps it alive (frombuffer holds
        # a reference), and it is unmapped when the last tensor is freed.
        buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > data_start else None
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype, shape = DTYPES[entry["dtype"]], entry["shape"]
        begin, end = entry["data_offsets"]
        if end == begin:  # an empty tensor has no bytes to map (frombuffer refuses count=0)
            t = torch.empty(shape, dtype=dtype)
        else:
            t = torch.frombuffer(buffer, dtype=dtype, count=math.prod(shape), offset=data_start + begin)
            t = t.reshape(shape)  # a view: row-major bytes -> the stored shape ([] for a scalar)
        tensors[name] = t if torch.device(device).type == "cpu" else t.to(device)
    return tensors


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> Path:
    """Write `tensors` as a .safetensors file, atomically (temp file in the same folder, then rename).

    Tensors are laid out largest element size first, then by name (so every tensor starts at a multiple
    of its element size, as the reference writer does), and the header is padded with spaces to a
    multiple of 8 bytes. Views/shared tensors are written as independent copies.
    """
    _check_little_endian()
    path = Path(path)
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError("safetensors metadata must map strings to strings (convert numbers with str()).")
    for name, t in tensors.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise ValueError(f"safetensors tensor names must be strings other than '__metadata__', got {name!r}.")
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name!r} is a {type(t).__name__}, not a tensor; safetensors stores tensors only.")
        if t.dtype not in DTYPE_NAMES:
            raise ValueError(f"{name!r} has dtype {t.dtype}, which safetensors cannot store.")
    names = sorted(tensors, key=lambda k: (-tensors[k].dtype.itemsize, k))
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in names:
        t = tensors[name]
        nbytes = t.numel() * t.dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)  # pad: the data section starts 8-byte aligned
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(header_bytes)))
            f.write(header_bytes)
            for name in names:
                t = tensors[name].detach().to("cpu").contiguous()
                if t.numel():  # raw bytes, no copy: a uint8 view of the tensor handed to write()
                    f.write(t.reshape(-1).view(torch.uint8).numpy())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic: readers see the old file or the new one, never half of one
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path
