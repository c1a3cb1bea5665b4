"""Image folders and zips: ``<split>/<class>/<image>`` or ``<class>/<image>``, decoded once, then cached.

The source is listed and checked first (layout, classes, unsafe names), then decoded once, in worker
processes when there are many images; :mod:`.cache` keeps the result. Nothing is written next to the source.
"""

from __future__ import annotations

import hashlib
import io
import multiprocessing
import os
import sys
import warnings
import zipfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from . import cache
from .dataset import DataError

SPLIT_NAMES = ("train", "val", "test")
CACHE_FORMAT = cache.CACHE_FORMAT
PARALLEL_FROM = 2000  # images; below this a process pool costs more than it saves
IGNORED = ("__MACOSX", "Thumbs.db", "desktop.ini")


def image_extensions() -> frozenset[str]:
    """File extensions Pillow can open (``.jpg``, ``.png``, ``.bmp``, ``.webp``, ...)."""
    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


@dataclass(frozen=True)
class Listing:
    """What a source holds before decoding: one entry per image, in a fixed order."""

    path: Path
    is_zip: bool
    splits: tuple[str, ...]  # split names in the source; ("train",) for a <class>/<image> layout
    classes: tuple[str, ...]  # sorted class names, the label order
    names: tuple[str, ...]  # zip member names or paths relative to the folder
    split_of: tuple[int, ...]  # index into ``splits`` per entry
    label_of: tuple[int, ...]
    key: str  # digest of the content's listing (names, sizes, CRCs or mtimes)


def _safe_parts(name: str, source: Path) -> tuple[str, ...]:
    """Path components of a zip member name, refusing names that would escape the archive."""
    unix = name.replace("\\", "/")
    parts = unix.split("/")
    if unix.startswith("/") or ".." in parts or ":" in parts[0]:
        raise DataError(f"{source}: refusing zip entry {name!r}: its name escapes the archive")
    return tuple(p for p in parts if p not in ("", "."))


def _walk_folder(root: Path) -> tuple[list[tuple[tuple[str, ...], str]], set[tuple[str, ...]]]:
    """(parts, signature) per file and the set of directories (as parts) under ``root``."""
    files, dirs = [], set()
    for dirpath, dirnames, filenames in os.walk(root, onerror=_raise_walk_error):
        rel = Path(dirpath).relative_to(root).parts
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in IGNORED)
        dirs.update(rel + (d,) for d in dirnames)
        for f in sorted(filenames):
            st = (Path(dirpath) / f).stat()
            files.append((rel + (f,), f"{st.st_size}:{st.st_mtime_ns}"))
    return files, dirs


def _raise_walk_error(error: OSError) -> None:
    raise DataError(f"cannot read {error.filename}: {error.strerror}") from error


def _walk_zip(path: Path) -> tuple[list[tuple[tuple[str, ...], str]], set[tuple[str, ...]]]:
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, OSError) as error:
        raise DataError(f"cannot read {path} as a zip archive: {error}") from error
    files, dirs = [], set()
    for info in infos:
        parts = _safe_parts(info.filename, path)
        if not parts or parts[0] in IGNORED or any(p.startswith(".") for p in parts):
            continue
        dirs.update(parts[:k] for k in range(1, len(parts)))
        if info.is_dir():
            dirs.add(parts)
        else:
            files.append((parts, f"{info.file_size}:{info.CRC}"))
    return files, dirs


