"""Hand-written safetensors: byte-compatible with the reference package both ways, lazy, clear on bad files."""
import json
import struct
import sys

import pytest
import torch

from minildm.checkpoint import CheckpointError
from minildm.safetensors import DTYPES, SafetensorsError, load_safetensors, safetensors_header, save_safetensors


def sample_tensors() -> dict[str, torch.Tensor]:
    """One tensor per dtype with varied values, plus a scalar, an empty tensor and a 4-d F16 weight."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, dtype in DTYPES.items():
        x = torch.randn(3, 5, generator=g) * 50
        if dtype == torch.bool:
            x = x > 0
        elif dtype in (torch.uint8, torch.uint16, torch.uint32, torch.uint64):
            x = x.abs().to(torch.int64).to(dtype)
        else:
            x = x.to(dtype)
        out[f"t.{name}"] = x
    out["scalar"] = torch.tensor(3.5)
    out["empty"] = torch.zeros(0, 4)
    out["conv.weight"] = torch.randn(8, 4, 3, 3, generator=g).half()
    return out


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact equality (float8 types have no torch.equal: compare their bytes)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    return torch.equal(a, b)


def test_round_trip_every_dtype(tmp_path):
    tensors = sample_tensors()
    save_safetensors(tensors, tmp_path / "a.safetensors", metadata={"format": "pt"})
    loaded = load_safetensors(tmp_path / "a.safetensors")
    assert set(loaded) == set(tensors)
    for k in tensors:
        assert same(loaded[k], tensors[k]), k
    header = safetensors_header(tmp_path / "a.safetensors")
    assert header["__metadata__"] == {"format": "pt"}
    assert header["conv.weight"]["dtype"] == "F16" and header["conv.weight"]["shape"] == [8, 4, 3, 3]


def test_byte_layout_by_hand(tmp_path):
    """The format, checked byte by byte: u64 LE header length, JSON, then the raw LE bytes."""
    save_safetensors({"x": torch.tensor([1.0, -2.0], dtype=torch.float32)}, tmp_path / "x.safetensors")
    raw = (tmp_path / "x.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0 and json.loads(raw[8:8 + n]) == {"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    assert raw[8 + n:] == struct.pack("<2f", 1.0, -2.0)


def test_reference_package_reads_ours_and_we_read_its(tmp_path):
    st = pytest.importorskip("safetensors.torch", reason="the safetensors package is the test-only reference")
    tensors = sample_tensors()
    save_safetensors(tensors, tmp_path / "ours.safetensors", metadata={"who": "minildm"})
    theirs = st.load_file(tmp_path / "ours.safetensors")
    assert set(theirs) == set(tensors) and all(same(theirs[k], tensors[k]) for k in tensors)
    from safetensors import safe_open
    with safe_open(tmp_path / "ours.safetensors", "pt") as f:
        assert f.metadata() == {"who": "minildm"}

    st.save_file(tensors, tmp_path / "theirs.safetensors", metadata={"format": "pt"})
    ours = load_safetensors(tmp_path / "theirs.safetensors")
    assert set(ours) == set(tensors) and all(same(ours[k], tensors[k]) for k in tensors)
    assert safetensors_header(tmp_path / "theirs.safetensors")["__metadata__"] == {"format": "pt"}


def test_loading_is_lazy_views_into_one_mapping(tmp_path):
    """Tensors are views into one memory map of the file: their addresses differ exactly by their file
    offsets (a copy would live elsewhere), and on Linux the address lies inside a mapping of the file."""
    g = torch.Generator().manual_seed(0)
    tensors = {name: torch.randn(n, generator=g) for name, n in (("a", 1000), ("b", 300), ("c", 7))}
    path = tmp_path / "lazy.safetensors"
    save_safetensors(tensors, path)
    header = safetensors_header(path)
    loaded = load_safetensors(path)
    base = loaded["a"].data_ptr() - header["a"]["data_offsets"][0]
    for k in tensors:
        assert loaded[k].data_ptr() - base == header[k]["data_offsets"][0], k
    if sys.platform.startswith("linux"):
        maps = [line.split() for line in open("/proc/self/maps") if line.rstrip().endswith(str(path))]
        spans = [tuple(int(x, 16) for x in m[0].split("-")) for m in maps]
        assert any(lo <= loaded["b"].data_ptr() < hi for lo, hi in spans)
    # copy-on-write: changing a loaded tensor leaves the file alone
    loaded["a"][0] = 123.0
    assert load_safetensors(path)["a"][0] == tensors["a"][0]


def write_raw(path, header: dict, data: bytes, header_len: int | None = None):
    body = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body) if header_len is None else header_len) + body + data)
    return path


def test_truncated_file_says_so(tmp_path):
    tensors = {"w": torch.randn(64, 64)}
    save_safetensors(tensors, tmp_path / "full.safetensors")
    raw = (tmp_path / "full.safetensors").read_bytes()
    for cut, words in ((len(raw) - 100, "truncated"), (40, "truncated"), (5, "truncated")):
        (tmp_path / "half.safetensors").write_bytes(raw[:cut])
        with pytest.raises(SafetensorsError, match=words):
            load_safetensors(tmp_path / "half.safetensors")
        with pytest.raises(CheckpointError):  # loaders that catch CheckpointError catch this too
            safetensors_header(tmp_path / "half.safetensors")


@pytest.mark.parametrize("header, data, header_len, words", [
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, 10**12, "not a safetensors"),
    ({"w": {"dtype": "C64", "shape": [2], "data_offsets": [0, 16]}}, b"\0" * 16, None, "dtype 'C64'"),
    ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, None, "span 8 bytes"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, b"\0" * 16, None, "starts at byte 8"),
    ({"w": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, None, "lacks"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 12, None, "4 bytes follow"),
    ({"__metadata__": {"n": 3}}, b"", None, "strings to strings"),
])
def test_damaged_headers_say_what_is_wrong(tmp_path, header, data, header_len, words):
    path = write_raw(tmp_path / "bad.safetensors", header, data, header_len)
    with pytest.raises(SafetensorsError, match=words):
        load_safetensors(path)


def test_not_json_and_missing_file(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{]")
    with pytest.raises(SafetensorsError, match="damaged header"):
        load_safetensors(tmp_path / "junk.safetensors")
    with pytest.raises(SafetensorsError, match="does not exist"):
        load_safetensors(tmp_path / "nothing.safetensors")


def test_writer_refuses_non_tensors_and_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    save_safetensors({"a": torch.ones(2)}, path)
    with pytest.raises(ValueError, match="not a tensor"):
        save_safetensors({"a": torch.ones(2), "b": 3}, path)
    with pytest.raises(ValueError, match="strings to strings"):
        save_safetensors({"a": torch.ones(2)}, path, metadata={"step": 3})
    def disk_full(fd):
        raise OSError("No space left on device")
    monkeypatch.setattr("minildm.safetensors.os.fsync", disk_full)  # fail after the bytes were written
    with pytest.raises(OSError, match="No space"):
        save_safetensors({"a": torch.zeros(1000)}, path)
    assert torch.equal(load_safetensors(path)["a"], torch.ones(2))  # the good file is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # no temp file left behind
