"""The one checkpoint format: round trip, atomic write, and one clear sentence for bad files."""
import pickle

import pytest
import torch

from minildm.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


def test_round_trip_keeps_tensors_and_plain_values(tmp_path):
    state = {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "config": {"dim": 4, "mult": [1, 2]}, "step": 7,
             "scale_factor": 0.25, "words": ["<pad>", "<unk>", "<s>", "red"]}
    path = save_checkpoint(tmp_path / "a.pt", "ldm", state)
    back = load_checkpoint(path, "ldm")
    assert torch.equal(back["model"]["w"], state["model"]["w"])
    assert back["config"] == state["config"] and back["step"] == 7 and back["words"] == state["words"]
    assert back["kind"] == "ldm" and back["format"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]  # no temp file left behind


def test_missing_file_names_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


@pytest.mark.parametrize("content", [b"", b"garbage bytes", b"PK\x03\x04truncated zip"])
def test_damaged_file_gives_one_sentence(tmp_path, content):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="damaged or not a minildm checkpoint") as e:
        load_checkpoint(path)
    assert str(path) in str(e.value)


def test_truncated_checkpoint_is_refused(tmp_path):
    path = save_checkpoint(tmp_path / "c.pt", "autoencoder", {"model": {"w": torch.randn(64, 64)}})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(path, "autoencoder")


def test_wrong_kind_is_refused(tmp_path):
    path = save_checkpoint(tmp_path / "c.pt", "autoencoder", {"step": 1})
    with pytest.raises(CheckpointError, match="'autoencoder' checkpoint, but a 'ldm'"):
        load_checkpoint(path, "ldm")


class Evil:
    def __reduce__(self):
        return (print, ("this code must never run",))


