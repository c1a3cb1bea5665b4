"""bench/ladder.py: the rungs walk from the article's recipe to the CPU recipe one change at a time, and the script
runs end to end at its smallest size on the synthetic stand-in, writes its JSON, and refuses bad arguments."""

from __future__ import annotations

import importlib.util
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "ladder.py"
TINY = ["--data", "synthetic", "--synthetic-per-class", "30", "--val-per-class", "4", "--train-per-class", "26"]


@pytest.fixture(scope="module")
def ladder():
    sys.path.insert(0, str(ROOT / "bench"))  # the scripts import their neighbour common.py
    try:
        spec = importlib.util.spec_from_file_location("ladder", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["ladder"] = module  # its dataclasses look their module up
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("ladder", None)
        sys.path.remove(str(ROOT / "bench"))


def test_each_rung_changes_one_thing_and_the_last_is_the_cpu_recipe(ladder):
    ladder.check_ladder()
    configs = [cfg for cfg in ladder.rung_configs() if cfg is not None]
    first, last = configs[0], configs[-1]
    assert ladder.differences(last, ladder.CPU_RECIPE) == {}
    # rung 0 is chapter 5's `article` on time_to_accuracy.py's network: ResNet-18 with the ImageNet stem
    assert (first.model, first.model_options, first.optimizer, first.lr, first.schedule) == (
        "resnet18", {}, "adam", 1e-3, "constant")
    assert (first.weight_decay, first.label_smoothing, first.crop_padding, first.flip, first.batch_size) == (
        0.0, 0.0, 0, False, 128)
    for before, after, rung in zip(configs, configs[1:], ladder.RUNGS[1:]):
        assert set(ladder.differences(before, after)) <= set(rung.restores) | dict(rung.sets).keys(), rung.id
    assert [r.id for r in ladder.RUNGS][-1] == "flip_tta" and ladder.RUNGS[-1].tta


def test_the_article_as_written_crashes(ladder):
    result = ladder.article_as_written()
    assert result["crashes"] and "1000" in result["error"]


def test_spread_against_statistics():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import common
    finally:
        sys.path.remove(str(ROOT / "bench"))
    values = [0.61, 0.64, 0.58]
    got = common.spread(values)
    assert got["mean"] == pytest.approx(sum(values) / 3) and got["std"] == pytest.approx(statistics.stdev(values))
    assert (got["min"], got["max"], got["values"]) == (0.58, 0.64, values)
    assert common.spread([0.5])["std"] is None


@pytest.mark.slow
def test_ladder_runs_end_to_end_and_writes_its_json(tmp_path):
    out = tmp_path / "ladder.json"
    done = subprocess.run([sys.executable, str(SCRIPT), *TINY, "--budget", "1", "--seeds", "1", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["benchmark"] == "ladder" and result["smoke"] is True and result["complete"] is True
    assert result["label"] == "synthetic, validation" and result["val_images"] == 40 and result["train_images"] == 260
    assert result["budget_s"] == 1 and result["seeds"] == [0] and result["last_rung_is_cpu_recipe"] is True
    assert result["article_as_written"]["crashes"] is True and "head" in result["notes"]
    assert {"cpu", "cpu_count", "torch_threads", "load_average_at_end"} <= set(result["hardware"])
    assert result["versions"]["torch"] == str(torch.__version__) and result["date"][:2] == "20"
    assert result["command"].startswith("bench/ladder.py")
    rungs = result["rungs"]
    assert [r["id"] for r in rungs] == ["article", "network", "augmentation", "sgd_onecycle", "label_smoothing",
                                        "bf16", "muon", "flip_tta"]
    assert rungs[3]["config_changes"]["optimizer"] == "sgd"  # SGD first; Muon is a rung of its own
    for index, rung in enumerate(rungs):
        assert rung["rung"] == index
        assert {"change", "mean", "std", "min", "max", "values", "binomial_se", "gain", "epochs", "runs"} <= set(rung)
        assert len(rung["values"]) == len(rung["runs"]) == len(rung["epochs"]) == 1 and rung["std"] is None
        assert 0 <= rung["min"] <= rung["mean"] <= rung["max"] <= 1
        assert all(e > 0 for e in rung["epochs"]) and (rung["gain"] is None) == (index == 0)
        for run in rung["runs"]:
            assert run["seed"] == 0 and run["val_accuracy"] * 40 == pytest.approx(round(run["val_accuracy"] * 40))
    assert rungs[0]["config_changes"]["optimizer"] == "adam" and rungs[0]["precision"] == "fp32"
    assert rungs[2]["config_changes"] == {"crop_padding": 4, "flip": True}
    tta = rungs[-1]
    assert tta["trained"] is False and tta["epochs"] == rungs[-2]["epochs"]
    # the same models and precision as fit's last validation pass (at most an argmax tie apart)
    assert abs(tta["runs"][0]["val_accuracy_without_flip"] - rungs[-2]["runs"][0]["val_accuracy"]) <= 1 / 40 + 1e-9
    assert "What each correction buys" in done.stdout and "label_smoothing" in done.stdout


@pytest.mark.parametrize("args, message", [
    (["--budget", "0"], "--budget must be more than 0"),
    (["--seeds", "0"], "--seeds must be at least 1"),
    (["--train-per-class", "0"], "--train-per-class must be at least 1"),
    (["--data", "/no/such/images.zip"], "no such file or folder"),
    (["--budget", "soon"], "invalid float value"),
    (TINY[:-1] + ["5"], "fewer than one batch of 256"),
])
def test_bad_arguments_exit_2_with_a_one_line_message(ladder, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exited:
        ladder.main([*args, "--out", str(tmp_path / "x.json")])
    assert exited.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("ladder.py: error:") and message in last
    assert not (tmp_path / "x.json").exists()


def test_bad_arguments_exit_2_from_the_command_line(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--seeds", "-1", "--out", str(tmp_path / "x.json")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines()[-1] == "ladder.py: error: --seeds must be at least 1, got -1"
