"""The train, evaluate and predict commands: outputs, exit codes, one-line errors, and a run killed with
SIGKILL that resumes to the same weights as an uninterrupted one (real subprocesses)."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from clirun import run_cli
from PIL import Image

from resnet_lessons import checkpoints, cli
from resnet_lessons.data import make_synthetic

CLASSES = ("disc", "square")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny image folder: 150 PNGs each of two synthetic classes (the smoke profile holds out 50 per class)."""
    root = tmp_path_factory.mktemp("images")
    images = make_synthetic(150, image_size=32, seed=3)
    for index in range(len(images)):
        label = int(images.labels[index])
        if label < len(CLASSES):
            target = root / CLASSES[label]
            target.mkdir(exist_ok=True)
            Image.fromarray(images.images[index].permute(1, 2, 0).numpy()).save(target / f"{index:04d}.png")
    return root


@pytest.fixture(scope="module")
def trained(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert cli.main(["train", "--data", str(folder), "--out", str(out), "--profile", "smoke", "--epochs", "2"]) == 0
    return out


def test_train_writes_model_history_and_metrics(trained, folder):
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and metrics["model"] == "resnet8" and metrics["profile"] == "smoke"
    assert 0 <= metrics["val_accuracy"] <= 1 and metrics["stopped"] == "completed"
    history = (trained / "history.csv").read_text().splitlines()
    assert history[0].startswith("epoch,step,lr,train_loss,train_accuracy,val_loss,val_accuracy") and len(history) == 3
    saved = checkpoints.load(trained / "model.pt")
    assert saved.classes == CLASSES and saved.model_name == "resnet8" and len(saved.history) == 2
    assert saved.extra["data"]["source"] == str(folder)


def test_evaluate_prints_json_with_the_training_normalisation_and_split(trained, folder, capsys):
    code, out, _ = run_cli(capsys, "evaluate", trained / "model.pt", "--data", folder, "--split", "val", "--json")
    assert code == 0
    result = json.loads(out)
    assert set(result) == {"accuracy", "loss", "n", "per_class"} and result["n"] == 100
    assert set(result["per_class"]) == set(CLASSES)
    metrics = json.loads((trained / "metrics.json").read_text())
    assert result["accuracy"] == pytest.approx(metrics["val_accuracy"])  # the same carved split, the same number


def test_predict_gives_top_k_per_image_and_an_error_entry_for_a_bad_file(trained, folder, tmp_path, capsys):
    good = sorted((folder / "disc").iterdir())[0]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image at all")
    code, out, _ = run_cli(capsys, "predict", trained / "model.pt", good, broken, good, "--top-k", "2", "--json")
    entries = json.loads(out)
    assert code == 1  # one file failed; the others were still predicted
    assert [e["file"] for e in entries] == [str(good), str(broken), str(good)]
    assert entries[0]["error"] is None and len(entries[0]["top"]) == 2
    assert {t["class"] for t in entries[0]["top"]} == set(CLASSES)
    assert sum(t["p"] for t in entries[0]["top"]) == pytest.approx(1.0, abs=1e-5)
    assert entries[0]["top"] == entries[2]["top"]
    assert entries[1]["top"] == [] and "broken.jpg" in entries[1]["error"]


def test_usage_errors_exit_2(capsys, tmp_path, folder):
    with pytest.raises(SystemExit) as missing:
        cli.main(["train", "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as both:
        cli.main(["train", "--data", str(folder), "--out", str(tmp_path), "--epochs", "2", "--budget-seconds", "9"])
    assert missing.value.code == 2 and both.value.code == 2
    assert "--data" in capsys.readouterr().err


def test_train_per_class_keeps_that_many_images_and_refuses_nonsense(capsys, tmp_path, folder):
    code, _, err = run_cli(capsys, "train", "--data", folder, "--out", tmp_path / "a", "--profile", "smoke",
                           "--epochs", "1", "--train-per-class", "40")
    assert code == 0 and "(80 images: 40 per class, smoke profile)" in err
    assert checkpoints.load(tmp_path / "a" / "model.pt").extra["data"]["train_per_class"] == 40
    code, _, err = run_cli(capsys, "train", "--data", folder, "--out", tmp_path / "b", "--profile", "smoke",
                           "--epochs", "1", "--train-per-class", "all")
    assert code == 0 and "(200 images, smoke profile)" in err  # 150 per class, 50 of them held out
    for bad in ("0", "-2", "lots"):  # a usage error: exit code 2, nothing created
        with pytest.raises(SystemExit) as stop:
            cli.main(["train", "--data", str(folder), "--out", str(tmp_path / bad), "--train-per-class", bad])
        err = capsys.readouterr().err
        message = f"--train-per-class: must be a positive whole number or 'all', got '{bad}'"
        assert stop.value.code == 2 and message in err
        assert not (tmp_path / bad).exists()


@pytest.mark.parametrize("budget", ["0", "-3", "nan", "inf"])
def test_a_budget_of_zero_or_less_is_refused(capsys, tmp_path, folder, budget):
    with pytest.raises(SystemExit) as stop:
        cli.main(["train", "--data", str(folder), "--out", str(tmp_path / "o"), "--budget-seconds", budget])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "--budget-seconds: must be a finite number more than 0" in err


def test_an_unwritable_output_folder_is_a_one_line_error(capsys, tmp_path, folder):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code, _, err = run_cli(capsys, "train", "--data", folder, "--out", blocker, "--epochs", "1")
    assert code == 1 and "a-file" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "train", "--data", folder, "--out", blocker / "sub", "--epochs", "1")
    assert code == 1 and "cannot write into the output folder" in err


def test_an_existing_run_is_not_overwritten_without_force(capsys, trained, folder):
    before = (trained / "model.pt").read_bytes()
    code, _, err = run_cli(capsys, "train", "--data", folder, "--out", trained, "--epochs", "1")
    assert code == 1 and "--force" in err and (trained / "model.pt").read_bytes() == before


def test_unavailable_data_is_an_error_never_a_synthetic_fallback(capsys, tmp_path, monkeypatch):
    import resnet_lessons.data as data

    def unavailable(source, **kwargs):
        assert source == "cifar10", "the command line must not try another source"
        raise data.DataUnavailable("CIFAR-10 is not in /nowhere and cannot be had: no network")

    monkeypatch.setattr(data, "load", unavailable)
    code, _, err = run_cli(capsys, "train", "--data", "cifar10", "--out", tmp_path / "o", "--profile", "smoke")
    assert code == 1 and "cannot be had" in err and not (tmp_path / "o" / "model.pt").exists()
    code, _, err = run_cli(capsys, "train", "--data", tmp_path / "missing", "--out", tmp_path / "o")
    assert code == 1 and "does not exist" in err


def test_evaluate_errors_name_the_file_and_both_class_lists(capsys, trained, tmp_path):
    code, _, err = run_cli(capsys, "evaluate", tmp_path / "none.pt", "--data", "synthetic")
    assert code == 1 and "does not exist" in err
    code, _, err = run_cli(capsys, "evaluate", trained / "model.pt", "--data", "synthetic")
    assert code == 1 and "['disc', 'square']" in err and "'hstripes'" in err
    with pytest.raises(cli.CommandError, match="does not exist"):  # --debug shows the traceback instead
        cli.main(["--debug", "evaluate", str(tmp_path / "none.pt"), "--data", "synthetic"])


def _train_command(folder, out, *extra):
    return [sys.executable, "-m", "resnet_lessons", "train", "--data", str(folder), "--out", str(out),
            "--profile", "smoke", "--model", "resnet8", "--epochs", "5", "--seed", "1", *extra]


@pytest.mark.slow  # three real processes
def test_a_run_killed_with_sigkill_resumes_to_the_same_weights(folder, tmp_path):
    reference = subprocess.Popen(_train_command(folder, tmp_path / "reference"), stderr=subprocess.PIPE, text=True)
    victim_out = tmp_path / "victim"
    victim = subprocess.Popen(_train_command(folder, victim_out), stderr=subprocess.PIPE, text=True)
    checkpoint = victim_out / "checkpoint.pt"
    deadline = time.monotonic() + 240
    while not checkpoint.exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    _, err = victim.communicate()
    assert victim.returncode == -signal.SIGKILL, f"the run ended before it could be killed: {err[-2000:]}"
    assert not (victim_out / "model.pt").exists()
    killed_at = checkpoints.load(checkpoint).train_state["epoch"]
    assert 1 <= killed_at < 5
    resumed = subprocess.run(_train_command(folder, victim_out, "--resume"), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err[-2000:]
    a = checkpoints.load(tmp_path / "reference" / "model.pt")
    b = checkpoints.load(victim_out / "model.pt")
    assert a.model_state.keys() == b.model_state.keys()
    for name, value in a.model_state.items():
        assert torch.equal(value, b.model_state[name]), f"{name} differs after resuming from epoch {killed_at}"
    assert [row["epoch"] for row in b.history] == [1, 2, 3, 4, 5]
    assert [row["train_loss"] for row in b.history] == [row["train_loss"] for row in a.history]
