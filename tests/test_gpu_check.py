"""bench/gpu_check.sh, the one script for a GPU machine, end to end at its smallest size on the CPU."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_gpu_check_runs_every_step_and_writes_its_results(tmp_path):
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--smallest", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    check = json.loads((tmp_path / "gpu_check.json").read_text())
    assert check["passed"] and [s["step"] for s in check["steps"]] == ["unit_tests", "speedrun", "chapters"]
    assert "passed" in (tmp_path / "gpu_check_unit_tests.log").read_text()  # the CUDA tests ran, not skipped
    chapters = json.loads((tmp_path / "gpu_chapters.json").read_text())
    assert [c["chapter"] for c in chapters["chapters"]] == ["05_training"] and chapters["chapters"][0]["ok"]
    assert chapters["chapters"][0]["chapter_seconds"] is not None and chapters["hardware"]
    assert json.loads((tmp_path / "gpu_speedrun.json").read_text())["runs"]


def test_the_chapter_runner_refuses_an_unknown_chapter(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_chapters.py"), "--chapters", "99_nothing",
                           "--out", str(tmp_path / "x.json")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "no such chapter in book/: 99_nothing" in done.stderr
    assert not (tmp_path / "x.json").exists()


def test_an_unknown_argument_to_the_gpu_check_is_a_usage_error():
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--fast"], capture_output=True, text=True)
    assert done.returncode == 2 and "unknown argument --fast" in done.stderr
