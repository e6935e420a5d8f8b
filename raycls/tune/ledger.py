"""The trial ledger: a Tune callback on the driver that writes every ended trial's leaderboard row and W&B run
(and, after a killed driver, the rows Optuna was told of but never written).

Callbacks are pickled into the experiment's `tuner.pkl` (Tune restores them on `--resume`), so they keep
only plain settings in their pickled state; open W&B runs and the screen are rebuilt after a restore.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune import Callback
from ray.tune.experiment import Trial

from raycls import names
from raycls.config.experiment import Experiment
from raycls.errors import last_error_line
from raycls.ranking import Ranking
from raycls.results.leaderboard import Status, read_evaluation, write_trial
from raycls.results.provenance import GitState
from raycls.results.row import TrialSeen, build_record
from raycls.results.tracking import open_trackers
from raycls.storage import (
    TRIAL_CHECKPOINTS,
    TRIAL_CONFIG_FILE,
    TUNE_RESULT_FILE,
    ExperimentPaths,
    is_local,
    tune_results,
)
from raycls.train.state import is_whole, read_metrics
from raycls.tune.resume import LOST_ATTR, ROW_STATES, TRIAL_ID_ATTR
from raycls.tune.searcher import stopped_early

# Tune's own bookkeeping keys: not metrics of ours, kept out of the history and W&B.
TUNE_KEYS = {
    "training_iteration",
    "time_this_iter_s",
    "time_total_s",
    "timestamp",
    "time_since_restore",
    "iterations_since_restore",
    "timesteps_total",
    "episodes_total",
    "done",
    "trial_id",
    "date",
    "hostname",
    "node_ip",
    "pid",
    "config",
    "experiment_tag",
    "checkpoint_dir_name",
    "should_checkpoint",
    "timesteps_since_restore",
    "experiment_id",
    "checkpoint_path",
}
# A multi-worker trial's checkpoint: Ray Train persists it itself, and its TuneReportCallback passes only its
# path on to Tune, in the result (Tune's on_checkpoint never sees it).
CHECKPOINT_PATH_KEY = "checkpoint_path"


def error_message(trial: Trial) -> str:
    """The last line of the trial's error (the exception and its message), not the whole traceback."""
    text = ""
    try:
        error = trial.get_error()
        text = str(error) if error is not None else ""
    except Exception:  # the error file may be gone or unpicklable
        pass
    if not text and trial.error_file and Path(trial.error_file).is_file():
        text = Path(trial.error_file).read_text(errors="replace")
    return last_error_line(text)


@dataclass
class TrialLog:
    started_at: datetime
    history: dict[int, dict[str, Any]] = field(default_factory=dict)  # epoch -> metrics (last report wins)
    best_checkpoint: str | None = None
    best_value: float | None = None
    last_result: dict[str, Any] = field(default_factory=dict)


