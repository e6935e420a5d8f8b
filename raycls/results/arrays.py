"""Arrow arrays from and to Python values without pyarrow importing pandas, for `raycls leaderboard`.

pyarrow imports pandas the first time `pa.array` (or `pa.scalar`, or a compute call given a Python value) sees
any value: its lazy pandas shim asks whether the value is a pandas object, and pyarrow 26 has no switch to skip
the question. A time-zoned timestamp's `as_py` asks too (whether pandas is there, before it looks at the unit).
That import is 0.36 s, a third of `raycls leaderboard` on 10,000 trials, whose read builds only a few arrays (a
filter mask, the index's file tags, the Pareto columns) and turns only the rows shown into Python. They go
through here: arrays from numpy buffers (numpy comes with pyarrow anyway), rows with time-zoned timestamps
converted here. Writers and everything else use pa.array and to_pylist as usual.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timezone
from typing import Any

import numpy as np
import pyarrow as pa


def bools(values: Sequence[bool | None]) -> pa.BooleanArray:
    """pa.array(values, pa.bool_()); None is null."""
    valid = np.fromiter((v is not None for v in values), dtype=bool, count=len(values))
    data = np.fromiter((bool(v) for v in values), dtype=bool, count=len(values))
    return _from_buffers(pa.bool_(), valid, _bitmap(data))


def int64s(values: Sequence[int | None]) -> pa.Int64Array:
    """pa.array(values, pa.int64()); None is null."""
    valid = np.fromiter((v is not None for v in values), dtype=bool, count=len(values))
    data = np.fromiter((0 if v is None else v for v in values), dtype=np.int64, count=len(values))
    return _from_buffers(pa.int64(), valid, pa.py_buffer(data))


def repeated_int64(value: int, n: int) -> pa.Int64Array:
    """pa.array([value] * n, pa.int64())."""
    return pa.Array.from_buffers(pa.int64(), n, [None, pa.py_buffer(np.full(n, value, dtype=np.int64))])


def repeated_string(value: str, n: int) -> pa.StringArray:
    """pa.array([value] * n, pa.string())."""
    encoded = value.encode()
    offsets = np.arange(n + 1, dtype=np.int32) * len(encoded)  # a leaderboard file holds a few rows: no overflow
    return pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(offsets), pa.py_buffer(encoded * n)])


def _bitmap(flags: np.ndarray) -> pa.Buffer:
    """Arrow's bit-packed layout: least significant bit first."""
    return pa.py_buffer(np.packbits(flags, bitorder="little"))


def _from_buffers(dtype: pa.DataType, valid: np.ndarray, data: pa.Buffer) -> pa.Array:
    nulls = int(len(valid) - valid.sum())
    validity = _bitmap(valid) if nulls else None
    return pa.Array.from_buffers(dtype, len(valid), [validity, data], null_count=nulls)


def to_pylist(table: pa.Table) -> list[dict[str, Any]]:
    """table.to_pylist(), the same values: time-zoned timestamps (started_at, ended_at) as aware datetimes."""
    zoned = {
        f.name: f.type.tz
        for f in table.schema
        if pa.types.is_timestamp(f.type) and f.type.tz is not None and f.type.unit != "ns"
    }
    if not zoned:
        return table.to_pylist()
    # Cast to naive timestamps (the same UTC instants, no zone to ask pyarrow about), then put the zone back
    # as pyarrow's own as_py would: the UTC datetime moved into the column's zone.
    naive = pa.schema([f.with_type(pa.timestamp(f.type.unit)) if f.name in zoned else f for f in table.schema])
    rows = table.cast(naive).to_pylist()
    zones = {name: pa.lib.string_to_tzinfo(tz) for name, tz in zoned.items()}
    for row in rows:
        for name, zone in zones.items():
            if row[name] is not None:
                row[name] = row[name].replace(tzinfo=timezone.utc).astimezone(zone)
    return rows
