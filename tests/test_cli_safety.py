"""Issue 16: the command line never loses or overwrites a user's files, never writes outside its output
folder, and says clearly what went wrong. Real files, real subprocesses, real SIGKILL, a real full disk
(a small tmpfs where mounting is allowed, else RLIMIT_FSIZE or a simulated ENOSPC)."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
import torch
from clirun import run_cli
from PIL import Image

from resnet_lessons import _files, checkpoints, cli, data
from resnet_lessons.data import DataError, make_synthetic
from resnet_lessons.models import build_model

CLASSES = ("disc", "square")
TESTS = Path(__file__).parent


def write_images(root: Path, per_class: int, classes=CLASSES, seed: int = 3) -> Path:
    """``root/<class>/<i>.png`` for each class (synthetic drawings at 32x32)."""
    images = make_synthetic(per_class, image_size=32, seed=seed)
    for index in range(len(images)):
        label = int(images.labels[index])
        if label < len(classes):
            target = root / classes[label]
            target.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images.images[index].permute(1, 2, 0).numpy()).save(target / f"{index:04d}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """90 PNGs per class: the smoke profile carves 50 per class for val, leaving one batch of 80 to train on."""
    return write_images(tmp_path_factory.mktemp("images"), 90)


def train_args(folder, out, *extra):
    return ["train", "--data", folder, "--out", out, "--profile", "smoke", "--epochs", "1", *extra]


def command(*argv) -> list[str]:
    return [sys.executable, "-m", "resnet_lessons", *map(str, argv)]


@pytest.fixture(scope="module")
def trained(folder, tmp_path_factory):
    """A finished run: model.pt, checkpoint.pt, history.csv, metrics.json."""
    out = tmp_path_factory.mktemp("run")
    assert cli.main([str(a) for a in train_args(folder, out)]) == 0
    return out


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob(".*.tmp"))


def tiny_checkpoint(path: Path, model=None, **fields) -> Path:
    model = model if model is not None else build_model("resnet8", num_classes=2, width=0.25)
    payload = checkpoints.make_checkpoint(model, model_name="resnet8", model_options={"width": 0.25}, classes=CLASSES,
                                          mean=(0.5,) * 3, std=(0.25,) * 3,
                                          extra={"data": {"image_size": 32, "val_per_class": 50}})
    payload.update(fields)
    return checkpoints.save(payload, path)


# --- 1. export never overwrites its input, nor any file without --force ------------------------------------------


def test_export_never_overwrites_its_checkpoint_and_replaces_another_file_only_with_force(tmp_path, capsys):
    model_pt = tiny_checkpoint(tmp_path / "run" / "model.pt")
    before = model_pt.read_bytes()
    link = tmp_path / "link.pt"
    link.symlink_to(model_pt)
    for out, extra in ((model_pt, ()), (model_pt, ("--force",)), (link, ("--force",))):
        code, _, err = run_cli(capsys, "export", model_pt, "--format", "torchscript", "--out", out, *extra)
        assert code == 1 and "would overwrite the checkpoint" in err and len(err.strip().splitlines()) == 1
    assert model_pt.read_bytes() == before and link.is_symlink()

    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    common = ("export", model_pt, "--format", "torchscript", "--out", notes, "--verify-images", "4")
    code, _, err = run_cli(capsys, *common)
    assert code == 1 and f"{notes} already exists; pass --force" in err and notes.read_text() == "my notes\n"
    code, out, _ = run_cli(capsys, *common, "--force")
    assert code == 0 and notes.read_bytes()[:2] == b"PK"  # a TorchScript archive now, written by rename
    assert list(tmp_path.glob(".notes.txt*")) == [] and (tmp_path / "notes.txt.json").exists()


# --- 2. resume needs something to resume; a finished run is replaced only with --force ---------------------------


def test_resume_with_nothing_to_resume_is_an_error_that_says_what_is_there(tmp_path, trained, folder, capsys):
    out = tmp_path / "finetuned"
    out.mkdir()
    shutil.copy(trained / "model.pt", out / "model.pt")
    before = (out / "model.pt").read_bytes()
    code, _, err = run_cli(capsys, *train_args(folder, out, "--resume"))
    assert code == 1 and f"nothing to resume in {out}: there is no checkpoint.pt (it holds model.pt)" in err
    assert (out / "model.pt").read_bytes() == before and sorted(os.listdir(out)) == ["model.pt"]

    code, _, err = run_cli(capsys, *train_args(folder, tmp_path / "never", "--resume"))
    assert code == 1 and "does not exist" in err and not (tmp_path / "never").exists()

    finished = (trained / "model.pt").read_bytes()
    code, _, err = run_cli(capsys, *train_args(folder, trained, "--resume"))
    assert code == 1 and "holds a finished run (model.pt)" in err and "--force" in err
    assert (trained / "model.pt").read_bytes() == finished

    only_metrics = tmp_path / "metrics-only"
    only_metrics.mkdir()
    (only_metrics / "metrics.json").write_text('{"mine": true}\n')
    code, _, err = run_cli(capsys, *train_args(folder, only_metrics))
    assert code == 1 and "already holds metrics.json; pass --force" in err
    assert (only_metrics / "metrics.json").read_text() == '{"mine": true}\n'


def test_force_replaces_a_finished_run(tmp_path, trained, folder, capsys):
    out = tmp_path / "again"
    shutil.copytree(trained, out)
    code, _, err = run_cli(capsys, *train_args(folder, out, "--force", "--seed", "5"))
    assert code == 0, err
    assert checkpoints.load(out / "model.pt").extra["train_config"]["seed"] == 5
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "history.csv", "metrics.json", "model.pt"]


# --- 3. one run per output folder: an OS lock, released when the process dies ------------------------------------

HOLD_THE_FOLDER = textwrap.dedent("""
    import sys, time
    import resnet_lessons.data as data

    def slow_load(*args, **kwargs):  # the run holds its folder while it 'loads data' for minutes
        time.sleep(600)

    data.load = slow_load
    from resnet_lessons.cli import main
    raise SystemExit(main(sys.argv[1:]))
