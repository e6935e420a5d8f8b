"""The Parquet leaderboard: one file per ended trial under `<storage>/<experiment>/leaderboard/`.

Each file is written to a temp name, then renamed to `<trial_id>.parquet`: concurrent trials and crashed
drivers never leave half a file, and writing the same trial twice (a resumed driver) replaces, never
duplicates, its row. Per-epoch metrics go beside it, to `history/<trial_id>.parquet`.
Queries read every file of the storage as one table; corrupt or foreign files are reported and skipped.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

import raycls
from raycls import names
from raycls.evaluate.summary import summarize
from raycls.results.arrays import to_pylist
from raycls.results.index import index_path, read_folder, write_table_atomic
from raycls.results.pareto import mark_pareto
from raycls.results.provenance import GitState
from raycls.storage import LEADERBOARD_DIR, ExperimentPaths, filesystem

Status = Literal["completed", "early_stopped", "failed"]
STATUSES: tuple[Status, ...] = ("completed", "early_stopped", "failed")
SCORED_STATUSES: tuple[Status, ...] = ("completed", "early_stopped")  # trials that ended with a score

# Columns every row has, in order, with their types. Metrics and sampled parameters follow.
FIXED_COLUMNS: list[tuple[str, pa.DataType]] = [
    ("experiment", pa.string()),
    ("trial_id", pa.string()),
    ("status", pa.string()),
    ("phase", pa.string()),
    ("metric", pa.string()),
    ("mode", pa.string()),
    ("objectives", pa.string()),  # multi-objective experiments: "test_acc:max,params:min" (raycls.results.pareto)
    ("score", pa.float64()),  # the experiment metric at the best epoch: comparable across experiments
    ("epochs", pa.int64()),
    ("best_epoch", pa.int64()),
    ("max_epochs", pa.int64()),
    ("started_at", pa.timestamp("us", tz="UTC")),
    ("ended_at", pa.timestamp("us", tz="UTC")),
    ("wall_s", pa.float64()),
    ("train_s", pa.float64()),  # seconds inside the training loop (sum of epoch_s)
    ("device", pa.string()),
    # The Ray node (id) that reported the trial's last epoch (rank 0's): where it ended, after any restart on
    # another node; each epoch's node is in the history.
    (names.NODE_ID, pa.string()),
    ("workers", pa.int64()),
    ("seed", pa.int64()),
    ("restarts", pa.int64()),
    # "scheduler" (ASHA: early_stopped), "patience" (train.early_stopping), or the search's end cutting the
    # trial short: "time_budget" (experiment.time_budget_s) or "target" (experiment.stop)
    ("stopped_by", pa.string()),
    ("checkpoint", pa.string()),
    ("teacher", pa.string()),  # distillation: EXPERIMENT/TRIAL_ID of a referenced teacher, or its path, or "ema"
    # experiment.constraints: whether the trial meets them all (null: no constraints, or a metric it never
    # reported); an infeasible trial is never "best" (raycls.ranking)
    ("feasible", pa.bool_()),
    # The constraints `feasible` judged (JSON list; null: none): a later `raycls eval` judges them again when
    # it replaces the evaluation columns a constraint may name (test_acc >= 0.9)
    ("constraints", pa.string()),
    # PBT / PB2: the trial it last cloned, at which of its epochs, and every exploit as JSON
    # ([{epoch, cloned, from_epoch, values}]); `schedule`: the perturbed values its weights trained under, from
    # epoch 0 ([{epoch, values}], ancestors' segments included), which `raycls train --trial` replays
    ("cloned_from", pa.string()),
    ("cloned_at", pa.int64()),
    ("lineage", pa.string()),
    ("schedule", pa.string()),
    ("config_json", pa.string()),
    ("git_commit", pa.string()),
    ("git_dirty", pa.bool_()),
    ("git_diff_sha", pa.string()),  # the search space's repository: see raycls.results.provenance
    ("raycls_version", pa.string()),
    ("error", pa.string()),
]
FIXED_NAMES = {name for name, _ in FIXED_COLUMNS}


@dataclass
class TrialRecord:
    """Everything known about one ended trial; `to_table` turns it into its one-row Parquet table."""

    experiment: str
    trial_id: str
    status: Status
    metric: str
    mode: str
    params: dict[str, Any]
    param_types: dict[str, pa.DataType]
    history: list[dict[str, Any]] = field(default_factory=list)
    phase: str = "supervised"
    max_epochs: int | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    device: str | None = None
    node_id: str | None = None
    workers: int = 1
    seed: int | None = None
    restarts: int = 0
    checkpoint: str | None = None
    teacher: str | None = None
    config_json: str | None = None
    error: str | None = None
    git: GitState = field(default_factory=GitState)
    # The held-out evaluation (`test_*` metrics, `eval_split`, `eval_suite`): see evaluation_columns.
    evaluation: dict[str, Any] = field(default_factory=dict)
    ended_by: str | None = None  # early_stopped by the end of the search (time_budget, target), not ASHA
    objectives: str | None = None  # see raycls.results.pareto
    constraints: list[str] = field(default_factory=list)  # experiment.constraints, judged in to_table
    lineage: list[dict[str, Any]] = field(default_factory=list)  # PBT exploits (names.LINEAGE)
    schedule: list[dict[str, Any]] = field(default_factory=list)  # PBT schedule (names.SCHEDULE)

    def best_row(self) -> dict[str, Any]:
        """Every metric at the best epoch. A trial with no epoch that counts (failed first, or cut before a
        chain's last stage) shows its last epoch's metrics, without a score: an earlier stage's value of the
        experiment metric is not the trial's."""
        summary = summarize(self.history, self.metric, self.mode)  # type: ignore[arg-type]
        if summary.best_epoch is not None:
            return summary.at_best
        last = self.history[-1] if self.history else {}
        return {k: v for k, v in last.items() if k not in (self.metric, names.EPOCH)}

    def stopped_by(self) -> str | None:
        if self.status == "early_stopped":
            return self.ended_by or "scheduler"
        last = self.history[-1] if self.history else {}
        return names.PATIENCE if self.status == "completed" and last.get(names.STOPPED_BY) == names.PATIENCE else None

    def to_table(self) -> pa.Table:
        # The experiment metric's best epoch, plus every chain stage's own summary (`supcon.val_knn_acc`),
        # which the epochs after that stage carry: the last epoch has them all.
        last = self.history[-1] if self.history else {}
        # The model's cost is measured once, with the last epoch: every row of a completed trial has it.
        trial_level = {k: v for k, v in last.items() if names.is_stage_metric(k) or k in names.COST_METRICS}
        best = {**self.best_row(), **trial_level}
        wall = (self.ended_at - self.started_at).total_seconds() if self.started_at and self.ended_at else None
        values: dict[str, Any] = {
            "experiment": self.experiment,
            "trial_id": self.trial_id,
            "status": self.status,
            "phase": self.phase,
            "metric": self.metric,
            "mode": self.mode,
            "objectives": self.objectives,
            "score": _float(best.get(self.metric)),
            "epochs": int(self.history[-1].get("epoch", len(self.history))) if self.history else 0,
            "best_epoch": int(best["epoch"]) if "epoch" in best else None,
            "max_epochs": self.max_epochs,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "wall_s": wall,
            "train_s": sum(_float(h.get("epoch_s")) or 0.0 for h in self.history),
            "device": self.device,
            names.NODE_ID: self.node_id,
            "workers": self.workers,
            "seed": self.seed,
            "restarts": self.restarts,
            "stopped_by": self.stopped_by(),
            "checkpoint": self.checkpoint,
            "teacher": self.teacher,
            "config_json": self.config_json,
            "git_commit": self.git.commit,
            "git_dirty": self.git.dirty,
            "git_diff_sha": self.git.diff_sha,
            "raycls_version": raycls.__version__,
            "error": self.error,
        }
        fields = list(FIXED_COLUMNS)
        # Every numeric metric at the best epoch, under its own name (val_acc, val_loss, ...).
        for key, value in best.items():
            # CHAIN_SCORE is bookkeeping for checkpoint retention, not a metric to compare.
            # The held-out columns come from the evaluation's own files (below), which `raycls eval` replaces.
            if (
                key not in FIXED_NAMES
                and key != names.CHAIN_SCORE
                and not is_evaluation_column(key)
                and isinstance(value, (int, float))
                and not isinstance(value, bool)
            ):
                fields.append((key, pa.float64()))
                values[key] = float(value)
        for key, value in evaluation_columns(self.evaluation).items():
            fields.append((key, pa.string() if isinstance(value, str) else pa.float64()))
            values[key] = value
        # One typed column per sampled parameter, named by its dotted path (unsampled conditionals: null).
        for key, dtype in self.param_types.items():
            fields.append((key, dtype))
            values[key] = self.params.get(key)
        values["feasible"] = judge(self.constraints, values)
        values["constraints"] = json.dumps(self.constraints) if self.constraints else None
        if self.lineage:
            values["cloned_from"], values["cloned_at"] = self.lineage[-1]["cloned"], int(self.lineage[-1]["epoch"])
        values["lineage"] = json.dumps(self.lineage) if self.lineage or self.schedule else None
        values["schedule"] = json.dumps(self.schedule) if self.schedule else None
        schema = pa.schema(fields)
        return pa.Table.from_pylist([{name: values.get(name) for name in schema.names}], schema=schema)

    def history_table(self) -> pa.Table:
        """One row per epoch with every metric any epoch reported (a chain's later stages and SWA's
        `val_*_swa` first appear after epoch 1; epochs without a metric hold null)."""
        rows = [
            {
                "experiment": self.experiment,
                "trial_id": self.trial_id,
                **{k: v for k, v in h.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)},
            }
            for h in self.history
        ]
        if not rows:
            return pa.table({"experiment": pa.array([], pa.string())})
        columns = list(dict.fromkeys(key for row in rows for key in row))  # the union, in first-seen order
        return pa.Table.from_pylist([{key: row.get(key) for key in columns} for row in rows])


