"""This machine's files: atomic writes (a temp file in the same folder, then a rename: readers never see half a
file) and the local cache folder every layer keeps its node-local files under."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# The local cache: decoded datasets, splits and decoded image files (raycls.data), and the files of an
# experiment on object storage that need a local filesystem (raycls.storage: experiments/<name>/).
CACHE_ENV = "RAYCLS_CACHE"


def cache_root() -> Path:
    """$RAYCLS_CACHE, else ~/.cache/raycls (not created here)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "raycls").expanduser()


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temp path beside `path` to write; renamed onto `path` when the block ends without an error, removed
    when it raises (a write that failed leaves nothing behind)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # gone after the rename


def write_text_atomic(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def save_npy_atomic(path: str | Path, array: Any) -> Path:
    """`np.save` through a temp file: concurrent trials reading a cache never see half an array."""
    import numpy as np

    with atomic_path(path) as tmp, open(tmp, "wb") as handle:  # a handle: np.save would add ".npy" to a name
        np.save(handle, array)
    return Path(path)


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def replace_dir(src: Path, dst: Path) -> Path:
    """Copy folder `src` to `dst`, replacing `dst` only once the copy is complete."""
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    old = dst.with_name(f".{dst.name}.old{os.getpid()}")
    if dst.exists():
        os.replace(dst, old)
    os.replace(tmp, dst)
    shutil.rmtree(old, ignore_errors=True)
    return dst
