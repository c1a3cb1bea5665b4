"""Every benchmark script runs end to end at its smallest size and writes the JSON the book reads.

No speed is asserted (speed goals live in the scripts); these check that each script runs, prints its table and
records hardware, versions, date and command with its figures. Each runs as `python bench/<script>.py`, the way a
reader runs it.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from resnet_lessons import book, evaluate, speed
from resnet_lessons.models import build_model

ROOT = Path(__file__).resolve().parents[1]


def run_bench(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def check_record(result: dict, script: str) -> None:
    assert {"cpu", "cpu_count", "cpu_affinity", "torch_threads", "cuda"} <= set(result["hardware"])
    assert result["versions"]["torch"] == str(torch.__version__)
    assert result["date"][:2] == "20" and "T" in result["date"]
    assert result["command"].startswith(f"bench/{script}")


@pytest.mark.slow
def test_throughput_smoke(tmp_path):
    out = tmp_path / "throughput.json"
    printed = run_bench("throughput.py", "--smoke", "--out", str(out))
    result = json.loads(out.read_text())
    check_record(result, "throughput.py")
    assert result["benchmark"] == "throughput" and result["smoke"] is True
    rows = {row["id"]: row for row in result["results"]}
    assert {"resnet8/feature/baseline", "resnet8/feature/channels_last", "resnet8/feature/bf16",
            "resnet8/loader/DataLoader, 0 workers", "resnet8/threads/1 thread"} <= set(rows)
    assert result["failed"] == [] and all(row["status"] == "ok" for row in rows.values())
    for row in rows.values():
        assert row["images_per_s"] > 0 and row["peak_memory_mib"] > 0 and row["speedup"] > 0
    assert rows["resnet8/feature/baseline"]["speedup"] == 1.0
    assert "images/s" in printed and "resnet8/feature/bf16" in printed
    peaks = result["machine_peaks_gflops"]
    baseline = rows["resnet8/feature/baseline"]  # fp32: set beside the fp32 convolution's measured rate
    assert baseline["of_conv_peak"] == pytest.approx(baseline["gflops_per_s"] / peaks["conv3x3_fp32_gflops"])
    assert "machine peaks" in printed


@pytest.mark.slow
def test_throughput_isolated_configuration_runs_in_its_own_process(tmp_path):
    out = tmp_path / "t.json"
    run_bench("throughput.py", "--models", "resnet8", "--features", "baseline", "--focus", "resnet8", "--batch-sizes",
              "--workers", "--threads", "--batch-size", "16", "--steps", "1", "--warmup", "1", "--device", "cpu",
              "--out", str(out))
    result = json.loads(out.read_text())
    assert result["settings"]["isolated"] is True
    baseline = next(row for row in result["results"] if row["setting"] == "baseline")
    assert baseline["status"] == "ok" and baseline["process_s"] > 0
    assert baseline["memory"] == "process peak RSS (getrusage)" and baseline["training_memory_mib"] >= 0


@pytest.mark.slow
def test_gpu_speedrun_smoke(tmp_path):
    out = tmp_path / "gpu_speedrun.json"
    run_bench("gpu_speedrun.py", "--smoke", "--out", str(out))
    result = json.loads(out.read_text())
    check_record(result, "gpu_speedrun.py")
    assert result["benchmark"] == "gpu_speedrun" and result["smoke"] is True
    (run,) = result["runs"]
    assert run["epochs"] == 1 and len(run["curve"]) == 1
    assert 0 <= run["final_accuracy"] <= 1 and 0 <= run["final_accuracy_tta"] <= 1
    assert set(run["time_to"]) == {"0.94", "0.95"} and result["warmup_s"] > 0
    assert result["recipe"]["precision"] == "bf16" and result["recipe"]["channels_last"] is True
    assert result["summary"]["0.94"]["goal_s"] == 25.0 and result["anchors"]["0.94"]["seconds"] == 52


@pytest.mark.slow
def test_loader_benchmark_small(tmp_path):
    out = tmp_path / "loader.json"
    run_bench("loader.py", "--data", "synthetic", "--images", "256", "--batch-size", "64", "--min-seconds", "0.1",
              "--out", str(out))
    result = json.loads(out.read_text())
    check_record(result, "loader.py")
    assert result["fast_images_per_s"] > 0 and result["dataloader_w2_images_per_s"] > 0


@pytest.mark.slow
def test_time_to_accuracy_small(tmp_path):
    out = tmp_path / "tta.json"
    run_bench("time_to_accuracy.py", "--data", "synthetic", "--budgets", "3", "--val-per-class", "10",
              "--out", str(out))
    result = json.loads(out.read_text())
    check_record(result, "time_to_accuracy.py")
    assert {r["recipe"] for r in result["results"]} == {"cpu", "article"}
    assert all(0 <= r["val_accuracy"] <= 1 for r in result["results"])
    (cpu,) = [r for r in result["results"] if r["recipe"] == "cpu"]  # by default scored with 6 views
    assert "6 views" in cpu["tta"] and 0 <= cpu["val_accuracy_flip_only"] <= 1


@pytest.mark.slow
def test_time_to_accuracy_gives_the_spread_over_seeds_and_the_fraction_of_the_machine_peak(tmp_path):
    import statistics

    out = tmp_path / "tta.json"
    run_bench("time_to_accuracy.py", "--data", "synthetic", "--budgets", "2", "--val-per-class", "10",
              "--recipes", "cpu", "--seeds", "2", "--seed", "3", "--whiten", "--tta", "flip", "--out", str(out))
    result = json.loads(out.read_text())
    rows = result["results"]
    assert result["cpu_probes"] == {"whiten": True, "tta": "flip"}
    assert all("2 views" in r["tta"] and "val_accuracy_flip_only" not in r for r in rows)
    assert result["cpu_recipe"]["whiten"] is True
    assert all(r["whiten"] and 0 <= r["val_accuracy_without_tta"] <= 1 for r in rows)
    assert result["seeds"] == [3, 4] and [r["seed"] for r in rows] == [3, 4]
    (spread,) = result["summary"]["spread"]
    accuracies = [r["val_accuracy"] for r in rows]
    assert spread["mean"] == pytest.approx(statistics.fmean(accuracies))
    assert spread["std"] == pytest.approx(statistics.stdev(accuracies))
    assert (spread["min"], spread["max"]) == (min(accuracies), max(accuracies))
    peaks = result["machine_peaks_gflops"]
    assert peaks["conv3x3_fp32_gflops"] > 0 and peaks["matmul_fp32_gflops"] > 0
    for r in rows:  # 3 x forward FLOPs per image seen, over the run's seconds
        expected = 3 * result["forward_gflops_per_image"] * r["images_seen"] / r["seconds"]
        assert r["achieved_gflops"] == pytest.approx(expected)
        assert r["of_conv3x3_fp32_peak"] == pytest.approx(expected / peaks["conv3x3_fp32_gflops"])


@pytest.mark.slow
def test_time_to_accuracy_probes_a_recipe_variant_and_refuses_bad_ones(tmp_path):
    out = tmp_path / "probe.json"
    run_bench("time_to_accuracy.py", "--data", "synthetic", "--budgets", "3", "--val-per-class", "10",
              "--recipes", "cpu", "--set", 'model="resnet8"', "model_options={}", "--out", str(out))
    result = json.loads(out.read_text())
    assert result["cpu_recipe"]["model"] == "resnet8"
    assert result["cpu_recipe_changes"] == ['model="resnet8"', "model_options={}"]
    for bad, message in [("model=resnet8", "is not JSON"), ("depth=3", "unexpected keyword"), ("lr", "FIELD=JSON")]:
        done = subprocess.run([sys.executable, str(ROOT / "bench" / "time_to_accuracy.py"), "--set", bad,
                               "--out", str(out)], capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and message in done.stderr


@pytest.mark.parametrize("translate", [0, 2])
def test_tta_averages_the_views_made_by_hand(translate):
    """Flips only (2 views), or flips of the image and of its shifts both ways (6 views), padded by reflection."""
    torch.manual_seed(translate)
    model = build_model("resnet8", width=0.25).eval()
    images = torch.randint(0, 256, (20, 3, 16, 16), dtype=torch.uint8)
    labels = torch.randint(0, 10, (20,))
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    plain, tta = evaluate.flip_tta_accuracy(model, images, labels, mean=mean, std=std, batch_size=7,
                                            translate=translate)
    views = [images]
    if translate:
        pad = ((0, 0), (0, 0), (translate, translate), (translate, translate))
        padded = torch.from_numpy(np.pad(images.numpy(), pad, mode="reflect"))
        views += [padded[..., :16, :16], padded[..., 2 * translate :, 2 * translate :]]  # down-right, up-left
    with torch.no_grad():
        logits = [model((v.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))
                  for view in views for v in (view, view.flip(3))]
    assert plain == pytest.approx((logits[0].argmax(1) == labels).float().mean().item())
    assert tta == pytest.approx((sum(logits).argmax(1) == labels).float().mean().item())


@pytest.mark.slow
def test_recipe_changes_trains_the_recipe_and_each_change_undone_or_added(tmp_path):
    out = tmp_path / "changes.json"
    printed = run_bench("recipe_changes.py", "--data", "synthetic", "--budget", "3", "--val-per-class", "10",
                        "--out", str(out))
    result = json.loads(out.read_text())
    check_record(result, "recipe_changes.py")
    assert result["smoke"] is True  # a test of the script: the book does not show it
    arms = {arm["id"]: arm for arm in result["arms"]}
    assert list(arms)[:3] == ["recipe", "-tta_shifts", "-tta"]
    recipe = result["cpu_recipe"]
    has = {"muon": recipe["optimizer"] == "muon", "alternate_flip": recipe["alternate_flip"],
           "progressive": recipe["progressive_size"] == 24, "lookahead": recipe["lookahead_every"] == 5,
           "frozen_bn_scale": recipe["freeze_bn_scale"], "bn_momentum": recipe["bn_momentum"] == 0.4,
           "dirac_init": recipe["dirac_init"]}
    assert list(arms)[3:] == [("-" if present else "+") + name for name, present in has.items()]
    for arm in arms.values():
        assert all(0 <= v <= 1 for v in arm["values"]) and len(arm["values"]) == 1
        assert arm["difference"] == pytest.approx(arm["mean"] - arms["recipe"]["mean"])
    assert "-tta" in printed and "vs recipe" in printed
    run_bench("recipe_changes.py", "--data", "synthetic", "--budget", "2", "--val-per-class", "10",
              "--changes", "lookahead", "--out", str(out))
    assert [arm["id"][1:] for arm in json.loads(out.read_text())["arms"][3:]] == ["lookahead"]


def test_measure_throughput_rejects_bad_settings():
    model = build_model("resnet8", width=0.25)
    with pytest.raises(ValueError, match="precision .fp8."):
        speed.measure_throughput(model, 8, 1, precision="fp8")
    with pytest.raises(ValueError, match="loader .ffcv."):
        speed.measure_throughput(model, 8, 1, loader="ffcv")


@pytest.mark.parametrize("name, group", [
    ("aten::convolution_backward", "convolution backward"),
    ("autograd::engine::evaluate_function: ConvolutionBackward0", "convolution backward"),
    ("aten::_slow_conv2d_backward", "convolution backward"),
    ("aten::mkldnn_convolution", "convolution forward"), ("aten::conv2d", "convolution forward"),
    ("aten::native_batch_norm_backward", "BatchNorm"), ("NativeBatchNormBackward0", "BatchNorm"),
    ("aten::max_pool2d_with_indices_backward", "pooling"), ("aten::clamp_min_", "ReLU"),
    ("aten::threshold_backward", "ReLU"), ("aten::fill_", "other"), ("Optimizer.step#SGD.step", "other"),
])
def test_op_group_names_the_layer_an_operator_belongs_to(name, group):
    assert speed.op_group(name) == group


def test_profile_step_accounts_for_every_convolution_once_a_step(capfd):
    model = build_model("resnet8", width=0.25)
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    rows = speed.profile_step(model, 8, 2, warmup=1)
    os.write(2, b"after the profile\n")
    assert capfd.readouterr().err == "after the profile\n"  # the profiler's engine logged nothing; fd 2 is back
    assert sum(row["share"] for row in rows) == pytest.approx(1.0)
    assert [row["ms_per_step"] for row in rows] == sorted((row["ms_per_step"] for row in rows), reverse=True)
    calls = {op: sum(row["calls_per_step"] for row in rows if row["op"] == op)
             for op in ("aten::conv2d", "aten::convolution_backward")}
    assert calls == {"aten::conv2d": convs, "aten::convolution_backward": convs}  # forward and backward once each
    first_conv = [row for row in rows if row["op"] == "aten::conv2d" and row["shapes"][0] == (8, 3, 32, 32)]
    assert len(first_conv) == 1 and first_conv[0]["calls_per_step"] == 1  # the stem, on the batch of images
    layers = speed.convolution_times(rows)
    filters = {tuple(m.weight.shape) for m in model.modules() if isinstance(m, torch.nn.Conv2d)}
    assert {layer["filters"] for layer in layers} == filters  # each convolution's shape, both passes timed
    assert all(layer["forward_ms"] > 0 and layer["backward_ms"] > 0 for layer in layers)
    timed = [row for row in rows if row["group"].startswith("convolution") and len(row["shapes"]) >= 2]
    assert sum(layer["forward_ms"] + layer["backward_ms"] for layer in layers) == pytest.approx(
        sum(row["ms_per_step"] for row in timed))
    with pytest.raises(ValueError, match="steps >= 1"):
        speed.profile_step(model, 8, 0)


def test_find_result_reads_the_repository_results_and_labels_them():
    result, path = book.find_result("loader")
    assert path is not None and path.name == "loader.json"
    label = book.describe_result(result)
    assert result["date"][:10] in label and result["versions"]["torch"] in label
    assert book.find_result("no-such-benchmark") == (None, None)
    assert book.describe_result(None) == "no measurement in this installation"


def test_a_smoke_result_is_not_a_measurement(tmp_path, monkeypatch):
    (tmp_path / "throughput.json").write_text(json.dumps({"smoke": True, "results": []}))
    (tmp_path / "gpu_speedrun.json").write_text(json.dumps({"smoke": False, "runs": []}))
    monkeypatch.setattr(book, "results_dirs", lambda: [tmp_path])
    assert book.find_result("throughput") == (None, None)
    assert book.find_result("gpu_speedrun") == ({"smoke": False, "runs": []}, tmp_path / "gpu_speedrun.json")


def readme_rows(result: dict) -> list[str]:
    """The README's time-to-accuracy table rows, as written from ``bench/results/time_to_accuracy.json``: per
    budget the CPU recipe's mean over its seeds (min-max) and the article's mean, each with the mean epochs."""
    spread = {(s["recipe"], s["budget_s"]): s for s in result["summary"]["spread"]}

    def epochs(recipe: str, budget: float) -> float:
        values = [r["epochs"] for r in result["results"] if (r["recipe"], r["budget_s"]) == (recipe, budget)]
        return sum(values) / len(values)

    rows = []
    for budget in sorted({b for _, b in spread}):
        cpu, article = spread["cpu", budget], spread["article", budget]
        rows.append(f"| {budget:.0f} s | {cpu['mean']:.3f} ({cpu['min']:.3f}-{cpu['max']:.3f}; "
                    f"{epochs('cpu', budget):.1f} epochs) | {article['mean']:.3f} ({epochs('article', budget):.1f} "
                    "epochs) |")
    return rows


def test_the_readme_states_the_time_to_accuracy_that_was_measured():
    result, path = book.find_result("time_to_accuracy")
    assert result is not None, "bench/results/time_to_accuracy.json is part of the repository"
    readme = (ROOT / "README.md").read_text()
    for row in readme_rows(result):
        assert row in readme, f"README.md does not state {row!r} from {path}"

