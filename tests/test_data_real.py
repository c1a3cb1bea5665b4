"""The shared JPEG copy of CIFAR-10's training split (CI has it): decoded once, then read from the cache.

The first run decodes 50,000 JPEGs (seconds to a minute on two cores) into the user's cache; every later
run reads the cached array back in about a second.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from resnet_lessons.cli import main
from resnet_lessons.data import CIFAR10_CLASSES, load

ZIP = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-train-jpeg.zip"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not ZIP.is_file(), reason=f"the shared zip is not at {ZIP}"),
]


@pytest.fixture(scope="module")
def shared():
    return load(ZIP)  # the default cache: cheap after the first run anywhere on this machine


def test_shared_zip_is_cifar10_train_in_official_order(shared):
    assert shared.classes == CIFAR10_CLASSES
    assert list(shared.splits) == ["train", "val"]  # no test split is invented
    assert len(shared.train) + len(shared.val) == 50_000
    assert set(shared.train.counts().values()) == {4_500} and set(shared.val.counts().values()) == {500}
    assert shared.train.images.shape[1:] == (3, 32, 32)
    assert any("JPEG copy" in note for note in shared.notes)
    # CIFAR-10's published training statistics, a little off because of the JPEG compression
    assert all(abs(m - e) < 0.01 for m, e in zip(shared.mean, (0.4914, 0.4822, 0.4465)))
    assert all(abs(s - e) < 0.01 for s, e in zip(shared.std, (0.2470, 0.2435, 0.2616)))


def test_shared_zip_summary_per_class(capsys):
    assert main(["data", str(ZIP), "--json", "--val-per-class", "0"]) == 0
    import json

    out = json.loads(capsys.readouterr().out)
    assert out["classes"] == list(CIFAR10_CLASSES) and out["image_size"] == [32, 32]
    assert out["splits"] == {"train": {"n": 50_000, "per_class": {c: 5_000 for c in CIFAR10_CLASSES}}}
