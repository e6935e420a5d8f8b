"""The trackers a search mirrors its trials to (`experiment.tracking`): W&B, MLflow, or both, behind the
one interface the trial ledger calls (start, log, finish, close)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from raycls.config.experiment import Experiment
from raycls.results.mlflow_log import MlflowWriter
from raycls.results.wandb_log import WandbWriter
from raycls.storage import ExperimentPaths


class Writer(Protocol):
    def start(self, trial_id: str, config: dict[str, Any]) -> None: ...
    def log(self, trial_id: str, metrics: dict[str, Any], step: int | None = None) -> None: ...
    def finish(
        self, trial_id: str, summary: dict[str, Any], *, failed: bool = False, evaluation: Path | None = None
    ) -> None: ...
    def close(self) -> None: ...


class Trackers:
    """Every call to each of the experiment's writers, in order (each runs its own background thread)."""

    def __init__(self, writers: list[Writer]):
        self.writers = writers

    def start(self, trial_id: str, config: dict[str, Any]) -> None:
        for writer in self.writers:
            writer.start(trial_id, config)

    def log(self, trial_id: str, metrics: dict[str, Any], step: int | None = None) -> None:
        for writer in self.writers:
            writer.log(trial_id, metrics, step)

    def finish(
        self, trial_id: str, summary: dict[str, Any], *, failed: bool = False, evaluation: Path | None = None
    ) -> None:
        for writer in self.writers:
            writer.finish(trial_id, summary, failed=failed, evaluation=evaluation)

    def close(self) -> None:
        for writer in self.writers:
            writer.close()


def open_trackers(experiment: Experiment, wandb_mode: str, folder: Path, storage: str) -> Trackers:
    """W&B (in `wandb_mode`; disabled when `tracking` leaves it out) and MLflow when `tracking` names it."""
    tracking = experiment.experiment.tracking
    writers: list[Writer] = [
        WandbWriter(
            experiment.wandb, wandb_mode if "wandb" in tracking else "disabled", folder, experiment=experiment.name
        )
    ]
    if "mlflow" in tracking:
        writers.append(MlflowWriter(experiment.mlflow, ExperimentPaths(storage, experiment.name)))
    return Trackers(writers)
