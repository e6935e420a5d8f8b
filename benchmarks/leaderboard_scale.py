"""Claim: `raycls leaderboard` answers on 10,000 trials in under 1 s and on 100,000 in under 3 s on 2 cores,
with the same rows as reading the trial files one by one.

Generates experiments of N one-row trial files shaped like real rows (the fixed columns, a dozen metrics,
three sampled parameters, the config as JSON), then times, in one run and on the same files:
- `read_leaderboard` with no index yet (the first query: every file read once, the index written),
- `read_leaderboard` again (the index is whole: the folder is listed, no trial file opened),
- `read_leaderboard` after 1% new trial files (only those are read; the index is rewritten),
- the whole `raycls leaderboard --top 10` command in a fresh process (what a user waits for; median of 5), beside
  a bare interpreter and `import raycls.cli` (the part of it that is start-up),
- DuckDB reading the same files directly (`read_parquet('.../*.parquet', union_by_name=true)`),
- and checks that the index's rows equal the files' rows.

    python benchmarks/leaderboard_scale.py                 # 1k, 10k, 100k
    python benchmarks/leaderboard_scale.py --sizes 1000 10000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from common import write_result

from raycls.results.leaderboard import FIXED_COLUMNS, read_leaderboard

METRICS = (
    "val_acc",
    "val_loss",
    "val_top5",
    "train_loss",
    "lr",
    "images_per_s",
    "epoch_s",
    "test_acc",
    "test_ece",
    "test_nll",
    "params",
    "flops",
)


def row(i: int, experiment: str) -> pa.Table:
    now = datetime(2026, 11, 29, tzinfo=timezone.utc)
    values = {name: None for name, _ in FIXED_COLUMNS}
    values.update(
        experiment=experiment,
        trial_id=f"{i:08x}",
        status=("completed", "early_stopped", "failed")[i % 3],
        phase="supervised",
        metric="val_acc",
        mode="max",
        score=(i % 997) / 997,
        epochs=1 + i % 10,
        best_epoch=1 + i % 10,
        max_epochs=10,
        started_at=now,
        ended_at=now,
        wall_s=float(i % 60),
        config_json=json.dumps(
            {"train": {"lr": 1e-3 * (1 + i % 7)}, "model": {"name": "small_cnn", "width": 8 << (i % 3)}}
        ),
    )
    fields = list(FIXED_COLUMNS) + [(m, pa.float64()) for m in METRICS]
    fields += [("train.lr", pa.float64()), ("model.width", pa.int64()), ("train.optimizer", pa.string())]
    values.update({m: (i % 101) / 101 for m in METRICS})
    values.update(
        {"train.lr": 1e-3 * (1 + i % 7), "model.width": 8 << (i % 3), "train.optimizer": ("sgd", "adamw")[i % 2]}
    )
    schema = pa.schema(fields)
    return pa.Table.from_pylist([{n: values.get(n) for n in schema.names}], schema=schema)


def generate(storage: Path, experiment: str, start: int, count: int) -> None:
    folder = storage / experiment / "leaderboard"
    folder.mkdir(parents=True, exist_ok=True)

    def write(i: int) -> None:
        pq.write_table(row(i, experiment), folder / f"{i:08x}.parquet")

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(write, range(start, start + count)))


def timed(fn):
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started


def duckdb_read(storage: Path, experiment: str) -> tuple[int, float]:
    import duckdb

    glob = str(storage / experiment / "leaderboard" / "*.parquet")
    relation = duckdb.sql(f"select * from read_parquet('{glob}', union_by_name=true)")
    table, seconds = timed(lambda: (getattr(relation, "to_arrow_table", None) or relation.fetch_arrow_table)())
    return table.num_rows, seconds, table


RUNS = 5  # fresh processes per start-up number (its median is written; 2 shared cores make single runs noisy)


def process_seconds(argv: list[str]) -> list[float]:
    """Wall seconds of RUNS fresh `python ARGV` processes."""
    runs = []
    for _ in range(RUNS):
        started = time.perf_counter()
        subprocess.run([sys.executable, *argv], check=True, capture_output=True)
        runs.append(round(time.perf_counter() - started, 3))
    return runs


def cli_seconds(storage: Path) -> dict:
    """The whole `raycls leaderboard --top 10` beside its floor: the interpreter alone, and importing the CLI
    (what start-up costs before the query; tests/test_leaderboard_startup_int8.py keeps the heavy ones out)."""
    command = process_seconds(["-m", "raycls.cli", "leaderboard", str(storage), "--top", "10", "--format", "csv"])
    return {
        "cli_top10_s": statistics.median(command),
        "cli_top10_runs": command,
        "python_startup_s": statistics.median(process_seconds(["-c", "pass"])),
        "cli_import_s": statistics.median(process_seconds(["-c", "import raycls.cli"])),
    }


def measure(size: int, root: Path, *, reuse: Path | None = None) -> dict:
    storage = reuse or root / f"n{size}"
    if reuse is not None:  # a tree generated before (its index removed): the first read is cold again
        shutil.rmtree(storage / "scale" / ".raycls", ignore_errors=True)
        size, generate_s = sum(1 for _ in os.scandir(storage / "scale" / "leaderboard")), None
    else:
        _, generate_s = timed(lambda: generate(storage, "scale", 0, size))
    cold, cold_s = timed(lambda: read_leaderboard(str(storage)))
    warm, warm_s = timed(lambda: read_leaderboard(str(storage)))
    new = max(1, size // 100)
    generate(storage, "scale", size, new)
    grown, grown_s = timed(lambda: read_leaderboard(str(storage)))
    settled, settled_s = timed(lambda: read_leaderboard(str(storage)))
    count, duck_s, reference = duckdb_read(storage, "scale")
    # The files' rows as DuckDB read them (an independent reader; 100k pyarrow tables, one per file, took
    # over 16 GB to concatenate), against the index's.
    key = lambda t: t.sort_by("trial_id").select(sorted(reference.column_names)).to_pylist()  # noqa: E731
    same = key(settled.table.cast(settled.table.schema)) == key(reference.cast(reference.schema))
    result = {
        "trials": size + new,
        "generate_s": None if generate_s is None else round(generate_s, 2),
        "first_read_s": round(cold_s, 3),
        "first_read_opened": cold.opened,
        "indexed_read_s": round(warm_s, 3),
        "indexed_read_opened": warm.opened,
        "after_1pct_new_s": round(grown_s, 3),
        "after_1pct_new_opened": grown.opened,
        "indexed_again_s": round(settled_s, 3),
        **cli_seconds(storage),
        "duckdb_direct_s": round(duck_s, 3),
        "duckdb_rows": count,
        "rows": settled.table.num_rows,
        "same_rows_as_files": same,
        "indexed_vs_duckdb": round(settled_s / duck_s, 3),
    }
    if reuse is None:
        shutil.rmtree(storage, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="*", default=[1000, 10_000, 100_000])
    parser.add_argument(
        "--reuse", type=Path, nargs="*", default=[], help="storage roots generated before, measured as they are"
    )
    parser.add_argument("--previous", type=Path, help="a results JSON whose measured sizes are kept beside these")
    args = parser.parse_args()
    results = json.loads(args.previous.read_text())["results"] if args.previous else []
    with tempfile.TemporaryDirectory(prefix="raycls-lb-") as root:
        for size in args.sizes:
            results.append(measure(size, Path(root)))
            print(json.dumps(results[-1]), flush=True)
        for tree in args.reuse:
            results.append(measure(0, Path(root), reuse=tree))
            print(json.dumps(results[-1]), flush=True)
    print(
        write_result(
            "leaderboard_scale",
            {
                "claim": "leaderboard queries: < 1 s at 10k trials, < 3 s at 100k",
                "cpus": os.cpu_count(),
                "results": results,
            },
        )
    )


if __name__ == "__main__":
    main()
