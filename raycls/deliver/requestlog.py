"""`raycls serve`'s request log: one row per request, appended in batches of Parquet files in one folder.

Rows wait in memory and are written together, every `rows` rows or `seconds` seconds (whichever first) and
when the server shuts down (SIGTERM, Ctrl-C, Serve stopping a replica): one file per flush, not per request,
so a 1,000-request load leaves a handful of files and the request path never waits on a file. Each file is
written to a temp name, then renamed: readers (`pq.read_table(folder)`, like the leaderboard) never see half
a file, and replicas never write to the same one. A process killed with SIGKILL loses at most its unflushed
rows: `seconds` bounds how many.
"""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from raycls.files import atomic_path

SCHEMA = pa.schema(
    [
        ("time", pa.string()),
        ("path", pa.string()),
        ("filename", pa.string()),
        ("bytes", pa.int64()),
        ("status", pa.int64()),
        ("label", pa.string()),
        ("confidence", pa.float64()),
        ("latency_ms", pa.float64()),
        ("batch", pa.int64()),
        ("error", pa.string()),
    ]
)


def write_log(folder: Path, rows: list[dict[str, Any]]) -> Path | None:
    """One Parquet file for `rows` (a temp name, then a rename); None when there is nothing to write."""
    if not rows:
        return None
    path = folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}.parquet"
    with atomic_path(path) as tmp:
        pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in SCHEMA.names} for r in rows], schema=SCHEMA), tmp)
    return path


class RequestLog:
    """Buffered rows, flushed by count, by age (a daemon thread) and on close. Thread-safe: the event loop
    appends while the timer flushes."""

    def __init__(self, folder: Path, *, rows: int = 256, seconds: float = 5.0):
        if rows < 1 or seconds <= 0:
            raise ValueError(f"request log: rows={rows} must be >= 1 and seconds={seconds} > 0")
        self.folder, self.rows, self.seconds = folder, rows, seconds
        self._buffer: list[dict[str, Any]] = []
        self._lock = threading.Lock()  # guards the buffer; held while a flush swaps it out, not while it writes
        self._write = threading.Lock()  # one writer at a time, so close() returns after every write is done
        self._closed = threading.Event()
        self._timer = threading.Thread(target=self._flush_every, name="raycls-request-log", daemon=True)
        self._timer.start()

    def append(self, row: dict[str, Any]) -> None:
        with self._lock:
            self._buffer.append(row)
            full = len(self._buffer) >= self.rows
        if full:
            self.flush()

    def flush(self) -> Path | None:
        with self._write:
            with self._lock:
                rows, self._buffer = self._buffer, []
            return write_log(self.folder, rows)

    def close(self) -> None:
        """Write what is left; later appends are still written (close is idempotent and flushes each time)."""
        self._closed.set()
        self.flush()

    def _flush_every(self) -> None:
        while not self._closed.wait(self.seconds):
            self.flush()