def judge(constraints: Sequence[str], row: Mapping[str, Any]) -> bool | None:
    """A row's `feasible` column: `feasible` of its values; a failed trial's is null (it has nothing to judge)."""
    return None if row.get("status") == "failed" else feasible(constraints, row)


def feasible(constraints: Sequence[str], values: Mapping[str, Any]) -> bool | None:
    """Whether a row's values meet every constraint: False when one is broken, None when there are none or a
    metric is missing (and none is broken)."""
    from raycls.config.experiment import Constraint

    if not constraints:
        return None
    verdicts = []
    for text in constraints:
        constraint = Constraint.parse(text)
        value = _float(values.get(constraint.metric))
        verdicts.append(None if value is None else constraint.holds(value))
    if False in verdicts:
        return False
    return None if None in verdicts else True


def evaluation_columns(summary: Mapping[str, Any]) -> dict[str, Any]:
    """A suite's summary (raycls.evaluate.suite.run_suite: metrics, split, suite) as row columns."""
    if not summary:
        return {}
    columns: dict[str, Any] = {
        names.EVAL_SPLIT: summary.get(names.EVAL_SPLIT),
        names.EVAL_SUITE: summary.get(names.EVAL_SUITE),
    }
    for key, value in summary.get("metrics", {}).items():
        if key.startswith(names.EVAL_PREFIX) and isinstance(value, (int, float)) and not isinstance(value, bool):
            columns[key] = float(value)
    return columns