""")


@pytest.mark.slow  # two real processes
def test_a_second_run_on_the_same_folder_stops_at_once_naming_the_first(tmp_path, folder, capsys):
    out = tmp_path / "shared"
    first = subprocess.Popen([sys.executable, "-c", HOLD_THE_FOLDER, *map(str, train_args(folder, out))],
                             stderr=subprocess.PIPE, text=True)
    try:
        lock = out / _files.LOCK_NAME
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and first.poll() is None:
            if lock.exists() and lock.read_text().strip() == str(first.pid):
                break
            time.sleep(0.05)
        assert first.poll() is None, first.stderr.read()
        second = subprocess.run(command(*train_args(folder, out)), capture_output=True, text=True, timeout=120)
        assert second.returncode == 1
        assert f"{out} is in use by another resnet-lessons run (process {first.pid})" in second.stderr
        assert first.poll() is None, "the second run disturbed the first"
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    assert first.returncode == -signal.SIGKILL
    with open(lock) as stream:  # the dead process's lock is gone with it
        fcntl.flock(stream, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(stream, fcntl.LOCK_UN)
    code, _, err = run_cli(capsys, *train_args(folder, out))
    assert code == 0, err
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "history.csv", "metrics.json", "model.pt"]


# --- 4. links planted in the output folder are never written through ---------------------------------------------


def test_links_planted_in_the_output_folder_are_replaced_never_followed(tmp_path, folder, capsys):
    out = tmp_path / "out"
    out.mkdir()
    victims = {}
    for name in (".write-test", "metrics.json", "history.csv", "model.pt"):
        victim = tmp_path / f"victim-{name.strip('.')}"
        victim.write_text(f"precious {name}\n")
        (out / name).symlink_to(victim)
        victims[name] = victim
    code, _, err = run_cli(capsys, *train_args(folder, out, "--force"))
    assert code == 0, err
    for name, victim in victims.items():
        assert victim.read_text() == f"precious {name}\n", f"{name} was written through its link"
    for name in ("metrics.json", "history.csv", "model.pt"):
        assert not (out / name).is_symlink() and (out / name).is_file()
    assert json.loads((out / "metrics.json").read_text())["epochs"] == 1

    trap = tmp_path / "trap"
    trap.mkdir()
    victim = tmp_path / "victim-lock"
    victim.write_text("precious\n")
    (trap / _files.LOCK_NAME).symlink_to(victim)
    code, _, err = run_cli(capsys, *train_args(folder, trap))
    assert code == 1 and "it is a symbolic link" in err and victim.read_text() == "precious\n"


# --- 5. every file through one atomic write -----------------------------------------------------------------------

WRITE_RUN = textwrap.dedent("""
    import resource, sys
    from pathlib import Path
    from types import SimpleNamespace

    import pandas as pd

    sys.path.insert(0, sys.argv[2])
    from tiny import tiny_data
    from resnet_lessons.cli.runs import write_run
    from resnet_lessons.models import build_model
    from resnet_lessons.profiles import get_profile
    from resnet_lessons.train import config_from_profile

    from resnet_lessons import checkpoints

    real_save = checkpoints.save

    def save_then_fill_the_disk(*args, **kwargs):
        path = real_save(*args, **kwargs)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200, 200))  # after model.pt: history.csv fits, metrics.json not
        return path

    checkpoints.save = save_then_fill_the_disk
    profile = get_profile("smoke")
    model = build_model("resnet8", num_classes=10, width=0.125)
    result = SimpleNamespace(history=pd.DataFrame([{"epoch": 1, "train_loss": 1.0}]))
    metrics = {"val_accuracy": 0.5, "epochs": 1, "stopped": "completed", "seconds": 1.0, "notes": ["x" * 1000]}
    write_run(Path(sys.argv[1]), model, tiny_data(4, 1), result, config_from_profile(profile), metrics,
              source="synthetic", profile=profile, seed=0)
