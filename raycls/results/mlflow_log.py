"""MLflow runs, one per trial, in one MLflow experiment per raycls experiment (`experiment.tracking: [mlflow]`).

The same shape as the W&B mirror (results/wandb_log.py): the Tune driver's trial ledger starts a run when a
trial starts, logs every epoch's metrics at its epoch, and finishes it with the leaderboard row's final and
held-out metrics, the evaluation's files, the resolved config and the best checkpoint. Calls go through
MlflowClient (no global active run: several trials' runs are open at once) on one background thread.

Where: the `mlflow.tracking_uri` when set (a server, sqlite:///..., databricks), else a local store in
`<storage>/mlruns/` (ExperimentPaths.mlflow_uri): SQLite for the runs and `artifacts/` for the files, the
local backend MLflow 3 recommends (it refuses its older plain-file store unless MLFLOW_ALLOW_FILE_STORE is
set). Read it with `mlflow ui --backend-store-uri sqlite:///<storage>/mlruns/mlflow.db`.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

from raycls.config.experiment import MlflowSection
from raycls.results.background import BackgroundTracker
from raycls.results.wandb_log import scrub
from raycls.storage import ExperimentPaths, is_local

TRIAL_TAG = "raycls.trial_id"
EXPERIMENT_TAG = "raycls.experiment"
STATUS_TAG = "raycls.status"
MAX_PARAM = 6000  # MLflow's longest parameter value


def tracking_uri(settings: MlflowSection, paths: ExperimentPaths) -> str:
    return settings.tracking_uri or paths.mlflow_uri()


def open_client(settings: MlflowSection, paths: ExperimentPaths):
    """An MlflowClient on the experiment's tracking URI, and the MLflow experiment id (created on first use;
    the local store gets its artefacts beside its database)."""
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(settings, paths)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    elif uri.startswith("file:") or "://" not in uri:
        # Asked for by name: MLflow 3 keeps its plain-file store behind this switch.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=uri)
    name = settings.experiment or paths.experiment
    found = client.get_experiment_by_name(name)
    if found is not None:
        return client, found.experiment_id
    artifacts = paths.mlflow_artifacts_uri() if settings.tracking_uri is None else None
    return client, client.create_experiment(name, artifact_location=artifacts, tags={EXPERIMENT_TAG: paths.experiment})


def find_run(client, experiment_id: str, trial_id: str):
    """The trial's run (a resumed experiment goes on logging to it); None when it has none."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{TRIAL_TAG}` = '{trial_id}'", max_results=1)
    return runs[0] if runs else None


# MLflow names hold alphanumerics, _ - . : / and spaces; raycls's also `@` (val_recall@1) and `>` (a chain).
NOT_IN_NAMES = re.compile(r"[^A-Za-z0-9_\-. :/]")


def key(name: str) -> str:
    """A raycls metric or parameter name as MLflow accepts it: `val_recall@1` -> `val_recall_at_1`."""
    return NOT_IN_NAMES.sub("_", name.replace("@", "_at_").replace(">", "-"))


def numbers(values: dict[str, Any]) -> dict[str, float]:
    """The values MLflow can plot, under names it accepts: finite ints and floats (booleans and NaN are left
    out)."""
    return {
        key(k): float(v)
        for k, v in values.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")
    }


