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
