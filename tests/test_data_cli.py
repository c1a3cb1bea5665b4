"""resnet-lessons data SOURCE [--json]: the summary of a source."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from resnet_lessons.cli import main


def make_folder(root: Path) -> Path:
    for split, n in (("train", 4), ("test", 2)):
        for c, name in enumerate(("zebra", "ant")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((20, 20, 3), 40 * c + i, np.uint8)).save(folder / f"{i}.png")
    return root


def test_json_summary_has_the_exact_shape(tmp_path, capsys):
    src = make_folder(tmp_path / "src")
    code = main(["data", str(src), "--json", "--val-per-class", "1", "--cache-dir", str(tmp_path / "c")])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out == {
        "classes": ["ant", "zebra"],
        "image_size": [32, 32],
        "splits": {
            "train": {"n": 6, "per_class": {"ant": 3, "zebra": 3}},
            "val": {"n": 2, "per_class": {"ant": 1, "zebra": 1}},
            "test": {"n": 4, "per_class": {"ant": 2, "zebra": 2}},
        },
    }


def test_text_summary_and_synthetic(tmp_path, capsys):
    args = ["data", "synthetic", "--synthetic-per-class", "20", "--val-per-class", "5", "--cache-dir", str(tmp_path)]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "32 x 32" in lines[1] and lines[2].endswith("disc, square, ring, cross, triangle, diamond, hstripes, "
                                                       "vstripes, checker, dots")
    assert lines[4].split() == ["class", "train", "val", "test"] and lines[5].split() == ["disc", "15", "5", "4"]
    assert lines[15].split() == ["total", "150", "50", "40"]


def test_bad_source_is_one_line_and_exit_code_1(tmp_path, capsys):
    assert main(["data", str(tmp_path / "missing.zip"), "--cache-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("resnet-lessons data: error:") and "does not exist" in err and "\n" not in err