class TrialRun:
    """The MLflow run of one trial."""

    def __init__(self, client, experiment_id: str, *, experiment: str, trial_id: str, config: dict[str, Any]):
        from mlflow.entities import Param

        self.client = client
        self.logged: set[str] = {key(k) for k in config}  # per-epoch metrics and params: not again at the end
        found = find_run(client, experiment_id, trial_id)
        if found is not None:
            self.run_id = found.info.run_id
            if found.info.status != "RUNNING":
                client.update_run(self.run_id, status="RUNNING")
            return
        run = client.create_run(
            experiment_id, run_name=trial_id, tags={TRIAL_TAG: trial_id, EXPERIMENT_TAG: experiment}
        )
        self.run_id = run.info.run_id
        params = [Param(key(k), str(v)[:MAX_PARAM]) for k, v in scrub(config).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
            client.log_batch(self.run_id, params=params[start : start + 100])

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        values = numbers(metrics)
        self.logged.update(values)
        batch = [Metric(k, v, stamp, step or 0) for k, v in values.items()]
        for start in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[start : start + 1000])

    def finish(self, summary: dict[str, Any], *, failed: bool, eval_dir: Path | None, log_checkpoint: bool) -> None:
        """The row's final and held-out metrics (those not logged per epoch nor parameters), its status and config, the
        evaluation's files (`eval/`) and the best checkpoint (`checkpoint/`)."""
        from mlflow.entities import Metric, RunTag

        stamp = int(time.time() * 1000)
        final = [Metric(k, v, stamp, 0) for k, v in numbers(summary).items() if k not in self.logged]
        tags = [RunTag(STATUS_TAG, str(summary.get("status") or ("failed" if failed else "completed")))]
        if summary.get("error"):
            tags.append(RunTag("raycls.error", str(summary["error"])[:5000]))
        for start in range(0, max(len(final), 1), 1000):
            self.client.log_batch(self.run_id, metrics=final[start : start + 1000], tags=tags if start == 0 else [])
        if summary.get("config_json"):
            self.client.log_text(self.run_id, summary["config_json"], "config.json")
        if eval_dir is not None and eval_dir.is_dir():
            self.client.log_artifacts(self.run_id, str(eval_dir), "eval")
        checkpoint = summary.get("checkpoint")
        if log_checkpoint and isinstance(checkpoint, str) and is_local(checkpoint):
            folder = Path(checkpoint.removeprefix("file://"))
            if folder.is_dir():
                self.client.log_artifacts(self.run_id, str(folder), "checkpoint")
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


class MlflowWriter(BackgroundTracker):
    """All MLflow calls of a search on one background thread, in order."""

    label = "MLflow"

    def __init__(self, settings: MlflowSection, paths: ExperimentPaths):
        self.settings, self.paths = settings, paths
        self._client: Any = None
        super().__init__()

    def _open(self):
        if self._client is None:  # the first run opens the store (creating a SQLite store takes seconds)
            self._client = open_client(self.settings, self.paths)
        return self._client

    def open_run(self, trial_id: str, config: dict[str, Any]) -> TrialRun:
        client, experiment_id = self._open()
        return TrialRun(client, experiment_id, experiment=self.paths.experiment, trial_id=trial_id, config=config)

    def finish_run(
        self, trial_id: str, run: TrialRun, summary: dict[str, Any], *, failed: bool, evaluation: Path | None
    ) -> None:
        run.finish(summary, failed=failed, eval_dir=evaluation, log_checkpoint=self.settings.log_checkpoint)


def log_after(settings: MlflowSection, paths: ExperimentPaths, records: list[dict[str, Any]]) -> int:
    """`after:`'s results (raycls.after) into each trial's run: its metrics as `after.<step>.<name>`, its
    files (the evaluation folder, the export, the predictions) as artefacts under `after/<step>/`. Returns
    the records logged (a trial without a run, e.g. from before tracking was on, is left out)."""
    from mlflow.entities import Metric

    client, experiment_id = open_client(settings, paths)
    logged = 0
    for record in records:
        run = find_run(client, experiment_id, record["trial_id"]) if record.get("trial_id") else None
        if run is None or record["status"] != "ok":
            continue
        stamp = int(time.time() * 1000)
        metrics = numbers({f"after.{record['step']}.{k}": v for k, v in (record.get("metrics") or {}).items()})
        client.log_batch(run.info.run_id, metrics=[Metric(k, v, stamp, 0) for k, v in metrics.items()])
        out = Path(str(record.get("out") or ""))
        target = out if out.is_dir() else out.parent if record["step"] == "export" else out
        if target.is_dir():
            client.log_artifacts(run.info.run_id, str(target), f"after/{record['step']}")
        elif target.is_file():
            client.log_artifact(run.info.run_id, str(target), f"after/{record['step']}")
        logged += 1
    return logged