class TrialLedger(Callback):
    """Writes every ended trial to the leaderboard (completed, early_stopped or failed) and to W&B / MLflow."""

    def __init__(self, experiment: Experiment, storage: str, experiment_dir: Path, wandb_mode: str, git: GitState):
        self.experiment_json = experiment.model_dump_json()
        self.storage = storage
        self.experiment_dir = str(experiment_dir)
        self.wandb_mode = wandb_mode
        self.git = git  # taken when the experiment started: a resumed driver records the same
        self._setup()

    def _setup(self) -> None:
        self.experiment = Experiment.model_validate_json(self.experiment_json)
        self.paths = ExperimentPaths(self.storage, self.experiment.name)
        self.logs: dict[str, TrialLog] = {}
        self.written: set[str] = self.paths.trial_ids()
        # W&B and/or MLflow (experiment.tracking), one interface
        self.wandb = open_trackers(self.experiment, self.wandb_mode, Path(self.experiment_dir), self.storage)

    def __getstate__(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("experiment_json", "storage", "experiment_dir", "wandb_mode", "git")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._setup()

    # ------------------------------------------------------------------------------------------ events
    def _log(self, trial: Trial) -> TrialLog:
        if trial.trial_id not in self.logs:
            self.logs[trial.trial_id] = TrialLog(started_at=datetime.now(timezone.utc))
        return self.logs[trial.trial_id]

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._log(trial)
        if trial.trial_id not in self.written:
            self.wandb.start(trial.trial_id, self._config_summary(trial))

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial, result: dict, **info: Any) -> None:
        log = self._log(trial)
        metrics = {k: v for k, v in result.items() if k not in TUNE_KEYS and not isinstance(v, dict)}
        epoch = int(metrics.get(names.EPOCH, len(log.history) + 1))
        log.history[epoch] = metrics
        log.last_result = metrics
        self.wandb.log(trial.trial_id, metrics, step=epoch)
        path = result.get(CHECKPOINT_PATH_KEY)
        if isinstance(path, str):
            self._offer_checkpoint(
                log, path if "://" in path or is_local(self.storage) else f"{self.storage.split('://')[0]}://{path}"
            )

    def on_checkpoint(self, iteration: int, trials: list[Trial], trial: Trial, checkpoint: Any, **info: Any) -> None:
        self._offer_checkpoint(self._log(trial), _uri(checkpoint))

    def _offer_checkpoint(self, log: TrialLog, uri: str) -> None:
        """The checkpoint just taken becomes the trial's best when its epoch is (ties: the later, as Ray keeps)."""
        ranking = Ranking.of(self.experiment.experiment.metric, self.experiment.experiment.mode)
        value = ranking.checkpoint_key(log.last_result)  # a chain's later stages first
        improved = value is not None and ranking.as_good(value, log.best_value)
        if improved or log.best_checkpoint is None:
            log.best_value = value if value is not None else log.best_value
            log.best_checkpoint = uri

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        log = self._log(trial)
        self.record(trial, "early_stopped" if stopped_early(log.last_result) else "completed")

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self.record(trial, "failed", error=error_message(trial))

    def on_experiment_end(self, trials: list[Trial], **info: Any) -> None:
        if self._search_end() is not None:
            # The search's own end (time budget, target) stops the running trials without on_trial_complete:
            # each that started gets its row here (one that was only queued never ran, and gets none).
            for trial in trials:
                if trial.trial_id in self.logs and trial.trial_id not in self.written and trial.status != Trial.ERROR:
                    last = self.logs[trial.trial_id].last_result
                    self.record(trial, "completed" if last and not stopped_early(last) else "early_stopped")
        self.wandb.close()

    # ------------------------------------------------------------------------------------------ rows
    def _history_on_disk(self, trial: Trial) -> dict[int, dict[str, Any]]:
        """Epochs reported before a driver restart: Tune keeps them in the trial's result.json."""
        try:
            return _epochs(tune_results(Path(trial.path))) if is_local(str(trial.path)) else {}
        except (OSError, AttributeError, TypeError):
            return {}

    def _config_written(self, trial: Trial) -> str | None:
        """The resolved config the trial wrote into its folder (None: it failed before, or cannot be read)."""
        try:
            uri = self.paths.trial_config(Path(trial.path).name)
            return self.paths.read_text(uri) if self.paths.exists(uri) else None
        except (OSError, AttributeError, TypeError):
            return None

    def _search_end(self) -> str | None:
        """Why the whole search ended early, when it did (raycls.tune.stop): the trials it cut say so."""
        from raycls.tune.stop import read_end

        end = read_end(Path(self.experiment_dir))
        return end.reason if end is not None else None

    def _config_summary(self, trial: Trial) -> dict[str, Any]:
        return {**dict(trial.config), "experiment": self.experiment.name, "trial_id": trial.trial_id}

    def record(self, trial: Trial, status: Status, *, error: str | None = None) -> None:
        if trial.trial_id in self.written:
            # A resumed driver can see a trial end twice (it ended after Tune's last snapshot of the
            # experiment): its row was written the first time, and is never written twice.
            return
        log = self._log(trial)
        merged = {**self._history_on_disk(trial), **log.history}
        seen = TrialSeen(
            trial_id=trial.trial_id,
            status=status,
            params=dict(trial.config),
            history=[merged[e] for e in sorted(merged)],
            started_at=log.started_at,
            ended_at=datetime.now(timezone.utc),
            num_failures=int(getattr(trial, "num_failures", 0) or 0),
            checkpoint=log.best_checkpoint,
            error=error,
            config_json=self._config_written(trial),
            ended_by=self._search_end() if status == "early_stopped" else None,
        )
        record = build_record(self.experiment, seen, self.git)
        record.evaluation = read_evaluation(self.storage, self.experiment.name, trial.trial_id)
        write_trial(self.storage, record)
        self.written.add(trial.trial_id)
        self.logs.pop(trial.trial_id, None)  # its epochs are in its files now: the driver keeps only its id
        row = {k: v for k, v in record.to_table().to_pylist()[0].items() if not isinstance(v, datetime)}
        self.wandb.finish(trial.trial_id, row, failed=status == "failed", evaluation=self._eval_folder(trial.trial_id))

    def _eval_folder(self, trial_id: str) -> Path | None:
        """The trial's evaluation folder, when it has one on this machine (trackers log its files)."""
        folder = self.paths.eval_dir(trial_id)
        return Path(folder) if is_local(folder) and Path(folder).is_dir() else None


