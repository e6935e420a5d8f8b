"""Where an experiment's files live: the one owner of the storage layout, its filesystem and "is this local".

    <storage>/<experiment>/
        leaderboard/<trial_id>.parquet   one row per ended trial (results/leaderboard.py)
        history/<trial_id>.parquet       the trial's per-epoch metrics
        space.yaml                       the search space as run (--set applied)
        train_runs/train-<trial_id>/     the Ray Train run of a multi-worker trial
        eval/<trial_id>/                 the held-out evaluation (metrics.json, tables, plots)
        export/<trial_id>/               raycls export: model.onnx, export.json
        report/report.html               raycls report (and its PNGs)
        serve/requests/                  raycls serve's request log
        after/after.json                 what `after:` did with the winner (raycls.after), step by step
        after/explore/                   its data report (data_report.json and PNGs)
        after/<trial_id>/                its predictions (predictions.parquet or .csv)
        .raycls/tune-snapshot/           a whole copy of Tune's latest snapshot (raycls.tune.resume)
        .raycls/search_end.json          why the last run ended early (raycls.tune.stop)
        .raycls/index/<kind>.parquet     the leaderboard's query index (raycls.results.index)
        optuna.journal                   the study (local storage; object storage keeps it in the cache)
        <trial folders>, tuner.pkl, experiment_state-*.json: Ray Tune's own
    <trial folder>/config.json           the trial's resolved TrialConfig
    <storage>/mlruns/                    MLflow's local store (mlflow.db, artifacts/) when tracking: [mlflow]

    `raycls train --out DIR` (RunPaths):
        config.json, metrics.json, checkpoints/{best,last}/, eval/

`storage` is a local path or a URI (s3://, gs://, hdfs://, file://); pyarrow's filesystems read and write
all of them alike, so nothing else in raycls parses a URI.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from fnmatch import fnmatch
from functools import cached_property
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from raycls.errors import StorageError
from raycls.files import cache_root

LEADERBOARD_DIR = "leaderboard"
HISTORY_DIR = "history"
ENSEMBLE_DIR = "ensembles"  # ensembles/<name>.parquet: `raycls eval --ensemble top:K` rows (kind ensemble)
SPACE_FILE = "space.yaml"
TRAIN_RUNS_DIR = "train_runs"
EVAL_DIR = "eval"  # eval/<trial_id>/: the held-out evaluation of the trial's best weights
RAYCLS_DIR = ".raycls"
TRIAL_CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"  # a `raycls train --out` run's summary and history; an evaluation's metrics
EXPORT_DIR = "export"
REPORT_DIR = "report"
REPORT_FILE = "report.html"
SERVE_LOG_DIR = "serve/requests"
AFTER_DIR = "after"
AFTER_FILE = "after.json"
EXPLORE_DIR = "explore"
MLRUNS_DIR = "mlruns"  # MLflow's local store, shared by the storage's experiments
MLFLOW_DB = "mlflow.db"
MLFLOW_ARTIFACTS = "artifacts"
JOURNAL_FILE = "optuna.journal"
END_FILE = "search_end.json"
SNAPSHOT_DIR = "tune-snapshot"
INDEX_DIR = f"{RAYCLS_DIR}/index"
CHECKPOINTS_DIR = "checkpoints"
BEST, LAST = "best", "last"
# A trial's kept checkpoints, side by side in its folder: Tune's `checkpoint_000003`, Ray Train's
# `checkpoint_2026-12-02_20-41-07.123456`; both sort oldest first.
TRIAL_CHECKPOINTS = "checkpoint_*"
TUNE_RESULT_FILE = "result.json"  # in a trial folder: Tune's reports, one JSON object per line


def tune_results(trial_folder: Path) -> list[dict]:
    """The reports Tune has written to a trial folder's result.json, oldest first ([] before the first). A
    line still being written, or cut short by a killed driver, is skipped."""
    path = trial_folder / TUNE_RESULT_FILE
    if not path.is_file():
        return []
    found = []
    for line in path.read_text(errors="replace").splitlines():
        if line.strip().endswith("}"):
            try:
                found.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return found


def journal_file(state_dir: Path) -> Path:
    """The Optuna study of the experiment whose local state folder is `state_dir` (ExperimentPaths.state_dir)."""
    return state_dir / JOURNAL_FILE


def end_file(state_dir: Path) -> Path:
    return state_dir / RAYCLS_DIR / END_FILE


def kept_snapshot_dir(experiment_dir: Path) -> Path:
    return experiment_dir / RAYCLS_DIR / SNAPSHOT_DIR


def aside_dir(experiment_dir: Path, name: str) -> Path:
    """Where broken Tune snapshot files are moved for a post-mortem (Tune never looks there)."""
    return experiment_dir / RAYCLS_DIR / name


def sibling_checkpoints(checkpoint: str) -> list[str]:
    """Every checkpoint kept beside `checkpoint` (a URI or local path) in its trial's folder, `checkpoint`
    included, oldest first: the snapshots a trial's `keep_checkpoints` left."""
    fs, path = filesystem(checkpoint)
    folder, _, _ = path.rstrip("/").rpartition("/")
    found = fs.get_file_info(pafs.FileSelector(folder))
    kept = sorted(
        i.base_name for i in found if i.type == pafs.FileType.Directory and fnmatch(i.base_name, TRIAL_CHECKPOINTS)
    )
    base = checkpoint.rstrip("/").rpartition("/")[0]
    return [f"{base}/{name}" for name in kept]


