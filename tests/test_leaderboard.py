"""The Parquet leaderboard without Ray: atomic one-file-per-trial rows, typed columns, queries, bad files."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raycls.errors import LeaderboardError
from raycls.results import TrialRecord, read_leaderboard, select, write_trial, written_trials
from raycls.results.query import quote_dotted
from raycls.results.render import render

TYPES = {"train.lr": pa.float64(), "model.width": pa.int64(), "train.optimizer": pa.string()}


def record(trial_id: str, status: str, lr: float, acc: list[float], **kw) -> TrialRecord:
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    history = [{"epoch": i + 1, "val_acc": a, "val_loss": 1 - a, "epoch_s": 0.5} for i, a in enumerate(acc)]
    return TrialRecord(
        experiment=kw.pop("experiment", "exp"),
        trial_id=trial_id,
        status=status,
        metric="val_acc",
        mode="max",
        params={"train.lr": lr, "model.width": 16, "train.optimizer": "sgd"},
        param_types=TYPES,
        history=history,
        max_epochs=3,
        started_at=start,
        ended_at=start + timedelta(seconds=10),
        **kw,
    )


@pytest.fixture
def storage(tmp_path: Path) -> str:
    write_trial(str(tmp_path), record("a", "completed", 0.1, [0.5, 0.7, 0.9]))
    write_trial(str(tmp_path), record("b", "early_stopped", 0.001, [0.3]))
    write_trial(str(tmp_path), record("c", "failed", 10.0, [0.2, 0.1], error="NonFiniteLossError: train_loss is nan"))
    write_trial(str(tmp_path), record("z", "completed", 0.05, [0.6, 0.8, 0.85], experiment="other"))
    return str(tmp_path)


def test_row_has_typed_columns_and_best_epoch_metrics(storage: str) -> None:
    table = pq.read_table(Path(storage) / "exp" / "leaderboard" / "a.parquet")
    assert table.num_rows == 1
    assert table.schema.field("train.lr").type == pa.float64()
    assert table.schema.field("model.width").type == pa.int64()
    assert table.schema.field("train.optimizer").type == pa.string()
    row = table.to_pylist()[0]
    assert row["val_acc"] == 0.9 and row["best_epoch"] == 3 and row["score"] == 0.9 and row["wall_s"] == 10.0
    assert row["train_s"] == pytest.approx(1.5) and row["raycls_version"]
    history = pq.read_table(Path(storage) / "exp" / "history" / "a.parquet")
    assert history.column("val_acc").to_pylist() == [0.5, 0.7, 0.9]


def test_rewriting_a_trial_replaces_its_row(storage: str) -> None:
    write_trial(storage, record("a", "completed", 0.1, [0.5, 0.7, 0.95]))
    table = read_leaderboard(storage, "exp").table
    assert table.num_rows == 3 and sorted(table.column("trial_id").to_pylist()) == ["a", "b", "c"]
    assert written_trials(storage, "exp") == {"a", "b", "c"}
    assert not [p for p in (Path(storage) / "exp" / "leaderboard").iterdir() if p.name.startswith(".")]  # no temp files


def test_read_all_experiments_and_skip_bad_files(storage: str) -> None:
    folder = Path(storage) / "exp" / "leaderboard"
    (folder / "corrupt.parquet").write_bytes(b"PAR1 this is not parquet")
    pq.write_table(pa.table({"x": [1]}), folder / "foreign.parquet")
    read = read_leaderboard(storage)
    assert read.table.num_rows == 4 and set(read.table.column("experiment").to_pylist()) == {"exp", "other"}
    assert len(read.skipped) == 2
    assert any("corrupt.parquet: unreadable" in s for s in read.skipped)
    assert any("foreign.parquet: not a raycls" in s for s in read.skipped)


def test_select_top_sort_where(storage: str) -> None:
    table = read_leaderboard(storage).table
    top = select(table, sort="score", top=2)
    assert top.column("trial_id").to_pylist() == ["a", "z"]
    low_lr = select(table, where="train.lr < 0.08 and status = 'completed'")
    assert low_lr.column("trial_id").to_pylist() == ["z"]
    assert select(table, where="status = 'train.lr'").num_rows == 0  # dotted names inside strings untouched
    assert select(table, sort="wall_s", descending=False).num_rows == 4
    with pytest.raises(LeaderboardError, match="no such column"):
        select(table, sort="nope")
    with pytest.raises(LeaderboardError, match="query failed"):
        select(table, where="train.lr <<< 1")


def test_quote_dotted() -> None:
    columns = ["train.lr", "train.lr_decay", "status"]
    assert quote_dotted("train.lr < 1 and train.lr_decay > 2", columns) == '"train.lr" < 1 and "train.lr_decay" > 2'
    assert quote_dotted("status = 'train.lr'", columns) == "status = 'train.lr'"
    assert quote_dotted("val_recall@1 > 0.9", ["val_recall@1"]) == '"val_recall@1" > 0.9'


def test_render_formats(storage: str) -> None:
    table = select(read_leaderboard(storage, "exp").table, sort="score")
    rows = json.loads(render(table, "json"))
    assert [r["trial_id"] for r in rows] == ["a", "b", "c"] and rows[0]["train.lr"] == 0.1
    assert rows[2]["error"].startswith("NonFiniteLossError")
    csv_text = render(table, "csv")
    assert csv_text.splitlines()[0].startswith("experiment,trial_id,status") and len(csv_text.splitlines()) == 4
    markdown = render(table, "markdown")
    assert markdown.splitlines()[1].startswith("|---|") and "| exp | a | completed |" in markdown
    with pytest.raises(LeaderboardError, match="expected table, csv, json or markdown"):
        render(table, "xml")


def test_cli_leaderboard_json_and_errors(storage: str) -> None:
    run = lambda *args: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "raycls.cli", "leaderboard", storage, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    result = run("--experiment", "exp", "--format", "json", "--where", "status != 'failed'", "--sort", "train.lr")
    assert result.returncode == 0, result.stderr
    assert [r["trial_id"] for r in json.loads(result.stdout)] == ["a", "b"]
    sql = run(
        "--sql",
        "select experiment, count(*) as n from leaderboard group by experiment order by experiment",
        "--format",
        "csv",
    )
    assert sql.stdout.splitlines() == ["experiment,n", "exp,3", "other,1"]
    bad = run("--where", "nonsense ===")
    assert bad.returncode == 2 and "query failed" in bad.stdout and "Traceback" not in bad.stdout + bad.stderr


def test_a_row_is_built_from_what_the_driver_saw_without_tune(tmp_path: Path) -> None:
    from datetime import datetime, timezone

    from raycls.config import TrialConfig, load_experiment
    from raycls.results.provenance import GitState
    from raycls.results.row import TrialSeen, build_record

    space = tmp_path / "rows.yaml"
    space.write_text(
        "experiment: {name: rows}\nbase: {data: {name: digits}, train: {epochs: 3}}\n"
        "space:\n  train.lr: {type: loguniform, low: 1.0e-3, high: 1.0e-1}\n"
        "  model.width: {type: choice, values: [8, 16]}\n"
        "  train.nesterov: {type: choice, values: [true, false]}\n"
    )
    experiment = load_experiment(space)
    now = datetime.now(timezone.utc)
    history = [
        {"epoch": 1, "val_acc": 0.5, "restarts": 0},
        {"epoch": 2, "val_acc": 0.7, "restarts": 1, "device": "cpu"},
    ]
    seen = TrialSeen(
        "t1",
        "early_stopped",
        {"train.lr": 0.01, "model.width": 16, "train.nesterov": False},
        history=history,
        started_at=now,
        ended_at=now,
        num_failures=0,
    )
    record = build_record(experiment, seen, GitState(commit="abc", dirty=False))
    row = record.to_table().to_pylist()[0]
    assert row["score"] == 0.7 and row["epochs"] == 2 and row["max_epochs"] == 3 and row["restarts"] == 1
    assert row["device"] == "cpu" and row["model.width"] == 16 and row["train.nesterov"] is False
    types = record.to_table().schema
    assert types.field("model.width").type == pa.int64() and types.field("train.nesterov").type == pa.bool_()
    assert TrialConfig.from_json(row["config_json"]).train.lr == 0.01
    # Values that make no valid config still give a (failed) row, with the reason.
    bad = build_record(experiment, TrialSeen("t2", "failed", {"train.lr": -1.0, "model.width": 8}), GitState())
    assert bad.config_json is None and "train.lr" in bad.error


def test_evaluating_again_judges_the_constraints_again(tmp_path: Path) -> None:
    """A constraint on a held-out metric: the row's `feasible` follows the evaluation that replaced it."""
    from raycls.results.leaderboard import update_evaluation

    storage = str(tmp_path)
    rules = ["test_acc >= 0.9", "params <= 1000"]
    row = record("t1", "completed", 0.01, [0.5, 0.8], constraints=rules)
    row.evaluation = {"eval_split": "test", "eval_suite": "default", "metrics": {"test_acc": 0.85}}
    row.history[-1]["params"] = 500.0
    write_trial(storage, row)
    (first,) = read_leaderboard(storage, "exp").table.to_pylist()
    assert first["feasible"] is False and json.loads(first["constraints"]) == rules
    update_evaluation(storage, "exp", "t1", {"eval_split": "test", "eval_suite": "full", "metrics": {"test_acc": 0.93}})
    (again,) = read_leaderboard(storage, "exp").table.to_pylist()
    assert again["feasible"] is True and again["test_acc"] == 0.93 and again["eval_suite"] == "full"
    unconstrained = record("t2", "completed", 0.01, [0.5, 0.8])
    write_trial(storage, unconstrained)
    update_evaluation(storage, "exp", "t2", {"eval_split": "test", "metrics": {"test_acc": 0.1}})
    rows = {r["trial_id"]: r for r in read_leaderboard(storage, "exp").table.to_pylist()}
    assert rows["t2"]["feasible"] is None and rows["t2"]["constraints"] is None
