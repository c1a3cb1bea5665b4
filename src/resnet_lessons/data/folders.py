"""Image folders and zips: ``<split>/<class>/<image>`` or ``<class>/<image>``, decoded once, then cached.

The source is listed and checked first (:func:`scan`: layout, classes, unsafe names), then decoded once, in
worker processes when there are many images (:func:`decode`). :func:`read` does both, or takes the images and
the listing from :mod:`.cache` when it has them. Nothing is written next to the source.

Symbolic links in a folder are followed only when they resolve inside the folder (a class folder linked
from elsewhere inside it, an image linked twice). A link to a file outside, a dangling link and anything
that is not a regular file is never read: it is an unreadable image, named by the link's own path, that
``skip_bad`` (``--skip-bad``) skips; a linked folder outside the source is an error naming the link.
No image is read past :data:`MAX_IMAGE_BYTES`: a zip member declaring more (a zip bomb) is not opened.
"""

from __future__ import annotations

import hashlib
import io
import multiprocessing
import os
import stat
import sys
import warnings
import zipfile
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from . import cache
from .dataset import DataError
from .images import fit_image, to_rgb

SPLIT_NAMES = ("train", "val", "test")
CACHE_FORMAT = cache.CACHE_FORMAT
PARALLEL_FROM = 2000  # images; below this a process pool costs more than it saves
IGNORED = ("__MACOSX", "Thumbs.db", "desktop.ini")
MAX_IMAGE_BYTES = 64 * 2**20  # one image file, uncompressed: photographs are a few MB


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

    def as_dict(self) -> dict[str, Any]:
        """The listing as plain data, as the cache stores it beside the images (with ``key``)."""
        return {"source": str(self.path), "splits": self.splits, "classes": self.classes, "names": self.names,
                "split_of": self.split_of, "label_of": self.label_of}

    @classmethod
    def from_dict(cls, path: Path, meta: Mapping[str, Any]) -> Listing:
        """The listing of ``path`` from the metadata the cache returned (:meth:`as_dict` and the ``key``)."""
        return cls(path=path, is_zip=path.is_file(), splits=tuple(meta["splits"]), classes=tuple(meta["classes"]),
                   names=tuple(meta["names"]), split_of=tuple(meta["split_of"]), label_of=tuple(meta["label_of"]),
                   key=str(meta["key"]))


def _safe_parts(name: str, source: Path) -> tuple[str, ...]:
    """Path components of a zip member name, refusing names that would escape the archive."""
    unix = name.replace("\\", "/")
    parts = unix.split("/")
    if unix.startswith("/") or ".." in parts or ":" in parts[0]:
        raise DataError(f"{source}: refusing zip entry {name!r}: its name escapes the archive")
    return tuple(p for p in parts if p not in ("", "."))


Walk = tuple[list[tuple[tuple[str, ...], str]], set[tuple[str, ...]]]


def _inside(path: Path, real_root: Path) -> Path | None:
    """Where ``path`` leads when that is inside ``real_root`` and exists; else None."""
    try:
        real = path.resolve()
    except (OSError, RuntimeError):  # a loop of links
        return None
    return real if real.is_relative_to(real_root) and real.exists() else None


def _link_signature(path: Path, real_root: Path, root: Path, name: str) -> tuple[str, str]:
    """("dir" | "file", signature) of the link ``name``; a folder linked from outside is an error."""
    real = _inside(path, real_root)
    if real is not None:
        if real.is_dir():
            return "dir", ""
        st = real.stat()
        return "file", f"link:{st.st_size}:{st.st_mtime_ns}"
    target = os.readlink(path)
    if os.path.isdir(path):
        raise DataError(
            f"{root}: refusing the symbolic link {name} -> {target}: it leads outside the data folder, and links "
            f"are followed only inside it; move or copy that folder into {root}"
        )
    return "file", f"unread-link:{target}"


def _walk_folder(root: Path) -> Walk:
    """(parts, signature) per file and the set of directories (as parts) under ``root``; links are
    followed only where they resolve inside ``root`` (see the module's docstring)."""
    real_root = root.resolve()
    files: list[tuple[tuple[str, ...], str]] = []
    dirs: set[tuple[str, ...]] = set()

    def visit(folder: Path, rel: tuple[str, ...], ancestors: frozenset[Path]) -> None:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as error:
            raise DataError(f"cannot read {folder}: {error.strerror}") from error
        for entry in entries:
            if entry.name.startswith(".") or entry.name in IGNORED:
                continue
            parts, path = rel + (entry.name,), Path(entry.path)
            kind, signature = "file", ""
            if entry.is_symlink():
                kind, signature = _link_signature(path, real_root, root, "/".join(parts))
            elif entry.is_dir(follow_symlinks=False):
                kind = "dir"
            else:
                st = entry.stat(follow_symlinks=False)
                signature = f"{st.st_size}:{st.st_mtime_ns}"
            if kind == "file":
                files.append((parts, signature))
                continue
            real = path.resolve()
            if real in ancestors:
                raise DataError(f"{root}: the symbolic link {'/'.join(parts)} -> {os.readlink(path)} makes a loop")
            dirs.add(parts)
            visit(path, parts, ancestors | {real})

    visit(root, (), frozenset({real_root}))
    return files, dirs


