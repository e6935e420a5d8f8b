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

from .conftest import write_digits_row

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
    result = subprocess.run(
        [sys.executable, "-c", PROBE.format(heavy=HEAVY), *argv], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    marker = result.stdout.rsplit("LOADED ", 1)
    assert len(marker) == 2, result.stdout[-2000:]
    return json.loads(marker[1])


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """Two experiments, one of them multi-objective (its rows' Pareto front is computed on every read)."""
    for i in range(12):
        write_trial(
            str(tmp_path),
            TrialRecord(
                experiment=("single", "multi")[i % 2],
                trial_id=f"t{i:03d}",
                status=("completed", "early_stopped", "failed")[i % 3],
                metric="val_acc",
                mode="max",
                params={"train.lr": 10.0 ** -(i % 4)},
                param_types={"train.lr": pa.float64()},
                history=[{"epoch": e, "val_acc": 0.1 * e + i / 1e3, "val_loss": 1.0 / (e + i)} for e in range(1, 3)],
                objectives="val_acc:max,val_loss:min" if i % 2 else None,
                started_at=STARTED,
                ended_at=STARTED + timedelta(seconds=60 + i),  # time-zoned timestamp columns
            ),
        )
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


@pytest.mark.parametrize(
    "values", [[], [True], [True, None, False], [i % 3 == 0 if i % 5 else None for i in range(37)]]
)
def test_arrays_built_without_pandas_equal_pa_array(values: list) -> None:
    """raycls.results.arrays builds from bit-packed buffers (37 values: more than one bitmap byte, a partial last)."""
    from raycls.results import arrays

    assert arrays.bools(values).equals(pa.array(values, pa.bool_()))
    ints = [None if v is None else (2**40 + i if v else -i) for i, v in enumerate(values)]
    assert arrays.int64s(ints).equals(pa.array(ints, pa.int64()))
    n = len(values)
    assert arrays.repeated_int64(1_764_000_000_123_456_789, n).equals(
        pa.array([1_764_000_000_123_456_789] * n, pa.int64())
    )
    assert arrays.repeated_string("t00042.parquet", n).equals(pa.array(["t00042.parquet"] * n, pa.string()))
    assert arrays.bools(values).validate(full=True) is None


def test_rows_with_zoned_timestamps_equal_to_pylist() -> None:
    from raycls.results.arrays import to_pylist

    when = [STARTED, None, STARTED + timedelta(microseconds=7)]
    table = pa.table(
        {
            "started_at": pa.array(when, pa.timestamp("us", tz="UTC")),
            "paris": pa.array(when, pa.timestamp("ms", tz="Europe/Paris")),
            "naive": pa.array([w and w.replace(tzinfo=None) for w in when], pa.timestamp("us")),
            "score": pa.array([0.5, None, 1.0]),
        }
    )
    rows = to_pylist(table)
    assert rows == table.to_pylist()
    assert [r["paris"] and r["paris"].utcoffset() for r in rows] == [timedelta(hours=1), None, timedelta(hours=1)]


# ------------------------------------------------------------------------------------------------- int8
@pytest.fixture(scope="module")
def digits_row(digits_run, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """The session's trained digits trial (conftest.digits_run) as this module's leaderboard row."""
    return write_digits_row(digits_run, tmp_path_factory.mktemp("int8") / "results", "digits-export")


def test_int8_ships_only_the_fastest_copy_faster_than_fp32_at_the_same_accuracy() -> None:
    from raycls.deliver.export import INT8_ACC_TOLERANCE, verdict

    def copy(ratio: float, delta: float = 0.0) -> dict:
        return {"latency_ratio": ratio, "acc_delta": delta}

    assert verdict({"dynamic": copy(0.8), "static_qdq": copy(0.5)}) == "static_qdq"
    assert verdict({"dynamic": copy(4.0), "static_qdq": copy(1.0)}) is None  # as fast is not faster
    assert verdict({"static_qdq": copy(0.5, -INT8_ACC_TOLERANCE)}) == "static_qdq"
    assert verdict({"static_qdq": copy(0.5, -2 * INT8_ACC_TOLERANCE), "dynamic": copy(0.9)}) == "dynamic"
    assert verdict({"static_qdq": {"error": "ValueError: unsupported op"}, "dynamic": copy(1.2)}) is None


def test_export_int8_measures_dynamic_and_static_and_says_why_not(digits_row, tmp_path: Path) -> None:
    """The digits small_cnn (8x8 px, GELU between its convolutions): neither int8 copy beats fp32 on CPU here,
    so none is written and export.json says so with the measured ratios; a stale copy does not survive."""
    from raycls.deliver.export import CALIBRATION_IMAGES, INT8_FILE, REPORT_FILE, export
    from raycls.deliver.model import load_trial_model

    storage, _ = digits_row
    trial = load_trial_model(storage, "digits-export", "best")
    (tmp_path / INT8_FILE).write_bytes(b"an earlier export's copy")
    q = export(trial, tmp_path, int8=True)["int8"]
    print(json.dumps(q, indent=1))
    assert set(q["methods"]) == {"dynamic", "static_qdq"}
    assert q["calibration_images"] == min(CALIBRATION_IMAGES, len(trial.data.splits.val))
    for method in q["methods"].values():
        assert method["latency_ms"] > 0 and abs(method["acc_delta"]) <= 0.02 and method["size_ratio"] < 0.6
    # Static QDQ (U8S8, fused into QLinearConv) is the cheaper int8: measured ~4x vs ~15x fp32's latency.
    assert q["methods"]["static_qdq"]["latency_ratio"] < q["methods"]["dynamic"]["latency_ratio"]
    written = json.loads((tmp_path / REPORT_FILE).read_text())
    if q["shipped"] is None:
        assert not (tmp_path / INT8_FILE).exists() and INT8_FILE not in written["files"]
        assert all(f"{m}: latency x" in q["why"] for m in q["methods"])
    else:  # a machine where int8 wins: the shipped copy is the one measured faster at the same accuracy
        assert q["latency_ratio"] < 1 and q["acc_delta"] >= -q["acc_tolerance"]
        assert written["files"][INT8_FILE] == (tmp_path / INT8_FILE).stat().st_size
