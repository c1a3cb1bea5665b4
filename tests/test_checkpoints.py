"""Checkpoints: self-describing round trip, atomic writes under a full disk, refusal of malicious pickles,
clear errors for missing, empty, truncated, foreign files and for class mismatches."""

import errno
import os

import pytest
import torch

from resnet_lessons import __version__, checkpoints, runtime
from resnet_lessons.checkpoints import CheckpointError, ClassMismatch
from resnet_lessons.models import build_model

CLASSES = ("cat", "dog", "frog")
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def make(model=None, **extra):
    if model is None:
        runtime.seed_everything(0)
        model = build_model("resnet8", num_classes=3, width=0.5)
    history = [{"epoch": 1, "train_loss": 2.0, "val_accuracy": 0.4}]
    payload = checkpoints.make_checkpoint(
        model, model_name="resnet8", model_options={"width": 0.5}, classes=CLASSES, mean=MEAN, std=STD,
        history=history, train_state={"step": 7, "optimizer": {"state": {}, "param_groups": []}}, **extra,
    )
    return model, payload


def test_round_trip_rebuilds_the_model_and_describes_itself(tmp_path):
    model, payload = make()
    path = checkpoints.save(payload, tmp_path / "model.pt")
    loaded = checkpoints.load(path)
    assert (loaded.model_name, loaded.model_options, loaded.classes) == ("resnet8", {"width": 0.5}, CLASSES)
    assert loaded.mean == pytest.approx(MEAN) and loaded.std == pytest.approx(STD)
    assert loaded.library_version == __version__ and loaded.history[0]["val_accuracy"] == 0.4
    assert loaded.train_state["step"] == 7
    rebuilt = checkpoints.load_model(path)
    x = torch.randn(4, 3, 16, 16)
    model.eval()
    assert not rebuilt.training
    torch.testing.assert_close(rebuilt(x), model(x), rtol=0, atol=0)


class Payload:
    """Unpickling this object calls open(marker, "w"): a stand-in for any code an attacker wants run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_checkpoint_carrying_a_malicious_pickle_is_refused_and_its_payload_never_runs(tmp_path):
    marker = tmp_path / "payload-ran"
    _, payload = make()
    payload["extra"] = Payload(marker)
    path = tmp_path / "evil.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=r"refused to load .*evil\.pt.*asks for \S*open"):
        checkpoints.load(path)
    with pytest.raises(CheckpointError, match="refused"):
        checkpoints.load_model(path)
    assert not marker.exists(), "the payload ran"
    # The payload is real: an unsafe load (never done by the library) runs it.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_missing_empty_truncated_and_foreign_files_get_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoints.load(tmp_path / "nothing.pt")
    with pytest.raises(CheckpointError, match="is a folder"):
        checkpoints.load(tmp_path)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        checkpoints.load(empty)
    _, payload = make()
    good = checkpoints.save(payload, tmp_path / "good.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="damaged or truncated"):
        checkpoints.load(truncated)
    zeros = tmp_path / "zeros.pt"  # bytes that are no pickle opcode: damage, not an unsafe pickle
    zeros.write_bytes(bytes(100))
    with pytest.raises(CheckpointError, match="damaged or truncated, or not a PyTorch file"):
        checkpoints.load(zeros)
    text = tmp_path / "notes.pt"
    text.write_text("hello, I am not a checkpoint\n")
    with pytest.raises(CheckpointError, match="damaged or truncated, or not a PyTorch file"):
        checkpoints.load(text)
    foreign = tmp_path / "state_dict.pt"
    torch.save(build_model("resnet8").state_dict(), foreign)
    with pytest.raises(CheckpointError, match="not a resnet-lessons checkpoint"):
        checkpoints.load(foreign)


def test_a_class_mismatch_names_both_class_lists(tmp_path):
    _, payload = make()
    loaded = checkpoints.load(checkpoints.save(payload, tmp_path / "m.pt"))
    loaded.check_classes(CLASSES)
    with pytest.raises(ClassMismatch, match=r"\['cat', 'dog', 'frog'\].*\['cat', 'dog', 'bird'\]"):
        loaded.check_classes(("cat", "dog", "bird"))


def test_weights_that_do_not_fit_the_named_model_are_reported(tmp_path):
    _, payload = make()
    payload["model_options"] = {"width": 1.0}
    with pytest.raises(CheckpointError, match="do not fit resnet8"):
        checkpoints.load_model(checkpoints.save(payload, tmp_path / "m.pt"))


def test_a_full_disk_during_a_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    _, first = make()
    path = checkpoints.save(first, tmp_path / "checkpoint.pt")
    before = path.read_bytes()
    real_save = torch.save

    def save_then_fail(obj, stream, *args, **kwargs):
        real_save({"half": torch.zeros(1000)}, stream)  # some bytes reach the disk ...
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # ... then it is full

    monkeypatch.setattr(torch, "save", save_then_fail)
    _, second = make(extra={"note": "second"})
    with pytest.raises(OSError, match="No space left"):
        checkpoints.save(second, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"], "the temporary file was left behind"
    assert checkpoints.load(path).extra == {}


def test_saving_into_a_folder_that_cannot_be_created_names_it(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    _, payload = make()
    with pytest.raises(OSError, match="a-file"):
        checkpoints.save(payload, blocker / "run" / "model.pt")