""")


def _no_signal_on_large_files() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of killing the process


def test_metrics_json_is_written_atomically_when_the_file_cannot_be_completed(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text('{"old": true}\n')
    run = subprocess.run([sys.executable, "-c", WRITE_RUN, str(out), str(TESTS)], capture_output=True, text=True,
                         timeout=300, preexec_fn=_no_signal_on_large_files)
    assert run.returncode == 1, run.stderr[-2000:]
    assert f"cannot write {out / 'metrics.json'}" in run.stderr and "the last good file" in run.stderr
    assert (out / "metrics.json").read_text() == '{"old": true}\n'  # never a partial or empty file
    assert checkpoints.load(out / "model.pt").model_name == "resnet8"
    assert temporaries(out) == []


def test_the_image_cache_is_written_through_the_one_atomic_write(tmp_path, monkeypatch):
    src = write_images(tmp_path / "src", 3)
    written = []

    def recording(path, content, **kwargs):
        written.append(Path(path).suffix)
        return _files.atomic_write(path, content, **kwargs)

    monkeypatch.setattr(data.cache, "atomic_write", recording)
    data.load(src, val_per_class=1, cache_dir=tmp_path / "cache")
    assert sorted(written) == [".json", ".npy"] and temporaries(tmp_path / "cache" / "images") == []


# --- 6. a zip bomb is refused before it is read ----------------------------------------------------------------

PEAK_MEMORY = textwrap.dedent("""
    import resource, sys
    from resnet_lessons import data
    from resnet_lessons.cli import main

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        code = main(sys.argv[1:])
    finally:
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        print(f"grew {grown} KiB", file=sys.stderr)
    raise SystemExit(code)
