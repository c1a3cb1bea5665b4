"""load(): synthetic, image folders and zips (layouts, formats, cache, bad input), CIFAR-10's failure paths."""

from __future__ import annotations

import ast
import io
import os
import socket
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from resnet_lessons import data
from resnet_lessons.data import DataError, DataUnavailable, folders, sources

CLASSES = ("bird", "cat", "dog")


def _png(rgb: np.ndarray, mode: str = "RGB", fmt: str = "PNG") -> bytes:
    image = Image.fromarray(rgb)
    if mode != "RGB":
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _pixels(seed: int, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def make_tree(root: Path, splits=("train",), per_class: int = 4, classes=CLASSES, size: int = 32) -> dict:
    """Write ``<split>/<class>/<i>.png`` (or ``<class>/<i>.png`` when splits is None); return the pixels."""
    written = {}
    for s, split in enumerate(splits or [None]):
        for c, name in enumerate(classes):
            folder = root / name if split is None else root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                rgb = _pixels(1000 * s + 100 * c + i, size)
                (folder / f"{i}.png").write_bytes(_png(rgb))
                written[str(folder.relative_to(root) / f"{i}.png")] = rgb
    return written


def make_zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, payload in files.items():
            archive.writestr(name, payload)
    return path


def snapshot(root: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*")}


def test_synthetic_splits_are_disjoint_stratified_and_reproducible(tmp_path):
    a = data.load("synthetic", synthetic_per_class=30, val_per_class=5, cache_dir=tmp_path)
    assert list(a.splits) == ["train", "val", "test"]
    assert set(a.val.counts().values()) == {5} and set(a.train.counts().values()) == {25}
    assert set(a["test"].counts().values()) == {6}
    rows = {name: {bytes(img.numpy()) for img in split.images} for name, split in a.splits.items()}
    assert not rows["train"] & rows["val"] and not rows["train"] & rows["test"] and not rows["val"] & rows["test"]
    b = data.load("synthetic", synthetic_per_class=30, val_per_class=5, cache_dir=tmp_path)
    assert torch.equal(a.val.images, b.val.images) and a.mean == b.mean
    c = data.load("synthetic", synthetic_per_class=30, val_per_class=5, seed=1, cache_dir=tmp_path)
    assert not torch.equal(a.val.images, c.val.images)
    mean, std = data.channel_stats(a.train.images)
    assert a.mean == mean and a.std == std
    assert not any(tmp_path.iterdir())  # synthetic data writes nothing


def test_channel_stats_match_numpy():
    images = torch.randint(0, 256, (7, 3, 5, 6), dtype=torch.uint8)
    x = images.numpy().astype(np.float64) / 255
    mean, std = data.channel_stats(images, chunk=3)
    np.testing.assert_allclose(mean, x.mean(axis=(0, 2, 3)), atol=1e-9)
    np.testing.assert_allclose(std, x.std(axis=(0, 2, 3)), atol=1e-9)


def test_train_per_class_subsamples_after_carving_val(tmp_path):
    d = data.load("synthetic", synthetic_per_class=30, val_per_class=5, train_per_class=7, cache_dir=tmp_path)
    assert set(d.train.counts().values()) == {7} and set(d.val.counts().values()) == {5}


def test_folder_with_splits_keeps_them_and_is_cached(tmp_path, monkeypatch):
    src = tmp_path / "src"
    written = make_tree(src, splits=("train", "test"))
    before = snapshot(src)
    d = data.load(src, val_per_class=1, cache_dir=tmp_path / "cache")
    assert list(d.splits) == ["train", "val", "test"] and d.classes == CLASSES
    assert d["test"].counts() == {"bird": 4, "cat": 4, "dog": 4}
    assert d.train.counts() == {"bird": 3, "cat": 3, "dog": 3}
    first = d["test"].images[0].permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(first, written[os.path.join("test", "bird", "0.png")])
    assert snapshot(src) == before  # nothing written next to the source
    assert len(list((tmp_path / "cache" / "images").glob("*.npy"))) == 1

    monkeypatch.setattr(folders, "decode", lambda *a, **k: pytest.fail("decoded again"))
    again = data.load(src, val_per_class=1, cache_dir=tmp_path / "cache")
    assert torch.equal(again["test"].images, d["test"].images)


def test_cache_is_keyed_by_content(tmp_path):
    src = tmp_path / "src"
    make_tree(src, splits=None, per_class=3)
    cache = tmp_path / "cache"
    a = data.load(src, val_per_class=1, cache_dir=cache)
    (src / "cat" / "0.png").write_bytes(_png(np.zeros((32, 32, 3), np.uint8)))
    os.utime(src / "cat" / "0.png", ns=(1, 1))
    b = data.load(src, val_per_class=1, cache_dir=cache)
    assert len(list((cache / "images").glob("*.npy"))) == 2
    assert not torch.equal(torch.cat([a.train.images, a.val.images]).sort(0).values,
                           torch.cat([b.train.images, b.val.images]).sort(0).values)


def test_single_split_zip_gets_a_carved_val_and_no_test(tmp_path):
    files = {f"{c}/{i}.png": _png(_pixels(10 * k + i)) for k, c in enumerate(CLASSES) for i in range(4)}
    files["README.txt"] = b"not an image"
    z = make_zip(tmp_path / "imgs.zip", files)
    d = data.load(z, val_per_class=1, cache_dir=tmp_path / "cache")
    assert list(d.splits) == ["train", "val"]
    assert d.val.counts() == {"bird": 1, "cat": 1, "dog": 1}
    assert any("validation accuracy" in note for note in d.notes)
    again = data.load(z, val_per_class=1, cache_dir=tmp_path / "cache")  # via the central-directory key
    assert torch.equal(again.val.images, d.val.images) and again.classes == d.classes


def test_modes_and_formats_become_rgb_and_are_resized(tmp_path):
    rgb = _pixels(0, 16)
    src = tmp_path / "src" / "things"
    src.mkdir(parents=True)
    (src / "gray.png").write_bytes(_png(rgb, "L"))
    (src / "rgba.png").write_bytes(_png(rgb, "RGBA"))
    (src / "palette.gif").write_bytes(_png(rgb, "P", "GIF"))
    (src / "photo.jpg").write_bytes(_png(rgb, "RGB", "JPEG"))
    (src / "wide.bmp").write_bytes(_png(_pixels(1, 16)[:, :8].repeat(4, axis=1), "RGB", "BMP"))
    (tmp_path / "src" / "zother").mkdir()  # a second class: one class is refused
    (tmp_path / "src" / "zother" / "0.png").write_bytes(_png(rgb))
    d = data.load(tmp_path / "src", image_size=24, val_per_class=0, cache_dir=tmp_path / "cache")
    assert d.train.images.shape == (6, 3, 24, 24)
    gray = d.train.images[0]  # sorted names: gray, palette, photo, rgba, wide, then zother's
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    expect = np.asarray(Image.fromarray(rgb).convert("L").resize((24, 24), Image.Resampling.BICUBIC))
    assert np.abs(gray[0].numpy().astype(int) - expect).max() <= 1


def test_transparent_pixels_are_laid_over_white(tmp_path):
    rgba = np.zeros((32, 32, 4), np.uint8)
    src = tmp_path / "src" / "icons"
    src.mkdir(parents=True)
    Image.fromarray(rgba, "RGBA").save(src / "clear.png")
    (tmp_path / "src" / "other").mkdir()
    Image.fromarray(rgba, "RGBA").save(tmp_path / "src" / "other" / "clear.png")
    d = data.load(tmp_path / "src", val_per_class=0, cache_dir=tmp_path / "cache")
    assert int(d.train.images.min()) == 255


@pytest.mark.parametrize("skip_bad", [False, True])
def test_corrupt_and_truncated_images(tmp_path, skip_bad):
    src = tmp_path / "src"
    make_tree(src, splits=None, per_class=3)
    good = (src / "cat" / "1.png").read_bytes()
    (src / "cat" / "0.png").write_bytes(b"this is no png")
    (src / "dog" / "2.png").write_bytes(good[: len(good) // 2])
    if not skip_bad:
        with pytest.raises(DataError, match=r"cannot read 2 image\(s\).*cat/0.png.*dog/2.png.*--skip-bad"):
            data.load(src, val_per_class=1, cache_dir=tmp_path / "cache")
    else:
        with pytest.warns(UserWarning, match="skipped 2 unreadable"):
            d = data.load(src, val_per_class=1, cache_dir=tmp_path / "cache", skip_bad=True)
        assert len(d.train) + len(d.val) == 7


def test_parallel_decoding_matches_serial(tmp_path):
    src = tmp_path / "src"
    make_tree(src, splits=None, per_class=5)
    listing = folders.scan(src)
    serial, bad = folders.decode(listing, 32, workers=1)
    parallel, bad2 = folders.decode(listing, 32, workers=2)
    assert np.array_equal(serial, parallel) and bad == bad2 == []


@pytest.mark.parametrize(
    "case, message",
    [
        ("empty_class", "class folder train/dog has no images"),
        ("no_images", "holds no images"),
        ("class_mismatch", "splits train and test have different classes.*only in train: \\['dog'\\]"),
        ("mixed", "mixes split folders"),
        ("deep", "expected the layout"),
        ("missing", "does not exist"),
        ("not_zip", "not a zip archive"),
        ("escape", "refusing zip entry '../evil.png'"),
        ("absolute", "refusing zip entry '/abs/x.png'"),
        ("val_too_big", "cannot carve 9 validation images per class"),
    ],
)
def test_bad_sources_raise_clear_errors(tmp_path, case, message):
    src = tmp_path / "src"
    if case == "empty_class":
        make_tree(src)
        for f in (src / "train" / "dog").iterdir():
            f.unlink()
    elif case == "no_images":
        (src / "cat").mkdir(parents=True)
        (src / "cat" / "notes.txt").write_text("hello")
    elif case == "class_mismatch":
        make_tree(src, splits=("train",))
        make_tree(src, splits=("test",), classes=("bird", "cat"))
    elif case == "mixed":
        make_tree(src, splits=("train",))
        make_tree(src, splits=("cats",), classes=("x",))
    elif case == "deep":
        make_tree(src / "a" / "b", splits=None)
    elif case == "missing":
        src = tmp_path / "nowhere"
    elif case == "not_zip":
        src = tmp_path / "data.zip"
        src.write_text("plain text")
    elif case in ("escape", "absolute"):
        name = "../evil.png" if case == "escape" else "/abs/x.png"
        src = make_zip(tmp_path / "bad.zip", {"cat/0.png": _png(_pixels(0)), name: _png(_pixels(1))})
    elif case == "val_too_big":
        make_tree(src, splits=None)
    with pytest.raises(DataError, match=message):
        data.load(src, val_per_class=9 if case == "val_too_big" else 1, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "evil.png").exists()


def test_unreadable_path(tmp_path, monkeypatch):
    src = tmp_path / "src"
    make_tree(src, splits=None, per_class=2)
    if os.geteuid() == 0:  # root reads everything: pretend
        monkeypatch.setattr(folders.os, "access", lambda *args, **kwargs: False)
    src.chmod(0)
    try:
        with pytest.raises(DataError, match="not readable|cannot read"):
            data.load(src, val_per_class=0, cache_dir=tmp_path / "cache")
    finally:
        src.chmod(0o755)


def test_unknown_source_names_the_choices(tmp_path):
    with pytest.raises(DataError, match="neither 'cifar10', 'synthetic'"):
        data.load("imagenet", cache_dir=tmp_path)


class FakeCIFAR10:
    """Stands in for torchvision's CIFAR10: 20 or 5 images per class, or the given failure."""

    failure: Exception | None = None
    base_folder = "cifar-10-batches-py"
    tgz_md5 = "0" * 32
    classes = list(sources.CIFAR10_CLASSES)

    def __init__(self, root, train=True, download=False):
        if FakeCIFAR10.failure is not None:
            raise FakeCIFAR10.failure
        n = 20 if train else 5
        self.data = np.random.default_rng(int(train)).integers(0, 256, (10 * n, 32, 32, 3), dtype=np.uint8)
        self.targets = [i % 10 for i in range(10 * n)]


@pytest.fixture
def fake_cifar(monkeypatch):
    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    FakeCIFAR10.failure = None
    yield FakeCIFAR10
    FakeCIFAR10.failure = None


def test_cifar10_official_test_and_carved_val(tmp_path, fake_cifar):
    d = data.load("cifar10", val_per_class=4, cache_dir=tmp_path)
    assert list(d.splits) == ["train", "val", "test"] and d.classes == sources.CIFAR10_CLASSES
    assert len(d.train) == 160 and len(d.val) == 40 and len(d["test"]) == 50
    up = data.load("cifar10", val_per_class=4, image_size=64, cache_dir=tmp_path)
    assert up.train.images.shape[1:] == (3, 64, 64)


@pytest.mark.parametrize(
    "failure, message",
    [
        (urllib.error.URLError("Name or service not known"), "cannot be had: .*Name or service"),
        (TimeoutError("The read operation timed out"), "timed out"),
        (TimeoutError("timed out"), "timed out"),
        (RuntimeError("Dataset not found or corrupted."), "Dataset not found"),
    ],
)
def test_cifar10_unavailable_names_the_cache_and_the_alternatives(tmp_path, fake_cifar, failure, message):
    fake_cifar.failure = failure
    with pytest.raises(DataUnavailable, match=message) as info:
        data.load("cifar10", cache_dir=tmp_path)
    text = str(info.value)
    assert str(tmp_path / "cifar10") in text and "cifar-10-python.tar.gz" in text
    assert "synthetic" in text and "cifar10-train-jpeg.zip" in text


def test_download_runs_under_a_socket_timeout(tmp_path, fake_cifar, monkeypatch):
    seen = []

    class Spy(FakeCIFAR10):
        def __init__(self, *args, **kwargs):
            seen.append(socket.getdefaulttimeout())
            super().__init__(*args, **kwargs)

    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Spy)
    previous = socket.getdefaulttimeout()
    data.load("cifar10", val_per_class=1, cache_dir=tmp_path)
    assert seen and all(t == sources.DOWNLOAD_TIMEOUT_S for t in seen)
    assert socket.getdefaulttimeout() == previous


def test_a_hung_host_times_out(tmp_path, fake_cifar, monkeypatch):
    """A server that accepts the connection and then says nothing: the read times out, no hang."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]

    class Hung(FakeCIFAR10):
        def __init__(self, root, train=True, download=False):
            import urllib.request

            urllib.request.urlopen(f"http://127.0.0.1:{port}/cifar-10-python.tar.gz")

    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Hung)
    try:
        with pytest.raises(DataUnavailable, match="timed out"):
            sources._cifar10(tmp_path, 32, True, timeout=0.5)
    finally:
        server.close()


def test_every_split_comes_in_a_seeded_random_order_not_class_by_class(tmp_path):
    """A folder lists its images class by class; a split's first images must still be a sample of all classes."""
    make_tree(tmp_path / "imgs", splits=None, per_class=12)
    d = data.load(tmp_path / "imgs", val_per_class=4, cache_dir=tmp_path / "cache", seed=0)
    for split in (d.train, d.val):
        first_half = split.labels[: len(split) // 2]
        assert set(first_half.tolist()) == {0, 1, 2}, split.labels.tolist()
    again = data.load(tmp_path / "imgs", val_per_class=4, cache_dir=tmp_path / "cache", seed=0)
    assert torch.equal(again.train.labels, d.train.labels) and torch.equal(again.val.images, d.val.images)


def _relative_imports(module: Path) -> set[str]:
    """``.x``, ``..y`` for every relative import of ``module`` (``from . import x`` counts as ``.x``)."""
    found = set()
    for node in ast.walk(ast.parse(module.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            base = "." * node.level + (node.module or "")
            found |= {base} if node.module else {base + alias.name for alias in node.names}
    return found


def test_data_imports_nothing_above_it_and_the_cache_nothing_of_folders():
    """The layering: data/ uses only its own modules (and the library's file-writing helpers); the cache stores
    arrays and metadata and knows nothing of folders, which rebuilds its listing from that metadata."""
    imports = {module.stem: _relative_imports(module) for module in Path(data.__file__).parent.glob("*.py")}
    upward = {name: [i for i in sorted(found) if i.startswith("..") and i != ".._files"]
              for name, found in imports.items()}
    assert not any(upward.values()), upward
    assert not {".folders", ".sources", ".loader"} & imports["cache"]
    assert ".cache" in imports["folders"]
