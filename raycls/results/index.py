"""A compacted index over a folder of small Parquet files (an experiment's `leaderboard/` or `history/`).

One file per trial stays the crash-safe source of truth: trials write their own file atomically and never
touch a shared one. Reading 10,000 such files one by one takes tens of seconds, so queries read an index
instead: `<experiment>/.raycls/index/<kind>.parquet`, every file's rows in one table, each row tagged with the
name, size and modification time of the file it came from. A read lists the folder (names and sizes only,
no file opened), keeps the index rows whose file is unchanged, reads only the files that are new or were
rewritten (a resumed trial, `raycls eval` replacing columns), drops rows whose file is gone, and, when that
changed anything, writes the index back (a temp file, then a rename: readers racing each other each write a
whole index, the last one wins, and the next read repairs whatever it missed). The rows are the same as
reading every file, by construction: the index only caches files it has seen unchanged.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raycls.results.arrays import bools, repeated_int64, repeated_string
from raycls.storage import index_file

# Columns that tie an index row to its file; dropped before the table is returned.
FILE, SIZE, MTIME = "__file", "__size", "__mtime_ns"
BOOKKEEPING = (FILE, SIZE, MTIME)


@dataclass
class FolderRead:
    table: pa.Table | None  # None: no readable file
    skipped: list[str] = field(default_factory=list)  # "path: why" per unreadable or foreign file
    files: int = 0  # files in the folder, read or skipped
    read: int = 0  # files opened by this read, unreadable ones included (0 when the index had them all)


def index_path(experiment_root: str, kind: str) -> str:
    return index_file(experiment_root, kind)


@dataclass(frozen=True)
class Entry:
    name: str
    path: str
    size: int
    mtime_ns: int


def list_parquet(fs: pafs.FileSystem, folder: str) -> list[Entry]:
    """The folder's Parquet files (not temp files, which start with a dot), by name. A local folder is listed
    with os.scandir: pyarrow's FileInfo costs ~50 us per file in Python, 5 s for 100,000 files."""
    if isinstance(fs, pafs.LocalFileSystem):
        try:
            with os.scandir(folder) as entries:
                found = [
                    (e.name, e.path, e.stat())
                    for e in entries
                    if e.name.endswith(".parquet") and not e.name.startswith(".") and e.is_file()
                ]
        except FileNotFoundError:
            return []
        return sorted((Entry(n, p, st.st_size, st.st_mtime_ns) for n, p, st in found), key=lambda e: e.name)
    infos = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    return sorted(
        (
            Entry(i.base_name, i.path, i.size, i.mtime_ns or 0)
            for i in infos
            if i.type == pafs.FileType.File and i.base_name.endswith(".parquet") and not i.base_name.startswith(".")
        ),
        key=lambda e: e.name,
    )


READ_CHUNK = 1000  # trial files joined into one table at a time while the index is built


def read_folder(
    fs: pafs.FileSystem,
    folder: str,
    index: str | None,
    read_file: Callable[[pafs.FileSystem, str], pa.Table],
    check: Callable[[pa.Table], str | None],
    concat: Callable[[Sequence[pa.Table]], pa.Table],
    *,
    rebuild: bool = False,
) -> FolderRead:
    """Every file's rows under `folder` as one table, through the index at `index` (None: no index).
    `check` says why a table is not one of ours (None: it is); `concat` joins tables of differing schemas."""
    infos = list_parquet(fs, folder)
    current = {i.name: (i.size, i.mtime_ns) for i in infos}
    cached = None if rebuild or index is None else _read_index(fs, index)
    parts: list[pa.Table] = []
    unchanged: set[str] = set()
    if cached is not None:
        files, sizes, mtimes = (cached.column(c).to_pylist() for c in BOOKKEEPING)
        keep = [current.get(f) == (s, m) for f, s, m in zip(files, sizes, mtimes)]
        unchanged = {f for f, k in zip(files, keep) if k}
        parts.append(cached if all(keep) else cached.filter(bools(keep)))
    skipped: list[str] = []
    fresh: list[pa.Table] = []  # whole chunks, and the tables of the chunk being read
    pending = 0
    opened = 0
    for info in infos:
        if pending == READ_CHUNK:
            # One small Arrow table per file costs far more than its row (buffers, schema, allocator pages):
            # 100,000 of them took 15 GB. Each chunk of files is joined into one table as it is read.
            fresh[-pending:] = [concat(fresh[-pending:]).combine_chunks()]
            pending = 0
        if info.name in unchanged:
            continue
        opened += 1
        try:
            table = read_file(fs, info.path)
        except (pa.ArrowException, OSError) as err:
            skipped.append(f"{info.path}: unreadable ({type(err).__name__}: {str(err).splitlines()[0][:120]})")
            continue
        problem = check(table)
        if problem:
            skipped.append(f"{info.path}: {problem}")
            continue
        fresh.append(_tagged(table, info))
        pending += 1
    dropped = cached is not None and parts[0].num_rows < cached.num_rows
    tables = [t for t in (*parts, *fresh) if t.num_rows]
    merged = concat(tables) if tables else None
    if index is not None and merged is not None and (fresh or dropped or cached is None):
        _write_index(fs, index, merged)
    if merged is None or merged.num_rows == 0:
        return FolderRead(None, skipped, len(infos), opened)
    return FolderRead(merged.drop_columns(list(BOOKKEEPING)), skipped, len(infos), opened)


def _tagged(table: pa.Table, info: Entry) -> pa.Table:
    n = table.num_rows
    # raycls.results.arrays, not pa.array: `raycls leaderboard` then starts without pandas.
    table = table.append_column(FILE, repeated_string(info.name, n))
    table = table.append_column(SIZE, repeated_int64(info.size, n))
    return table.append_column(MTIME, repeated_int64(info.mtime_ns, n))


def _read_index(fs: pafs.FileSystem, path: str) -> pa.Table | None:
    """The index, or None when there is none or it cannot be read (it is then rebuilt from the files)."""
    try:
        with fs.open_input_file(path) as handle:
            # ParquetFile, not pq.read_table: read_table imports pyarrow.dataset (and pandas), 0.7 s of a
            # `raycls leaderboard` that otherwise answers in well under a second.
            table = pq.ParquetFile(handle).read()
    except (pa.ArrowException, OSError, FileNotFoundError):
        return None
    return table if set(BOOKKEEPING) <= set(table.column_names) else None


def write_table_atomic(fs: pafs.FileSystem, path: str, table: pa.Table) -> str:
    """A temp file beside `path`, then a rename: readers never see half a file."""
    parent, name = path.rsplit("/", 1)
    fs.create_dir(parent, recursive=True)
    tmp = f"{parent}/.{name}.{uuid.uuid4().hex[:8]}.tmp"
    pq.write_table(table, tmp, filesystem=fs)
    fs.move(tmp, path)  # a rename on local/NFS; object stores have no half-written objects to begin with
    return path


def _write_index(fs: pafs.FileSystem, path: str, table: pa.Table) -> None:
    """Atomically; a storage this reader may not write to (read-only mounts) just goes without an index."""
    try:
        write_table_atomic(fs, path, table)
    except (pa.ArrowException, OSError):
        pass