""")


def _png(seed: int) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(make_synthetic(1, image_size=16, seed=seed).images[0].permute(1, 2, 0).numpy()).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.slow  # a real process decompressing (or not) 256 MiB
def test_a_zip_member_larger_than_an_image_may_be_is_never_read(tmp_path):
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        for k, name in enumerate(("cat", "dog")):
            for i in range(2):
                archive.writestr(f"{name}/{i}.png", _png(10 * k + i))
        with archive.open("cat/huge.png", "w", force_zip64=True) as member:
            for _ in range(16):
                member.write(bytes(16 * 2**20))  # 256 MiB of zeros: about 260 kB compressed
    assert bomb.stat().st_size < 2**20
    run = subprocess.run([sys.executable, "-c", PEAK_MEMORY, "data", str(bomb), "--val-per-class", "0",
                          "--cache-dir", str(tmp_path / "cache")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 1
    assert "cat/huge.png (256.0 MiB uncompressed, more than the 64 MiB an image may have; not read)" in run.stderr
    assert "--skip-bad" in run.stderr
    grown_kib = int(run.stderr.split("grew ")[1].split()[0])
    assert grown_kib < 100 * 1024, f"reading the listing grew memory by {grown_kib / 1024:.0f} MiB"
    with pytest.warns(UserWarning, match="cat/huge.png"):
        d = data.load(bomb, val_per_class=0, cache_dir=tmp_path / "cache", skip_bad=True)
    assert d.train.counts() == {"cat": 2, "dog": 2}


def test_an_image_file_larger_than_the_limit_is_not_read(tmp_path):
    src = write_images(tmp_path / "src", 2)
    big = src / "disc" / "big.png"
    big.write_bytes(_png(1))
    os.truncate(big, 65 * 2**20)  # sparse: 65 MiB long, nothing on the disk
    with pytest.raises(DataError, match=r"disc/big.png \(65.0 MiB, more than the 64 MiB an image may have; not read\)"):
        data.load(src, val_per_class=0, cache_dir=tmp_path / "cache")


# --- 7. a full disk during a checkpoint save; temporaries of a killed save -----------------------------------------

SAVE_UNDER_A_LIMIT = textwrap.dedent("""
    import resource, sys
    sys.path.insert(0, sys.argv[2])
    from test_cli_safety import tiny_checkpoint
    from pathlib import Path

    path = tiny_checkpoint(Path(sys.argv[1]))
    resource.setrlimit(resource.RLIMIT_FSIZE, (8_000, 8_000))
    from resnet_lessons import checkpoints
    try:
        checkpoints.save(checkpoints.load_raw(path), path)
    except OSError as error:
        print(error, file=sys.stderr)
        raise SystemExit(1)
""")


def test_a_checkpoint_save_that_cannot_be_completed_names_the_file_and_keeps_the_last_good_one(tmp_path):
    path = tmp_path / "run" / "checkpoint.pt"
    run = subprocess.run([sys.executable, "-c", SAVE_UNDER_A_LIMIT, str(path), str(TESTS)], capture_output=True,
                         text=True, timeout=300, preexec_fn=_no_signal_on_large_files)
    assert run.returncode == 1, run.stderr[-2000:]
    message = run.stderr.strip().splitlines()[-1]
    assert message == (f"cannot write {path}: the file would be larger than this system allows (File too large); "
                       f"the last good checkpoint {path} is kept")
    assert "enforce fail" not in run.stderr
    assert checkpoints.load(path).classes == CLASSES and temporaries(path.parent) == []


def test_a_full_disk_is_called_a_full_disk(tmp_path, monkeypatch):
    path = tiny_checkpoint(tmp_path / "checkpoint.pt")
    before = path.read_bytes()

    def full(obj, stream, *args, **kwargs):
        stream.write(b"PK\x03\x04 some bytes")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full)
    full_disk = r"the disk is full \(No space left on device\); the last good checkpoint .* is kept"
    with pytest.raises(OSError, match=full_disk):
        checkpoints.save(checkpoints.load_raw(path), path)
    assert path.read_bytes() == before and temporaries(tmp_path) == []


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real, small file system, or a skip where this machine does not let a test mount one."""
    mounted = []

    def mount(size_bytes: int) -> Path:
        point = tmp_path / f"tmpfs{len(mounted)}"
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(point)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode})")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], check=False)


