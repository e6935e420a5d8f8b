"""The leaderboard's query index (raycls.results.index) on generated trees: a read through the index gives the
same rows as reading every trial file one by one, opens only new or rewritten files, forgets deleted ones,
and skips (never indexes) a corrupt one."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raycls.cli import main
from raycls.results import index
from raycls.results.leaderboard import TrialRecord, read_leaderboard, update_evaluation, write_trial
from raycls.storage import INDEX_DIR


def generate(storage: Path, experiment: str, trials: range, *, string_param: bool = False) -> None:
    for i in trials:
        params, types = (
            ({"model.name": f"net{i % 2}"}, {"model.name": pa.string()})
            if string_param
            else ({"train.lr": 10.0 ** -(i % 4)}, {"train.lr": pa.float64()})
        )
        record = TrialRecord(
            experiment=experiment,
            trial_id=f"t{i:05d}",
            status=("completed", "early_stopped", "failed")[i % 3],
            metric="val_acc",
            mode="max",
            params=params,
            param_types=types,
            history=[{"epoch": e, "val_acc": 0.1 * e + i / 1e4} for e in range(1, 1 + i % 3 + 1)],
        )
        write_trial(str(storage), record)


def one_by_one(storage: Path, kind: str = "leaderboard") -> list[dict]:
    """The reference: every file read on its own, whatever the index says."""
    tables = [pq.read_table(p) for p in sorted(storage.glob(f"*/{kind}/*.parquet")) if not p.name.startswith(".")]
    rows = pa.concat_tables(tables, promote_options="permissive").to_pylist()
    return sorted(rows, key=lambda r: (r["experiment"], r["trial_id"], r.get("epoch") or 0))


def indexed(storage: Path, kind: str = "leaderboard"):
    read = read_leaderboard(str(storage), kind=kind)
    rows = [{k: v for k, v in r.items() if k not in ("pareto", "pareto_rank")} for r in read.table.to_pylist()]
    return read, sorted(rows, key=lambda r: (r["experiment"], r["trial_id"], r.get("epoch") or 0))


def same(got: list[dict], want: list[dict]) -> bool:
    """Row by row, on the reference's columns (the index's table may have more, null, columns)."""
    return len(got) == len(want) and all({k: g.get(k) for k in w} == w for g, w in zip(got, want))


@pytest.mark.parametrize("chunk", [1000, 7])  # 7: files joined into tables seven at a time, as 100k files are
def test_index_reads_only_what_changed_and_matches_the_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    monkeypatch.setattr(index, "READ_CHUNK", chunk)
    generate(tmp_path, "a", range(0, 120))
    generate(tmp_path, "b", range(120, 200), string_param=True)  # another experiment, other columns
    first, rows = indexed(tmp_path)
    assert first.opened == 200 and first.files == 200 and same(rows, one_by_one(tmp_path))
    assert (tmp_path / "a" / INDEX_DIR / "leaderboard.parquet").is_file()
    again, rows = indexed(tmp_path)
    assert again.opened == 0 and same(rows, one_by_one(tmp_path))

    generate(tmp_path, "a", range(200, 203))  # new trials
    update_evaluation(
        str(tmp_path), "a", "t00005", {"metrics": {"test_acc": 0.5}, "eval_split": "test", "eval_suite": "default"}
    )  # rewritten
    (tmp_path / "b" / "leaderboard" / "t00150.parquet").unlink()  # deleted
    (tmp_path / "b" / "leaderboard" / "broken.parquet").write_bytes(b"PAR1 not really")  # corrupt
    changed, rows = indexed(tmp_path)  # 3 new, 1 rewritten, 1 corrupt: opened; the other 198 from the index
    assert changed.opened == 5 and any("broken.parquet: unreadable" in s for s in changed.skipped)
    assert same(rows, [r for r in one_by_one_readable(tmp_path)])
    assert [r["test_acc"] for r in rows if r["trial_id"] == "t00005"] == [0.5]
    assert "t00150" not in {r["trial_id"] for r in rows} and len(rows) == 202
    settled, rows = indexed(tmp_path)
    assert settled.opened == 1 and same(rows, one_by_one_readable(tmp_path))  # only the corrupt file, tried again

    history, epochs = indexed(tmp_path, "history")  # the per-epoch files go through their own index
    assert same(epochs, one_by_one_readable(tmp_path, "history"))
    assert indexed(tmp_path, "history")[0].opened == 0


def one_by_one_readable(storage: Path, kind: str = "leaderboard") -> list[dict]:
    broken = storage / "b" / kind / "broken.parquet"
    content = broken.read_bytes() if broken.exists() else None
    if content is not None:
        broken.unlink()
    try:
        return one_by_one(storage, kind)
    finally:
        if content is not None:
            broken.write_bytes(content)


def test_leaderboard_compact_rebuilds_the_index(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    generate(tmp_path, "a", range(0, 30))
    index = tmp_path / "a" / INDEX_DIR / "leaderboard.parquet"
    index.parent.mkdir(parents=True)
    index.write_bytes(b"garbage")  # an index that cannot be read is rebuilt, never trusted
    try:
        main(["leaderboard", "compact", str(tmp_path)])
    except SystemExit as exited:
        assert exited.code in (0, None)
    out = " ".join(capsys.readouterr().out.split())
    assert "leaderboard: 30 files, 30 rows indexed" in out and "history: 30 files" in out
    assert pq.read_table(index).num_rows == 30 and read_leaderboard(str(tmp_path)).opened == 0