def _epochs(reports: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Tune's reports by epoch, less Tune's own keys and nested results."""
    history: dict[int, dict[str, Any]] = {}
    for result in reports:
        if names.EPOCH in result:
            history[int(result[names.EPOCH])] = {
                k: v for k, v in result.items() if k not in TUNE_KEYS and not isinstance(v, dict)
            }
    return history


def _uri(checkpoint: Any) -> str:
    fs = checkpoint.filesystem
    scheme = getattr(fs, "type_name", "local")
    return checkpoint.path if scheme in ("local", "") else f"{scheme}://{checkpoint.path}"


# ------------------------------------------------------------------------------------ after a kill
# Optuna's closed states and the row each one stands for (ROW_STATES read the other way).
TOLD_STATUS: dict[TrialState, Status] = {state: status for status, state in ROW_STATES.items()}  # type: ignore[misc]


def record_told_trials(experiment: Experiment, paths: ExperimentPaths, study: optuna.Study, git: GitState) -> list[str]:
    """Write the row of every trial Optuna was told the outcome of, but whose row a killed driver never wrote.

    Tune tells its searcher that a trial ended before its callbacks hear of it, so a kill in between leaves
    the study with a COMPLETE / PRUNED / FAIL trial and the leaderboard without its row. The trial's Tune
    folder still holds what the row needs: its config (`params.json`), every epoch it reported
    (`result.json`), its checkpoints and its error. A rebuilt search counts these trials as done instead of
    training a replacement. Returns the trial ids written (none for object storage: no folder to read).
    """
    if paths.folder is None:
        return []
    written = paths.trial_ids()
    recorded = []
    for ot_trial in study.get_trials(deepcopy=False, states=tuple(TOLD_STATUS)):
        trial_id = ot_trial.user_attrs.get(TRIAL_ID_ATTR)
        if trial_id is None or trial_id in written or ot_trial.user_attrs.get(LOST_ATTR):
            continue
        # Tune names a trial's folder `<trainable>_<trial id>_<tag>_<date>`.
        folder = next((p for p in paths.folder.glob(f"*_{trial_id}_*") if (p / "params.json").is_file()), None)
        if folder is None:
            continue  # nothing to write the row from (not seen: Tune writes params.json as the trial starts)
        record = build_record(
            experiment, _seen_in_folder(experiment, folder, trial_id, TOLD_STATUS[ot_trial.state]), git
        )
        record.evaluation = read_evaluation(paths.storage, experiment.name, trial_id)
        write_trial(paths.storage, record)
        recorded.append(trial_id)
    return recorded


def _seen_in_folder(experiment: Experiment, folder: Path, trial_id: str, status: Status) -> TrialSeen:
    """A trial as its Tune folder tells it, for a row the driver did not live to write."""
    history = _epochs(tune_results(folder))
    results = folder / TUNE_RESULT_FILE
    ranking = Ranking.of(experiment.experiment.metric, experiment.experiment.mode)
    best: tuple[float | None, Path | None] = (None, None)
    for checkpoint in sorted(folder.glob(TRIAL_CHECKPOINTS)):
        value = ranking.checkpoint_key(read_metrics(checkpoint)) if is_whole(checkpoint) else None
        if value is not None and (best[1] is None or ranking.as_good(value, best[0])):
            best = (value, checkpoint)
    config = folder / TRIAL_CONFIG_FILE
    return TrialSeen(
        trial_id=trial_id,
        status=status,
        params=json.loads((folder / "params.json").read_text()),
        history=[history[e] for e in sorted(history)],
        started_at=datetime.fromtimestamp((folder / "params.json").stat().st_mtime, timezone.utc),
        ended_at=datetime.fromtimestamp((results if results.is_file() else folder).stat().st_mtime, timezone.utc),
        checkpoint=str(best[1]) if best[1] is not None else None,
        error=_folder_error(folder) if status == "failed" else None,
        config_json=config.read_text() if config.is_file() else None,
    )


def _folder_error(folder: Path) -> str:
    error = folder / "error.txt"  # Tune writes the trial's traceback there when it fails
    if error.is_file():
        return last_error_line(error.read_text(errors="replace"))
    return "unknown error: the driver was killed before it recorded this trial's error"


# ------------------------------------------------------------------------------------ bounded driver state
# What an ended trial's Tune object goes on holding: Tune's own keys the controller and a restore read again.
KEPT_TUNE_KEYS = frozenset({"done", "training_iteration", "time_total_s", "timestamp", "trial_id", "date"})


class EndedTrialTrimmer(Callback):
    """Keeps Tune's memory of an ended trial small, so a long search's driver does not grow with its trials.

    For each trial Tune holds, for the whole search, its last result (every metric, and its config again), a
    running max/min/avg/last-5/last-10 of every numeric metric with two deques each (`metric_analysis`),
    the metrics of each kept checkpoint, and JSON copies of all of it, re-serialised into every experiment
    snapshot. Once a trial has ended, its row (written by TrialLedger, earlier in the callback list) holds
    every metric and epoch, and Tune's scheduler and searcher have already been told its result (Tune calls
    them before the callbacks). So the ended trial keeps only what Tune reads again: the experiment's
    metric (and a chain's checkpoint key) and Tune's own bookkeeping. benchmarks/cluster_scaling.py
    measures the driver's memory per 1,000 trials with and without this.
    """

    def __init__(self, keep: frozenset[str]):
        self.keep = frozenset(keep) | KEPT_TUNE_KEYS

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self.trim(trial)

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self.trim(trial)

    def trim(self, trial: Trial) -> None:
        meta = trial.run_metadata
        meta.last_result = {k: v for k, v in meta.last_result.items() if k in self.keep}
        meta.metric_analysis = {k: v for k, v in meta.metric_analysis.items() if k in self.keep}
        meta.metric_n_steps = {}
        manager = meta.checkpoint_manager
        for result in getattr(manager, "_checkpoint_results", None) or []:
            result.metrics = {k: v for k, v in result.metrics.items() if k in self.keep}
        trial.invalidate_json_state()
