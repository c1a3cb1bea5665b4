"""bench/paper_recipe.py: the paper's schedule placed at its iterations by the library's step schedule, and the
script end to end at a tiny size on the CPU (synthetic stand-in), against He et al. (2016), Table 6."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from resnet_lessons.optim import lr_at

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "paper_recipe.py"
TINY = ["--data", "synthetic", "--synthetic-per-class", "30", "--val-per-class", "4", "--device", "cpu"]


@pytest.fixture(scope="module")
def paper():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        spec = importlib.util.spec_from_file_location("paper_recipe", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["paper_recipe"] = module
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("paper_recipe", None)
        sys.path.remove(str(ROOT / "bench"))


@pytest.mark.parametrize("steps_per_epoch", [351, 390])  # 45,000 and 50,000 training images, batch 128
def test_the_rate_drops_at_32k_and_48k(paper, steps_per_epoch):
    epochs = round(64_000 / steps_per_epoch)
    cfg = paper.paper_config("resnet20", epochs, steps_per_epoch, 64_000, 0, precision="fp32", seed=0)
    total = epochs * steps_per_epoch
    assert abs(total - 64_000) <= steps_per_epoch / 2
    assert paper.lr_drops(cfg, total, 0) == [32_000, 48_000]
    rates = {step: lr_at(step, total, cfg) for step in (0, 31_999, 32_000, 47_999, 48_000, total - 1)}
    assert rates == pytest.approx({0: 0.1, 31_999: 0.1, 32_000: 0.01, 47_999: 0.01, 48_000: 0.001,
                                   total - 1: 0.001})
    assert (cfg.optimizer, cfg.momentum, cfg.nesterov, cfg.weight_decay, cfg.batch_size) == ("sgd", 0.9, False,
                                                                                              1e-4, 128)
    assert (cfg.crop_padding, cfg.flip, cfg.label_smoothing, cfg.decay_norm_and_bias) == (4, True, 0.0, True)


def test_after_a_warm_up_the_drops_stay_at_the_same_iterations(paper):
    cfg = paper.paper_config("resnet110", 163, 390, 64_000, 390, precision="fp32", seed=1)
    assert paper.lr_drops(cfg, 163 * 390, 390) == [32_000, 48_000]


def test_paper_figures_are_table_6(paper):
    assert paper.PAPER_ERROR == {"resnet20": 8.75, "resnet32": 7.51, "resnet44": 7.17, "resnet56": 6.97,
                                 "resnet110": 6.43}


@pytest.mark.slow
def test_paper_recipe_runs_end_to_end_at_a_tiny_size(tmp_path):
    out = tmp_path / "paper_recipe.json"
    done = subprocess.run([sys.executable, str(SCRIPT), *TINY, "--iterations", "4", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["benchmark"] == "paper_recipe" and result["smoke"] is True and result["complete"] is True
    assert result["model"] == "resnet20" and result["parameters"] == 269_722
    assert result["paper"]["error_percent"] == 8.75 and result["paper"]["lr_drops_at"] == [32_000, 48_000]
    assert result["steps_per_epoch"] == 2 and result["iterations_run"] == 4 and result["lr_drops_at"] == [2, 3]
    assert 0 <= result["error_percent"] <= 100
    assert result["accuracy"] * 40 == pytest.approx(round(result["accuracy"] * 40))
    assert result["difference_points"] == pytest.approx(result["error_percent"] - 8.75)
    assert len(result["curve"]) == 2 and result["warmup"] is None
    assert result["data"]["scored_split"] == "val" and result["data"]["scored_images"] == 40
    assert {"cpu", "cuda", "torch_threads"} <= set(result["hardware"]) and result["date"][:2] == "20"
    assert result["command"].startswith("bench/paper_recipe.py")
    assert "paper %" in done.stdout


@pytest.mark.parametrize("args, message", [
    (["--iterations", "0"], "--iterations must be at least 1"),
    (["--model", "resnet19"], "invalid choice: 'resnet19'"),
    (["--data", "/no/such/folder"], "no such file or folder"),
    (TINY + ["--train-per-class", "5"], "fewer than one batch of 128"),
])
def test_bad_arguments_exit_2(paper, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exited:
        paper.main([*args, "--out", str(tmp_path / "x.json")])
    assert exited.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("paper_recipe.py: error:") and message in last
    assert not (tmp_path / "x.json").exists()