def is_evaluation_column(name: str) -> bool:
    return name.startswith(names.EVAL_PREFIX) or name in (names.EVAL_SPLIT, names.EVAL_SUITE)


def read_evaluation(storage: str, experiment: str, trial_id: str) -> dict[str, Any]:
    """The trial's evaluation summary (`eval/<trial_id>/metrics.json`), or {} when it was not evaluated."""
    paths = ExperimentPaths(storage, experiment)
    uri = paths.eval_metrics(trial_id)
    try:
        return json.loads(paths.read_text(uri)) if paths.exists(uri) else {}
    except (OSError, ValueError):  # unreadable: the row is written without evaluation columns
        return {}


def update_evaluation(storage: str, experiment: str, trial_id: str, summary: Mapping[str, Any]) -> str:
    """Replace the trial's evaluation columns in its row (atomically): evaluating again never adds a row or
    keeps a column of the previous evaluation."""
    paths = ExperimentPaths(storage, experiment)
    fs, path = paths.locate(paths.row(trial_id))
    table = pq.read_table(path, filesystem=fs)
    table = table.drop_columns([n for n in table.column_names if is_evaluation_column(n)])
    for key, value in evaluation_columns(summary).items():
        dtype = pa.string() if isinstance(value, str) or key in (names.EVAL_SPLIT, names.EVAL_SUITE) else pa.float64()
        table = table.append_column(pa.field(key, dtype), pa.array([value], dtype))
    return write_table_atomic(fs, path, _judged_again(table))


def _judged_again(row: pa.Table) -> pa.Table:
    """The one-row `row` with `feasible` judged again from its own `constraints` and its current values."""
    values = row.to_pylist()[0]
    if not values.get("constraints") or "feasible" not in row.column_names:
        return row
    verdict = judge(json.loads(values["constraints"]), values)
    return row.set_column(row.column_names.index("feasible"), "feasible", pa.array([verdict], pa.bool_()))


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


# --------------------------------------------------------------------------------------------- writing


def write_trial(storage: str, record: TrialRecord) -> str:
    """Write (or replace) the trial's leaderboard row and its per-epoch history; returns the row's path."""
    paths = ExperimentPaths(storage, record.experiment)
    if record.history:
        write_table_atomic(*paths.locate(paths.history(record.trial_id)), record.history_table())
    return write_table_atomic(*paths.locate(paths.row(record.trial_id)), record.to_table())


def written_trials(storage: str, experiment: str) -> set[str]:
    return ExperimentPaths(storage, experiment).trial_ids()