def index_file(experiment_root: str, kind: str) -> str:
    return f"{experiment_root}/{INDEX_DIR}/{kind}.parquet"


@dataclass(frozen=True)
class RunPaths:
    """The files of one `raycls train --out DIR` run."""

    out: Path

    @property
    def config(self) -> Path:
        return self.out / TRIAL_CONFIG_FILE

    @property
    def metrics(self) -> Path:
        return self.out / METRICS_FILE

    @property
    def eval_dir(self) -> Path:
        return self.out.absolute() / EVAL_DIR

    def checkpoint(self, which: str) -> Path:
        """`best` or `last`."""
        return self.out / CHECKPOINTS_DIR / which


def is_local(storage: str) -> bool:
    """A path on this machine (or a file:// URI): rename is atomic there, and Tune's files can be read."""
    return "://" not in storage or storage.startswith("file://")


def absolute(storage: str) -> str:
    """Local paths made absolute (Ray's workers run elsewhere); URIs as given."""
    return str(Path(storage).expanduser().absolute()) if "://" not in storage else storage


def filesystem(storage: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it: local paths, s3://, gs://, hdfs:// alike."""
    storage = absolute(storage)
    try:
        return pafs.FileSystem.from_uri(storage)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as err:
        raise StorageError(f"storage {storage!r}: {err}") from None


@dataclass(frozen=True)
class ExperimentPaths:
    """The files of one experiment under one storage. Paths are URIs (or absolute local paths)."""

    storage: str
    experiment: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "storage", absolute(self.storage).rstrip("/"))

    @property
    def local(self) -> bool:
        return is_local(self.storage)

    @property
    def root(self) -> str:
        """What Ray Tune calls the experiment's path: `<storage>/<experiment>`."""
        return f"{self.storage}/{self.experiment}"

    @property
    def folder(self) -> Path | None:
        """The experiment folder on this machine; None for object storage."""
        return Path(self.root.removeprefix("file://")) if self.local else None

    @property
    def state_dir(self) -> Path:
        """Where files that need a local filesystem go (Optuna journal, offline W&B runs)."""
        if self.folder is not None:
            return self.folder
        return cache_root() / "experiments" / self.experiment

    def leaderboard_dir(self) -> str:
        return f"{self.root}/{LEADERBOARD_DIR}"

    def row(self, trial_id: str) -> str:
        return f"{self.root}/{LEADERBOARD_DIR}/{trial_id}.parquet"

    def ensemble_row(self, name: str) -> str:
        return f"{self.root}/{ENSEMBLE_DIR}/{name}.parquet"

    def history(self, trial_id: str) -> str:
        return f"{self.root}/{HISTORY_DIR}/{trial_id}.parquet"

    def space_file(self) -> str:
        return f"{self.root}/{SPACE_FILE}"

    def trial_config(self, trial_dirname: str) -> str:
        """The resolved TrialConfig of the trial whose Tune folder is `trial_dirname`."""
        return f"{self.root}/{trial_dirname}/{TRIAL_CONFIG_FILE}"

    def eval_dir(self, trial_id: str) -> str:
        return f"{self.root}/{EVAL_DIR}/{trial_id}"

    def eval_metrics(self, trial_id: str) -> str:
        return f"{self.eval_dir(trial_id)}/{METRICS_FILE}"

    def train_runs(self) -> str:
        return f"{self.root}/{TRAIN_RUNS_DIR}"

    def raycls_dir(self) -> Path | None:
        return self.folder / RAYCLS_DIR if self.folder is not None else None

    def export_dir(self, trial_id: str) -> str:
        return f"{self.root}/{EXPORT_DIR}/{trial_id}"

    def report_file(self) -> Path:
        """Local (object storage: under the cache), so that a browser and kaleido can open it."""
        return (self.folder or self.state_dir) / REPORT_DIR / REPORT_FILE

    def serve_log_dir(self) -> Path:
        return (self.folder or self.state_dir) / SERVE_LOG_DIR

    def after_dir(self) -> Path:
        """What `after:` wrote (local, as the report reads it; object storage: under the cache)."""
        return (self.folder or self.state_dir) / AFTER_DIR

    def after_file(self) -> Path:
        return self.after_dir() / AFTER_FILE

    def after_explore_dir(self) -> Path:
        return self.after_dir() / EXPLORE_DIR

    def after_trial_dir(self, trial_id: str) -> Path:
        return self.after_dir() / trial_id

    def local_export_dir(self, trial_id: str) -> Path:
        """Where an export is written: the experiment's export folder, or under the cache for object storage
        (onnxruntime and the quantizer write local files)."""
        return Path(self.export_dir(trial_id)) if self.folder is not None else self.state_dir / EXPORT_DIR / trial_id

    def mlruns_dir(self) -> Path:
        """MLflow's local store of the storage (all its experiments): mlflow.db and artifacts/."""
        base = Path(self.storage.removeprefix("file://")) if self.local else self.state_dir.parent.parent
        return base / MLRUNS_DIR

    def mlflow_uri(self) -> str:
        """The default MLflow tracking URI: SQLite in mlruns/ (MLflow 3 refuses its plain file store unless
        told to; SQLite is the local backend it recommends)."""
        return f"sqlite:///{self.mlruns_dir() / MLFLOW_DB}"

    def mlflow_artifacts_uri(self) -> str:
        return (self.mlruns_dir() / MLFLOW_ARTIFACTS).as_uri()

    # ------------------------------------------------------------------------------------------- access
    @cached_property
    def _filesystem(self) -> tuple[pafs.FileSystem, str]:
        # Made once per ExperimentPaths: an object store's filesystem resolves credentials when it is made.
        return filesystem(self.storage)

    def locate(self, uri: str) -> tuple[pafs.FileSystem, str]:
        """The filesystem and the path inside it of a URI under this storage (any other URI: its own)."""
        if not uri.startswith(self.storage):
            return filesystem(uri)
        fs, base = self._filesystem
        return fs, base.rstrip("/") + uri[len(self.storage) :]

    def exists(self, uri: str) -> bool:
        fs, path = self.locate(uri)
        return fs.get_file_info(path).is_file

    def read_text(self, uri: str) -> str:
        fs, path = self.locate(uri)
        with fs.open_input_stream(path) as stream:
            return stream.read().decode(errors="replace")

    def write_text(self, uri: str, text: str) -> str:
        """Whole or not at all: a temp file then a rename locally; object stores write whole objects."""
        if is_local(uri):
            from raycls.files import write_text_atomic

            return str(write_text_atomic(uri.removeprefix("file://"), text))
        fs, path = self.locate(uri)
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(path) as stream:
            stream.write(text.encode())
        return uri

    def trial_ids(self) -> set[str]:
        """Trials that have a leaderboard row."""
        fs, path = self.locate(self.leaderboard_dir())
        selector = pafs.FileSelector(path, allow_not_found=True)
        return {Path(info.path).stem for info in fs.get_file_info(selector) if info.path.endswith(".parquet")}