@pytest.mark.slow  # a real training run on a real file system that fills up
def test_a_disk_that_fills_up_during_training_keeps_the_last_good_checkpoint(small_tmpfs, trained, folder):
    pages = -(-(trained / "checkpoint.pt").stat().st_size // 4096)
    disk = small_tmpfs(4096 * (1 + pages + pages // 2))  # the lock and one checkpoint, not two at once
    out = disk / "run"
    run = subprocess.run(command(*train_args(folder, out))[:-1] + ["3"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 1, run.stderr[-2000:]
    path = out / "checkpoint.pt"
    assert (f"cannot write {path}: the disk is full (No space left on device); the last good checkpoint {path} "
            "is kept") in run.stderr
    assert checkpoints.load(path).train_state["epoch"] == 1 and temporaries(out) == []


KILLED_DURING_A_SAVE = textwrap.dedent("""
    import sys, time
    import torch

    def slow_save(obj, stream, *args, **kwargs):  # some bytes reach the temporary file, then the process dies
        stream.write(b"PK\\x03\\x04 partial")
        stream.flush()
        time.sleep(600)

    torch.save = slow_save
    from resnet_lessons.cli import main
    raise SystemExit(main(sys.argv[1:]))
""")


@pytest.mark.slow  # a real process killed with SIGKILL in the middle of a save
def test_a_save_killed_with_sigkill_leaves_a_temporary_that_the_next_run_removes(tmp_path, folder, capsys):
    out = tmp_path / "run"
    victim = subprocess.Popen([sys.executable, "-c", KILLED_DURING_A_SAVE, *map(str, train_args(folder, out))],
                              stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240

    def half_written() -> bool:
        return any(p.stat().st_size > 0 for p in out.glob(".checkpoint.pt.*.tmp")) if out.exists() else False

    while not half_written() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    _, err = victim.communicate()
    assert victim.returncode == -signal.SIGKILL, err[-2000:]
    left = temporaries(out)
    assert left and left[0].startswith(".checkpoint.pt.") and not (out / "checkpoint.pt").exists()
    (out / ".mine.abcd1234.tmp").write_text("a user's file that looks like a temporary\n")
    code, _, err = run_cli(capsys, *train_args(folder, out))
    assert code == 0, err
    assert temporaries(out) == [".mine.abcd1234.tmp"]  # only the run's own temporaries are removed
    assert sorted(os.listdir(out)) == [".mine.abcd1234.tmp", "checkpoint.pt", "history.csv", "metrics.json", "model.pt"]


# --- 8. evaluate accepts a source with only the split it reads ------------------------------------------------------


def test_evaluate_reads_a_source_that_has_only_a_test_split(tmp_path, trained, capsys):
    src = tmp_path / "src"
    write_images(src / "test", 20, seed=9)
    code, out, err = run_cli(capsys, "evaluate", trained / "model.pt", "--data", src, "--split", "test", "--json")
    assert code == 0, err
    assert json.loads(out)["n"] == 40
    code, _, err = run_cli(capsys, "evaluate", trained / "model.pt", "--data", src, "--split", "val")
    assert code == 1 and "has no split 'val'; it has test" in err


# --- 9. --skip-bad on every command that loads data, named in the message -------------------------------------------


@pytest.mark.parametrize("name", ["train", "evaluate", "finetune", "export", "data"])
def test_every_command_that_loads_data_takes_skip_bad(name):
    commands = cli.build_parser()._subparsers._group_actions[0].choices
    assert "--skip-bad" in commands[name]._option_string_actions


def test_a_corrupt_image_names_the_flag_that_skips_it(tmp_path, trained, folder, capsys):
    src = tmp_path / "src"
    shutil.copytree(folder, src)
    (src / "disc" / "0000.png").write_bytes(b"not a png")
    code, _, err = run_cli(capsys, *train_args(src, tmp_path / "out"))
    assert code == 1 and "disc/0000.png" in err and "skip them with --skip-bad" in err
    assert not (tmp_path / "out").exists()
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        code, _, err = run_cli(capsys, "evaluate", trained / "model.pt", "--data", src, "--skip-bad")
    assert code == 0, err


# --- 10. fewer than two classes -------------------------------------------------------------------------------------


def test_a_dataset_with_one_class_is_refused(tmp_path, capsys):
    src = write_images(tmp_path / "src", 120, classes=("disc",))  # enough to train: today it reached "accuracy 1.0"
    code, _, err = run_cli(capsys, *train_args(src, tmp_path / "out"))
    assert code == 1 and "has only one class (disc); a classifier needs at least two classes" in err
    assert not (tmp_path / "out").exists()  # 14: a failed run leaves no empty folder


# --- 11. symbolic links in a data folder: followed only inside it, always named ----------------------------------


def test_links_are_followed_only_inside_the_data_folder_and_named_in_every_message(tmp_path, capsys):
    src = tmp_path / "src"
    write_images(src, 3)
    (src / ".pool").mkdir()
    write_images(src / ".pool", 3, classes=("ring",), seed=4)
    (src / "ring").symlink_to(".pool/ring")  # a class folder linked from inside: followed
    cache = tmp_path / "cache"
    loaded = data.load(src, val_per_class=0, cache_dir=cache)
    assert loaded.train.counts() == {"disc": 3, "ring": 3, "square": 3}

    outside = tmp_path / "outside"
    write_images(outside, 1)
    secret = next((outside / "disc").iterdir())
    (src / "disc" / "secret.png").symlink_to(secret)
    (src / "disc" / "ghost.png").symlink_to(tmp_path / "nowhere.png")
    code, _, err = run_cli(capsys, "data", src, "--val-per-class", "0", "--cache-dir", cache)
    assert code == 1 and "cannot read 2 image(s)" in err
    assert f"disc/ghost.png (a symbolic link to {tmp_path / 'nowhere.png'}, which does not exist; not read)" in err
    assert f"disc/secret.png (a symbolic link to {secret}, outside the data folder" in err and "--skip-bad" in err
    with pytest.warns(UserWarning, match="disc/ghost.png.*disc/secret.png"):
        loaded = data.load(src, val_per_class=0, cache_dir=cache, skip_bad=True)
    assert loaded.train.counts() == {"disc": 3, "ring": 3, "square": 3}

    (src / "cross").symlink_to(outside / "square")
    with pytest.raises(DataError, match=r"refusing the symbolic link cross -> .*outside/square: it leads outside"):
        data.load(src, val_per_class=0, cache_dir=cache, skip_bad=True)


# --- 12. a truncated zip --------------------------------------------------------------------------------------------


def test_a_truncated_zip_is_called_damaged_or_truncated(tmp_path):
    whole = tmp_path / "whole.zip"
    with zipfile.ZipFile(whole, "w") as archive:
        for k, name in enumerate(CLASSES):
            for i in range(3):
                archive.writestr(f"{name}/{i}.png", _png(10 * k + i))
    cut = tmp_path / "cut.zip"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(DataError, match=r"cut.zip is a damaged or truncated zip archive"):
        data.load(cut, val_per_class=0, cache_dir=tmp_path / "cache")


# --- 13. checkpoint messages ----------------------------------------------------------------------------------------


def test_another_architectures_weights_are_described_not_cut_off(tmp_path, folder, capsys):
    path = tiny_checkpoint(tmp_path / "model.pt", model=build_model("resnet20", num_classes=2))
    code, _, err = run_cli(capsys, "evaluate", path, "--data", folder)
    assert code == 1 and "the weights do not fit resnet8 with options {'width': 0.25}" in err
    assert "unexpected, such as layer1.1.conv1.weight" in err and "of another shape, such as conv1.weight" in err
    assert "for ResNet:" not in err


def test_resuming_with_other_data_says_how_many_classes_each_has(tmp_path, trained, capsys):
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(trained / "checkpoint.pt", out / "checkpoint.pt")
    three = write_images(tmp_path / "three", 90, classes=("disc", "square", "ring"))
    code, _, err = run_cli(capsys, *train_args(three, out, "--resume"))
    assert code == 1 and "this run was trained on 2 classes, the data has 3" in err
    assert "size mismatch" not in err and len(err.strip().splitlines()) == 1


def test_a_checkpoint_without_classes_or_with_absurd_options_is_refused_before_building(tmp_path, folder, capsys):
    path = tiny_checkpoint(tmp_path / "model.pt")
    raw = checkpoints.load_raw(path)
    del raw["classes"]
    checkpoints.save(raw, tmp_path / "no-classes.pt")
    code, _, err = run_cli(capsys, "evaluate", tmp_path / "no-classes.pt", "--data", folder)
    assert code == 1 and "lacks 'classes': it is damaged, or was not written by resnet-lessons" in err

    tiny_checkpoint(tmp_path / "wide.pt", model_options={"width": 1e6})
    started = time.perf_counter()
    code, _, err = run_cli(capsys, "evaluate", tmp_path / "wide.pt", "--data", folder)
    assert code == 1 and "width must be positive and at most 16, got 1000000.0" in err
    assert time.perf_counter() - started < 30


class Payload:
    """Unpickling this calls open(marker, "w"): a stand-in for any code an attacker wants run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_finetune_refuses_a_malicious_pickle_with_the_refusal_every_command_gives(tmp_path, folder, capsys):
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"conv1.weight": torch.zeros(1), "extra": Payload(marker)}, evil)
    code, _, finetune_err = run_cli(capsys, "finetune", "--weights", evil, "--data", folder, "--out", tmp_path / "o",
                                    "--profile", "smoke", "--epochs", "1")
    code_eval, _, evaluate_err = run_cli(capsys, "evaluate", evil, "--data", folder)
    assert code == code_eval == 1 and not marker.exists() and not (tmp_path / "o").exists()
    refusal = f"refused to load {evil}: it holds objects other than tensors and plain data"
    assert refusal in finetune_err and refusal in evaluate_err and "could run code when unpickled" in finetune_err
    assert finetune_err.split("error: ")[1] == evaluate_err.split("error: ")[1]


# --- 14. usage errors, stderr, an explicit --data, no empty folders --------------------------------------------------


@pytest.mark.parametrize("argv", [
    ("train", "--data", "synthetic", "--out", "o", "--epochs", "0"),
    ("finetune", "--weights", "imagenet", "--data", "synthetic", "--out", "o", "--lr", "inf"),
    ("finetune", "--weights", "imagenet", "--data", "synthetic", "--out", "o", "--lr", "nan"),
    ("evaluate", "model.pt", "--data", "synthetic", "--batch-size", "0"),
    ("export", "model.pt", "--format", "onnx", "--out", "m.onnx", "--tolerance", "inf"),
])
def test_bad_values_are_usage_errors(tmp_path, capsys, argv):
    with pytest.raises(SystemExit) as stop:
        cli.main(list(argv))
    assert stop.value.code == 2 and "usage:" in capsys.readouterr().err
    assert not (Path.cwd() / "o").exists()


def test_a_usage_error_exits_2_from_a_real_process(tmp_path):
    run = subprocess.run(command("train", "--data", "synthetic", "--out", tmp_path / "o", "--epochs", "0"),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "argument --epochs: must be at least 1, got 0" in run.stderr
    assert not (tmp_path / "o").exists()


def test_predict_prints_per_file_errors_on_stderr(tmp_path, trained, folder, capsys):
    good = sorted((folder / "disc").iterdir())[0]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    code, out, err = run_cli(capsys, "predict", trained / "model.pt", good, broken)
    assert code == 1 and out.startswith(f"{good}: ") and "broken.jpg" not in out
    assert f"{broken}: error: cannot read {broken} as an image" in err


def test_an_explicit_data_flag_wins_and_the_variable_is_not_read(tmp_path, folder, capsys, monkeypatch):
    monkeypatch.setenv("RESNET_LESSONS_DATA", str(tmp_path / "no-such-folder"))
    code, _, err = run_cli(capsys, *train_args(folder, tmp_path / "out", "--model", "no-such-model"))
    assert code == 1 and "unknown model 'no-such-model'" in err and "no-such-folder" not in err
    assert not (tmp_path / "out").exists()  # failed before writing anything: the folder is gone again


# --- 15 and 16. the cpu profile uses all the user's data; a log gets one plain line per epoch -----------------------


@pytest.mark.slow  # a real process in the cpu profile
def test_a_cpu_profile_run_uses_all_images_and_logs_one_plain_line_per_epoch(tmp_path):
    src = tmp_path / "src"
    write_images(src / "train", 150)
    write_images(src / "val", 5, seed=8)
    out, log = tmp_path / "out", tmp_path / "train.log"
    with open(log, "w") as stream:
        run = subprocess.run(command("train", "--data", src, "--out", out, "--profile", "cpu", "--model", "resnet8",
                                     "--epochs", "2"), stdout=stream, stderr=subprocess.STDOUT, timeout=600)
    text = log.read_text()
    assert run.returncode == 0, text[-2000:]
    assert "\r" not in text and "\x1b" not in text, "progress bars were written into a log"
    assert f"training resnet8 on {src} (300 images, cpu profile)" in text
    epochs = [line for line in text.splitlines() if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in epochs] == ["epoch 1/2", "epoch 2/2"] and "val_accuracy" in epochs[-1]
    assert checkpoints.load(out / "model.pt").extra["data"]["train_per_class"] is None