def test_arbitrary_pickles_are_never_executed(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": 1, "kind": "ldm", "x": Evil()}, path)
    with pytest.raises(CheckpointError, match="damaged or not a minildm checkpoint"):
        load_checkpoint(path, "ldm")


def test_plain_torch_file_without_header_is_refused(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="not a minildm checkpoint"):
        load_checkpoint(path)


def test_loader_helpers_say_what_is_wrong_and_change_nothing():
    from minildm.checkpoint import check_entries, copy_checked, current_names

    with pytest.raises(ValueError, match="this is not a LoRA state: expected the dict"):
        check_entries({"rank": 4}, ("rank", "weights"), "a LoRA state", "the dict made by lora_state_dict")
    check_entries({"rank": 4, "weights": {}}, ("rank", "weights"), "a LoRA state", "the dict")  # complete: no error
    targets = {"a": torch.zeros(2), "b": torch.zeros(3)}
    for saved, words in (({"a": torch.ones(2)}, "weight b is missing"),
                         ({"a": torch.ones(2), "b": torch.ones(3), "c": torch.ones(1)}, "weight c is not in this model"),
                         ({"a": torch.ones(2), "b": torch.ones(4)}, r"weight b has shape \[4\] but this model needs \[3\]")):
        with pytest.raises(ValueError, match=words + ": made for another model"):
            copy_checked(saved, targets, "weight", "made for another model")
        assert all(t.eq(0).all() for t in targets.values())  # refused: nothing copied
    copy_checked({"a": torch.ones(2), "b": torch.full((3,), 2.0)}, targets, "weight", "made for another model")
    assert targets["a"].eq(1).all() and targets["b"].eq(2).all()
    assert current_names({"scale": 1.5, "lambda_b": 2.0, "lambda_ref": 0.5, "num_tokens": 4}) == {
        "ip_lambda": 1.5, "body_lambda": 2.0, "ref_lambda": 0.5, "num_tokens": 4}


# ---------------------------------------------------------------- nothing lost, nothing silent
import errno  # noqa: E402
import os  # noqa: E402

from minildm.checkpoint import fingerprint, remove_stale_temp_files  # noqa: E402


def good_then(tmp_path):
    path = save_checkpoint(tmp_path / "ldm.pt", "ldm", {"model": {"w": torch.ones(3)}, "step": 5})
    return path, path.read_bytes()


def test_non_finite_weights_are_never_written_over_good_ones(tmp_path):
    path, before = good_then(tmp_path)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(CheckpointError, match=r"'model.w' holds NaN or inf .*the previous ldm.pt is kept"):
            save_checkpoint(path, "ldm", {"model": {"w": torch.tensor([1.0, bad])}, "step": 6})
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["ldm.pt"]


def test_non_finite_weights_are_refused_at_load(tmp_path):
    path = tmp_path / "ldm.pt"
    torch.save({"format": 1, "kind": "ldm", "ema": {"w": torch.tensor([float("nan")])}}, path)
    with pytest.raises(CheckpointError, match="holds NaN or inf in 'ema.w'.*lower learning rate"):
        load_checkpoint(path, "ldm")


@pytest.mark.parametrize("fault, reason", [
    (OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
    (RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0"), "is the disk full"),
])
def test_a_full_disk_is_one_sentence_and_the_previous_checkpoint_stays(tmp_path, monkeypatch, fault, reason):
    path, before = good_then(tmp_path)
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise fault
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match=f"could not write .*ldm.pt \\(.*{reason}.*the previous ldm.pt is kept"):
        save_checkpoint(path, "ldm", {"model": {"w": torch.zeros(3)}, "step": 6})
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["ldm.pt"]  # no temp file left
    assert load_checkpoint(path, "ldm")["step"] == 5


def test_a_read_only_folder_is_one_sentence(tmp_path, monkeypatch):
    path, before = good_then(tmp_path)
    if os.geteuid() != 0:
        os.chmod(tmp_path, 0o500)
    else:  # root writes anywhere: the refusal a read-only folder gives, by hand
        def read_only(*a, **k):
            raise PermissionError(errno.EACCES, "Permission denied")
        monkeypatch.setattr("minildm.checkpoint.tempfile.mkstemp", read_only)
    try:
        with pytest.raises(CheckpointError, match="could not write .*Permission denied.*previous ldm.pt is kept"):
            save_checkpoint(path, "ldm", {"model": {"w": torch.zeros(3)}, "step": 6})
    finally:
        os.chmod(tmp_path, 0o700)
    assert path.read_bytes() == before


def test_temp_files_of_killed_saves_are_removed_by_the_next_save(tmp_path):
    dead = 2**22 + 12345  # above the default pid_max: no such process
    stale = [tmp_path / f".ldm.pt.{dead}.k2j3h4.tmp", tmp_path / ".autoencoder.pt.x8y7z6.tmp"]  # (old naming too)
    live = tmp_path / f".ldm.pt.{os.getppid()}.abcdef.tmp"  # a save of a running process
    for p in (*stale, live):
        p.write_bytes(b"\0" * 1000)
    save_checkpoint(tmp_path / "ldm.pt", "ldm", {"step": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ldm.pt", live.name])
    assert remove_stale_temp_files(tmp_path) == []


def test_a_missing_field_names_the_file_not_a_key_error(tmp_path):
    path = save_checkpoint(tmp_path / "ldm.pt", "ldm", {"step": 1})
    state = load_checkpoint(path, "ldm")
    with pytest.raises(CheckpointError, match=r"ldm.pt has no 'tokenizer' field.*train that stage again"):
        state["tokenizer"]
    assert state.get("tokenizer") is None and state["step"] == 1


def test_fingerprint_follows_the_weights_not_the_optimiser():
    a = {"model": {"w": torch.ones(3)}, "optimizer": {"state": {0: {"exp_avg": torch.ones(3)}}}, "step": 1}
    b = {**a, "optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}}}, "step": 2}
    c = {**a, "model": {"w": torch.tensor([1.0, 1.0, 1.0 + 1e-6])}}
    assert fingerprint(a) == fingerprint(b) != fingerprint(c)
    assert fingerprint({"model": {"w": torch.ones(3)}}) != fingerprint({"model": {"v": torch.ones(3)}})
