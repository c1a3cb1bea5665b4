"""The decoded-image cache: one uint8 ``.npy`` array and its ``.json`` metadata per source and size.

It stores and returns arrays and plain metadata; what the metadata means (a folder's listing, its unreadable
files) is :mod:`.folders`' business, which also rebuilds its listing from it.

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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .._files import atomic_write, remove_stale_temporaries

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


def read_cache(cache_dir: Path, key: str, size: int) -> tuple[np.ndarray, dict[str, Any]] | None:
    """The array and the metadata stored under ``key`` and ``size``, or None when there are none (or they do not
    match: one image per entry of the metadata's ``names``)."""
    array_path, meta_path = cache_paths(cache_dir, key, size)
    try:
        meta = json.loads(meta_path.read_text())
        images = np.load(array_path, mmap_mode="c")  # pages are read as the splits are gathered
    except (OSError, ValueError):
        return None
    if images.shape != (len(meta.get("names", ())), 3, size, size) or meta.get("key") != key:
        return None
    return images, meta


def read_cached_zip(path: Path, cache_dir: Path, size: int) -> tuple[np.ndarray, dict[str, Any]] | None:
    """A cached zip's array and metadata, recognised by its central directory alone (no listing, no decoding)."""
    key = zip_directory_digest(path) if path.is_file() else None
    return read_cache(cache_dir, key, size) if key else None


def write_cache(cache_dir: Path, key: str, size: int, images: np.ndarray, meta: Mapping[str, Any]) -> None:
    """Atomically write the array and its metadata (JSON: ``names``, one per image, and what the caller keeps
    beside them) under ``key`` and ``size``; a cache that cannot be written is skipped with a warning."""
    array_path, meta_path = cache_paths(cache_dir, key, size)
    try:
        array_path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(array_path.parent, older_than=STALE_SECONDS)  # cache files only live here
        atomic_write(array_path, lambda stream: np.save(stream, images), what="cache file")
        atomic_write(meta_path, json.dumps({"key": key, "image_size": size, **meta}), what="cache file")
    except OSError as error:
        warnings.warn(f"could not write the image cache in {array_path.parent}: {error}", stacklevel=2)