# ---------------------------------------------------------------------------------------------- reading
@dataclass
class ReadResult:
    table: pa.Table
    skipped: list[str] = field(default_factory=list)  # "path: why" for every file that was not read
    files: int = 0  # leaderboard (or history) files found, read or skipped
    opened: int = 0  # files this read opened: the rest came from the index (raycls.results.index)


def read_leaderboard(
    storage: str, experiment: str | None = None, *, kind: str = LEADERBOARD_DIR, rebuild_index: bool = False
) -> ReadResult:
    """All rows under `storage` (one experiment, or every experiment) as one table. Each experiment's files
    are read through its index (raycls.results.index): only new or rewritten files are opened."""
    fs, root = filesystem(storage)
    tables, skipped, files, opened = [], [], 0, 0
    for folder, experiment_root in _kind_folders(fs, root, experiment, kind):
        read = read_folder(
            fs,
            folder,
            index_path(experiment_root, kind),
            read_parquet,
            lambda t: _foreign(t, kind),
            _concat,
            rebuild=rebuild_index,
        )
        skipped += read.skipped
        files += read.files
        opened += read.read
        if read.table is not None:
            tables.append(read.table)
    if not tables:
        return ReadResult(pa.schema(FIXED_COLUMNS).empty_table(), skipped, files, opened)
    table = _concat(tables)
    if kind == LEADERBOARD_DIR:
        table = mark_pareto(table)  # the front depends on every row: computed on read, never stored
    return ReadResult(table, skipped, files, opened)


def _kind_folders(fs: pafs.FileSystem, root: str, experiment: str | None, kind: str) -> list[tuple[str, str]]:
    """(`kind` folder, experiment folder) of each experiment to read: `<root>/<experiment>/<kind>`, every
    experiment under the root, or the root itself when it is an experiment's folder."""
    if experiment is not None:
        return [(f"{root}/{experiment}/{kind}", f"{root}/{experiment}")]
    if fs.get_file_info(f"{root}/{kind}").type == pafs.FileType.Directory:
        return [(f"{root}/{kind}", root)]
    children = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    folders = [c.path for c in children if c.type == pafs.FileType.Directory and not c.base_name.startswith(".")]
    kinds = fs.get_file_info([f"{folder}/{kind}" for folder in folders])
    return sorted((info.path, folder) for info, folder in zip(kinds, folders) if info.type == pafs.FileType.Directory)


def _foreign(table: pa.Table, kind: str) -> str | None:
    if not {"experiment", "trial_id"} <= set(table.column_names):
        return f"not a raycls {kind} file (no experiment/trial_id columns)"
    return None


def _concat(tables: Sequence[pa.Table]) -> pa.Table:
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # a parameter changed type between runs: strings for clashing columns
        return pa.concat_tables([_stringify_clashes(t, tables) for t in tables], promote_options="permissive")


def read_parquet(fs: pafs.FileSystem, path: str) -> pa.Table:
    """One small Parquet file. ParquetFile without a thread pool reads a one-row file about 3x faster than
    pq.read_table (which plans a dataset scan per call): every leaderboard query and report reads thousands."""
    with fs.open_input_file(path) as handle:
        return pq.ParquetFile(handle).read(use_threads=False)


def _stringify_clashes(table: pa.Table, tables: Sequence[pa.Table]) -> pa.Table:
    types: dict[str, set[pa.DataType]] = {}
    for t in tables:
        for f in t.schema:
            if not pa.types.is_null(f.type):
                types.setdefault(f.name, set()).add(f.type)
    for name, seen in types.items():
        if len(seen) > 1 and name in table.column_names:
            i = table.column_names.index(name)
            table = table.set_column(i, name, table.column(name).cast(pa.string()))
    return table


def rows_as_dicts(table: pa.Table) -> list[dict[str, Any]]:
    return [{k: _jsonable(v) for k, v in row.items()} for row in to_pylist(table)]


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc).isoformat()
    return value


# Sampled parameters are named by their path in the trial config; a chain stage's metrics (`supcon.val_acc`)
# are dotted too, but start with a stage's name instead of a config section.
CONFIG_SECTIONS = ("seed", "data", "model", "phase", "phases", "init", "train", "augment", "eval")


def param_columns(table: pa.Table) -> list[str]:
    return [name for name in table.column_names if "." in name and name.split(".", 1)[0] in CONFIG_SECTIONS]


def stage_columns(table: pa.Table) -> list[str]:
    """A chain's per-stage metric columns worth a glance: each stage's validation accuracies."""
    return [
        n
        for n in table.column_names
        if "." in n and n not in param_columns(table) and n.endswith(("val_acc", "val_knn_acc"))
    ]


def trial_config(row: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(row["config_json"]) if row.get("config_json") else {}
