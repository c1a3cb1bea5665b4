"""The decoded-image cache: one uint8 ``.npy`` array and a ``.json`` description per source and size.

The key is the source's content: a digest of a zip's central directory (every name, size and CRC-32) or
of a folder's listing (names, sizes, modification times). A cached zip is recognised from its central
directory alone, so a second load of 50,000 images reads two files and decodes nothing.
Only ``cache_dir`` is ever written, atomically (:func:`resnet_lessons._files.atomic_write`: a temporary
file, then a rename); temporaries that a killed load left there are removed after an hour.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .._files import atomic_write, remove_stale_temporaries

if TYPE_CHECKING:
    from .folders import Listing

CACHE_FORMAT = 1  # bump when the decoding changes, so old caches are not reused
STALE_SECONDS = 3600.0  # a temporary this old in the cache was left by a killed process


def zip_directory_digest(path: Path) -> str | None:
    """Digest of a zip's central directory (every name, size and CRC-32), read without parsing it.

    Hashing a few megabytes is much quicker than listing 50,000 entries, so a cached zip is recognised
    at once. None when the archive is ZIP64 or unusual; the caller then hashes the parsed listing.
    """
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 65_557))
            tail = f.read()
            at = tail.rfind(b"PK\x05\x06")
            if at < 0 or at + 22 > len(tail):
                return None
            cd_size = int.from_bytes(tail[at + 12 : at + 16], "little")
            cd_offset = int.from_bytes(tail[at + 16 : at + 20], "little")
            if 0xFFFFFFFF in (cd_size, cd_offset) or cd_offset + cd_size > size:
                return None
            f.seek(cd_offset)
            directory = f.read(cd_size)
    except OSError:
        return None
    digest = hashlib.sha256(f"resnet_lessons zip v{CACHE_FORMAT}\n".encode() + directory)
    return "zip-" + digest.hexdigest()[:24]


def cache_paths(cache_dir: Path, key: str, size: int) -> tuple[Path, Path]:
    stem = cache_dir / "images" / f"{key}-{size}px"
    return stem.with_suffix(".npy"), stem.with_suffix(".json")


def read_cache(cache_dir: Path, key: str, size: int) -> tuple[np.ndarray, dict] | None:
    """The decoded array and its description (listing, unreadable files) if ``key`` was cached."""
    array_path, meta_path = cache_paths(cache_dir, key, size)
    try:
        meta = json.loads(meta_path.read_text())
        images = np.load(array_path, mmap_mode="c")  # pages are read as the splits are gathered
    except (OSError, ValueError):
        return None
    if images.shape != (len(meta.get("names", ())), 3, size, size) or meta.get("key") != key:
        return None
    return images, meta


def load_cached(path: Path, cache_dir: Path, size: int) -> tuple[Listing, np.ndarray, dict] | None:
    """A cached zip, recognised by its central directory alone (no listing, no decoding); else None."""
    key = zip_directory_digest(path) if path.is_file() else None
    cached = read_cache(cache_dir, key, size) if key else None
    if cached is None:
        return None
    images, meta = cached
    from .folders import Listing

    listing = Listing(path=path, is_zip=True, splits=tuple(meta["splits"]), classes=tuple(meta["classes"]),
                      names=tuple(meta["names"]), split_of=tuple(meta["split_of"]),
                      label_of=tuple(meta["label_of"]), key=key)
    return listing, images, meta


def write_cache(cache_dir: Path, listing: Listing, size: int, images: np.ndarray, bad: list) -> None:
    """Atomically write the decoded array and its description; a cache that cannot be written is skipped."""
    array_path, meta_path = cache_paths(cache_dir, listing.key, size)
    meta = {"key": listing.key, "source": str(listing.path), "image_size": size,
            "bad": [[listing.names[i], reason] for i, reason in bad], "splits": listing.splits,
            "classes": listing.classes, "names": listing.names, "split_of": listing.split_of,
            "label_of": listing.label_of}
    try:
        array_path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(array_path.parent, older_than=STALE_SECONDS)  # cache files only live here
        atomic_write(array_path, lambda stream: np.save(stream, images), what="cache file")
        atomic_write(meta_path, json.dumps(meta), what="cache file")
    except OSError as error:
        warnings.warn(f"could not write the image cache in {array_path.parent}: {error}", stacklevel=2)
