"""Image files decoded once per (files, size): an on-disk uint8 cache shared by every trial on the node.

A folder or CSV dataset used to be decoded single-threaded, in full, by every trial: minutes per trial for a
100k-image folder. Here the first trial that needs a (file list, size) decodes it over the node's cores and
writes `<RAYCLS_CACHE>/decoded/<key>.npy` (a temp file, then a rename); every later trial, and later
experiments, memory-map that file. The key hashes each file's path, size and modification time with the
size, the resize mode (`data.resize`) and this decoder's version, so an edited image or another size is a new entry, never a stale one. A
file lock makes trials that start together wait for the one decoding instead of decoding the same images.

Decoding uses threads: Pillow releases the GIL while it decodes and resizes, and a trial actor must not
fork (a forked child of a threaded process can inherit a held lock: see raycls.evaluate's cleanlab call).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raycls.errors import DataError
from raycls.files import save_npy_atomic

DECODER_VERSION = 1  # bump when decode_image's output changes (resampling, colour conversion)
CACHE_SUBDIR = "decoded"


@dataclass
class DecodeStats:
    """What this process decoded and read from the cache (benchmarks and tests read it)."""

    decoded: int = 0
    cached: int = 0


STATS = DecodeStats()


def node_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cache_key(files: Sequence[Path], size: int, resize: str = "squash") -> str:
    digest = hashlib.sha256(f"v{DECODER_VERSION}:{size}:{resize}:{len(files)}".encode())
    for file in files:
        try:
            stat = file.stat()
        except FileNotFoundError:
            raise DataError(f"image {file} does not exist") from None
        digest.update(f"\n{file.resolve()}\t{stat.st_size}\t{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:32]


def decode_cached(
    files: Sequence[Path],
    size: int,
    *,
    resize: str = "squash",
    where: Sequence[str] | None = None,
    cache: Path | None = None,
    workers: int | None = None,
) -> np.ndarray:
    """`files` as uint8 [N, size, size, 3] RGB (made square by `resize`), from the node's cache when it has them
    (read-only memory map). `where[i]` prefixes file i's error message (a CSV's line); `cache` None: no cache,
    decode in memory."""
    if cache is None:
        return decode_all(files, size, resize=resize, where=where, workers=workers)
    folder = cache / CACHE_SUBDIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{cache_key(files, size, resize)}.npy"
    if not path.is_file():
        with open(folder / f"{path.stem}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # a trial decoding these files: wait for it, then read its cache
            if not path.is_file():
                images = decode_all(files, size, resize=resize, where=where, workers=workers)
                save_npy_atomic(path, images)
                return images
    STATS.cached += len(files)
    return np.load(path, mmap_mode="r")


def decode_all(
    files: Sequence[Path],
    size: int,
    *,
    resize: str = "squash",
    where: Sequence[str] | None = None,
    workers: int | None = None,
) -> np.ndarray:
    from raycls.images import decode_image

    out = np.empty((len(files), size, size, 3), dtype=np.uint8)

    def one(i: int) -> None:
        out[i] = decode_image(files[i], size, resize=resize, where=where[i] if where else "")

    with ThreadPoolExecutor(max_workers=workers or node_cores()) as pool:
        list(pool.map(one, range(len(files))))  # list(): raises the first file's DataError here
    STATS.decoded += len(files)
    return out