def _damaged_zip(path: Path, error: Exception | str) -> DataError:
    return DataError(f"{path} is a damaged or truncated zip archive ({error}); copy or download it again")


def _walk_zip(path: Path) -> Walk:
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except zipfile.BadZipFile as error:
        raise _damaged_zip(path, error) from error
    except OSError as error:
        raise DataError(f"cannot read {path} as a zip archive: {error.strerror or error}") from error
    files: list[tuple[tuple[str, ...], str]] = []
    dirs: set[tuple[str, ...]] = set()
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
        with open(path, "rb") as stream:
            if stream.read(4) == b"PK\x03\x04":  # a zip's first entry, but no directory at the end
                raise _damaged_zip(path, "no central directory at its end")
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


class Unread(Exception):
    """An entry that is not read at all: too large, a link leading outside or nowhere, not a regular file."""


def _too_large(size: int, kind: str = "") -> Unread:
    return Unread(f"{size / 2**20:.1f} MiB{kind}, more than the {MAX_IMAGE_BYTES // 2**20} MiB an image may "
                  "have; not read")


def _read_member(archive: zipfile.ZipFile, name: str) -> bytes:
    """A zip member's bytes, refused before reading when it declares more than MAX_IMAGE_BYTES, and
    never read past that limit whatever it declares."""
    info = archive.getinfo(name)
    if info.file_size > MAX_IMAGE_BYTES:
        raise _too_large(info.file_size, " uncompressed")
    with archive.open(info) as stream:
        data = stream.read(MAX_IMAGE_BYTES + 1)
    if len(data) > MAX_IMAGE_BYTES:
        raise _too_large(len(data), " uncompressed")
    return data


def _read_file(root: Path, real_root: Path, name: str) -> bytes:
    """A file's bytes under the folder's link rule (see the module's docstring) and size limit."""
    path = root / name
    real = _inside(path, real_root)
    if real is None:
        target = os.readlink(path) if path.is_symlink() else name
        where = "outside the data folder (links are followed only inside it)" if os.path.exists(path) else \
            "which does not exist"
        raise Unread(f"a symbolic link to {target}, {where}; not read")
    fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not block the load
    with os.fdopen(fd, "rb") as stream:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise Unread("not a regular file; not read")
        if info.st_size > MAX_IMAGE_BYTES:
            raise _too_large(info.st_size)
        return stream.read(MAX_IMAGE_BYTES + 1)


def _decode_chunk(job: tuple[str, bool, list[str], int]) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Decode some images to ``[n, size, size, 3]`` uint8; failures come back as (index, reason)."""
    root, is_zip, names, size = job
    archive = _archive
    if is_zip and archive is None:
        raise RuntimeError("a zip's images are decoded after _open_worker has opened it")
    real_root = Path(root).resolve()
    out = np.zeros((len(names), size, size, 3), dtype=np.uint8)
    bad = []
    for i, name in enumerate(names):
        try:
            data = _read_member(archive, name) if archive is not None else _read_file(Path(root), real_root, name)
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                out[i] = np.asarray(fit_image(to_rgb(image), size))
        except Unread as error:
            bad.append((i, str(error)))
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


def _unreadable(meta: Mapping[str, Any]) -> list[tuple[str, str]]:
    return [(str(name), str(reason)) for name, reason in meta["bad"]]


def read(path: Path, size: int, cache_dir: Path) -> tuple[Listing, np.ndarray, list[tuple[str, str]]]:
    """The listing of a folder or zip, its images as uint8 ``[N, 3, size, size]`` and (name, reason) per
    unreadable image: from the cache when it has them, else decoded once and cached."""
    hit = cache.read_cached_zip(path, cache_dir, size)  # a known zip: no listing, no decoding
    if hit is not None:
        return Listing.from_dict(path, hit[1]), hit[0], _unreadable(hit[1])
    listing = scan(path)
    hit = cache.read_cache(cache_dir, listing.key, size)
    if hit is not None:
        return listing, hit[0], _unreadable(hit[1])
    images, bad = decode(listing, size)
    unreadable = [(listing.names[i], reason) for i, reason in bad]
    cache.write_cache(cache_dir, listing.key, size, images, {**listing.as_dict(), "bad": unreadable})
    return listing, images, unreadable
