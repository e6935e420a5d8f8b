"""Issue 28 (platform cost): `raycls leaderboard` starts without the heavy libraries, and `raycls export --int8`
ships an int8 model only where it is faster at the same accuracy.

Start-up: what keeps `raycls leaderboard` on 10,000 trials under a second is what it does not import (torch,
Ray, pandas, DuckDB: ~1.5 s together). Each case runs the command in a fresh interpreter and lists the heavy
modules left in sys.modules: a module-level import that drags one in fails here, named.
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pytest

from raycls.results.leaderboard import TrialRecord, write_trial

STARTED = datetime(2026, 12, 2, 8, 0, tzinfo=timezone.utc)
HEAVY = ("torch", "torchvision", "ray", "pandas", "duckdb", "optuna", "wandb", "sklearn", "onnxruntime")

# Runs the CLI in-process, then prints the heavy top-level modules it loaded (main() may exit: report anyway).
PROBE = """
import json, sys
from raycls.cli import main
try:
    main(sys.argv[1:])
finally:
    heavy = {heavy!r}
    print("\\nLOADED " + json.dumps(sorted(m for m in heavy if m in sys.modules)))
"""


def loaded_by(*argv: str) -> list[str]:
    """The heavy modules a fresh interpreter holds after `raycls ARGV` (which must succeed)."""
    result = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), *argv],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    marker = result.stdout.rsplit("LOADED ", 1)
    assert len(marker) == 2, result.stdout[-2000:]
    return json.loads(marker[1])


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """Two experiments, one of them multi-objective (its rows' Pareto front is computed on every read)."""
    for i in range(12):
        write_trial(str(tmp_path), TrialRecord(
            experiment=("single", "multi")[i % 2], trial_id=f"t{i:03d}", status=("completed", "early_stopped", "failed")[i % 3],
            metric="val_acc", mode="max", params={"train.lr": 10.0 ** -(i % 4)}, param_types={"train.lr": pa.float64()},
            history=[{"epoch": e, "val_acc": 0.1 * e + i / 1e3, "val_loss": 1.0 / (e + i)} for e in range(1, 3)],
            objectives="val_acc:max,val_loss:min" if i % 2 else None,
            started_at=STARTED, ended_at=STARTED + timedelta(seconds=60 + i),  # time-zoned timestamp columns
        ))  # fmt: skip
    return tmp_path


def test_leaderboard_starts_without_heavy_modules(store: Path) -> None:
    # The first read builds the index (every trial file opened, new arrays tagged), the second reads it.
    assert loaded_by("leaderboard", str(store), "--top", "3") == []
    assert loaded_by("leaderboard", str(store), "--top", "3") == []
    assert loaded_by("leaderboard", str(store), "--sort", "val_loss", "--ascending", "--format", "csv") == []
    assert loaded_by("leaderboard", str(store), "--history", "--format", "json") == []


def test_the_probe_sees_an_import(store: Path) -> None:
    """--where runs SQL: DuckDB is imported then, and the probe says so (it can fail)."""
    assert "duckdb" in loaded_by("leaderboard", str(store), "--where", "score > 0.1")


@pytest.mark.parametrize("values", [[], [True], [True, None, False], [i % 3 == 0 if i % 5 else None for i in range(37)]])
def test_arrays_built_without_pandas_equal_pa_array(values: list) -> None:
    """raycls.results.arrays builds from bit-packed buffers (37 values: more than one bitmap byte, a partial last)."""
    from raycls.results import arrays

    assert arrays.bools(values).equals(pa.array(values, pa.bool_()))
    ints = [None if v is None else (2**40 + i if v else -i) for i, v in enumerate(values)]
    assert arrays.int64s(ints).equals(pa.array(ints, pa.int64()))
    n = len(values)
    assert arrays.repeated_int64(1_764_000_000_123_456_789, n).equals(pa.array([1_764_000_000_123_456_789] * n, pa.int64()))
    assert arrays.repeated_string("t00042.parquet", n).equals(pa.array(["t00042.parquet"] * n, pa.string()))
    assert arrays.bools(values).validate(full=True) is None


def test_rows_with_zoned_timestamps_equal_to_pylist() -> None:
    from raycls.results.arrays import to_pylist

    when = [STARTED, None, STARTED + timedelta(microseconds=7)]
    table = pa.table({"started_at": pa.array(when, pa.timestamp("us", tz="UTC")),
                      "paris": pa.array(when, pa.timestamp("ms", tz="Europe/Paris")),
                      "naive": pa.array([w and w.replace(tzinfo=None) for w in when], pa.timestamp("us")),
                      "score": pa.array([0.5, None, 1.0])})  # fmt: skip
    rows = to_pylist(table)
    assert rows == table.to_pylist()
    assert [r["paris"] and r["paris"].utcoffset() for r in rows] == [timedelta(hours=1), None, timedelta(hours=1)]