def scan(path: str | os.PathLike) -> Listing:
    """List an image folder or zip, check its layout and return a :class:`Listing`."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"data source {str(path)!r} does not exist")
    if not os.access(path, os.R_OK):
        raise DataError(f"data source {path} is not readable (permission denied)")
    is_zip = path.is_file()
    if is_zip and not zipfile.is_zipfile(path):
        raise DataError(f"{path} is a file but not a zip archive; give a folder or a .zip of images")
    files, dirs = _walk_zip(path) if is_zip else _walk_folder(path)
    extensions = image_extensions()
    images = [(parts, sig) for parts, sig in files if os.path.splitext(parts[-1])[1].lower() in extensions]
    if not images:
        raise DataError(f"{path} holds no images (looked for {', '.join(sorted(extensions)[:8])}, ...)")
    top = {parts[0] for parts in dirs if len(parts) == 1} | {p[0] for p, _ in images if len(p) > 1}
    split_layout = bool(top) and top <= set(SPLIT_NAMES)
    if not split_layout and top & set(SPLIT_NAMES):
        raise DataError(f"{path} mixes split folders ({', '.join(sorted(top & set(SPLIT_NAMES)))}) "
                        f"with other folders ({', '.join(sorted(top - set(SPLIT_NAMES)))}); use either "
                        "<split>/<class>/<image> or <class>/<image>")
    depth = 3 if split_layout else 2
    misplaced = [p for p, _ in images if len(p) != depth]
    if misplaced:
        layout = "<split>/<class>/<image>" if split_layout else "<class>/<image>"
        raise DataError(
            f"{path}: expected the layout {layout}"
            + (" (splits among train, val, test)" if split_layout else "")
            + f"; {'/'.join(misplaced[0])} is at depth {len(misplaced[0])}"
        )
    splits = tuple(s for s in SPLIT_NAMES if s in top) if split_layout else ("train",)
    class_dirs = {parts[:depth - 1] for parts in dirs if len(parts) == depth - 1}
    class_dirs |= {parts[:-1] for parts, _ in images}
    counts = {d: 0 for d in class_dirs}
    for parts, _ in images:
        counts[parts[:-1]] += 1
    empty = sorted("/".join(d) for d, n in counts.items() if n == 0)
    if empty:
        raise DataError(f"{path}: class folder {empty[0]} has no images"
                        + (f" (and {len(empty) - 1} more empty)" if len(empty) > 1 else ""))
    per_split = {s: sorted({d[-1] for d in class_dirs if not split_layout or d[0] == s}) for s in splits}
    for s, names in per_split.items():
        if not names:
            raise DataError(f"{path}: split folder {s} has no class folders")
    classes = per_split[splits[0]]
    for s in splits[1:]:
        if per_split[s] != classes:
            only_a = sorted(set(classes) - set(per_split[s]))
            only_b = sorted(set(per_split[s]) - set(classes))
            raise DataError(
                f"{path}: splits {splits[0]} and {s} have different classes: "
                f"only in {splits[0]}: {only_a or 'none'}; only in {s}: {only_b or 'none'}"
            )
    images.sort(key=lambda item: item[0])
    key = cache.zip_directory_digest(path) if is_zip else None
    if key is None:
        digest = hashlib.sha256(f"resnet_lessons images v{CACHE_FORMAT}\n".encode())
        for parts, sig in images:
            digest.update(f"{'/'.join(parts)}\0{sig}\n".encode())
        key = digest.hexdigest()[:24]
    return Listing(
        path=path,
        is_zip=is_zip,
        splits=splits,
        classes=tuple(classes),
        names=tuple("/".join(parts) for parts, _ in images),
        split_of=tuple(splits.index(p[0]) if split_layout else 0 for p, _ in images),
        label_of=tuple(classes.index(p[-2]) for p, _ in images),
        key=key,
    )


# --- decoding ------------------------------------------------------------------------------------

_archive: zipfile.ZipFile | None = None  # one open archive per worker process


def _open_worker(path: str, is_zip: bool) -> None:
    global _archive
    _archive = zipfile.ZipFile(path) if is_zip else None


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB whatever the mode: grayscale and palettes expand, transparency is laid over white."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image if image.mode == "RGB" else image.convert("RGB")


def fit_image(image: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``size`` and crop the centre square (no-op at the right size)."""
    w, h = image.size
    if (w, h) == (size, size):
        return image
    scale = size / min(w, h)
    w2, h2 = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((w2, h2), Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (w2 - size) // 2, (h2 - size) // 2
    return image.crop((left, top, left + size, top + size))


def _decode_chunk(job: tuple[str, bool, list[str], int]) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Decode some images to ``[n, size, size, 3]`` uint8; failures come back as (index, reason)."""
    root, is_zip, names, size = job
    out = np.zeros((len(names), size, size, 3), dtype=np.uint8)
    bad = []
    for i, name in enumerate(names):
        try:
            data = _archive.read(name) if is_zip else (Path(root) / name).read_bytes()
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                out[i] = np.asarray(fit_image(to_rgb(image), size))
        except Exception as error:  # Pillow raises many kinds for broken files
            bad.append((i, f"{type(error).__name__}: {error}"))
    return out, bad


def decode(listing: Listing, size: int, workers: int | None = None) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """All images of ``listing`` as uint8 ``[N, 3, size, size]`` plus (index, reason) for unreadable ones."""
    n = len(listing.names)
    if workers is None:
        workers = min(8, os.cpu_count() or 1) if n >= PARALLEL_FROM else 1
    chunk = max(1, -(-n // (workers * 8)))
    jobs = [(str(listing.path), listing.is_zip, list(listing.names[s : s + chunk]), size) for s in range(0, n, chunk)]
    results = None
    if workers > 1:
        # fork shares the imported modules (no second torch import); workers use only Pillow and NumPy
        method = "fork" if sys.platform.startswith("linux") else None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                with ProcessPoolExecutor(workers, multiprocessing.get_context(method), _open_worker,
                                         (str(listing.path), listing.is_zip)) as pool:
                    results = list(pool.map(_decode_chunk, jobs))
        except (OSError, RuntimeError) as error:  # no processes here (sandbox): decode in this one
            warnings.warn(f"decoding in one process: the process pool failed ({error})", stacklevel=2)
    if results is None:
        _open_worker(str(listing.path), listing.is_zip)
        try:
            results = [_decode_chunk(job) for job in jobs]
        finally:
            if _archive is not None:
                _archive.close()
    images = np.concatenate([r[0] for r in results]).transpose(0, 3, 1, 2)
    bad = [(k * chunk + i, reason) for k, r in enumerate(results) for i, reason in r[1]]
    return np.ascontiguousarray(images), bad
