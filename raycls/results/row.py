"""A trial's leaderboard row from what the driver saw of it: a pure function, testable without Tune.

`raycls.tune.ledger.TrialLedger` collects a `TrialSeen` from Tune's events and hands it here; the row's
columns (parameter types, teacher, restarts, phase, epochs) are decided in this one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pyarrow as pa

from raycls import names
from raycls.config.experiment import Experiment
from raycls.config.load import resolve_trial
from raycls.config.schema import TeacherPhaseConfig, TrialConfig
from raycls.errors import RayclsError
from raycls.results.leaderboard import Status, TrialRecord
from raycls.results.pareto import format_objectives
from raycls.results.provenance import GitState


@dataclass
class TrialSeen:
    """One ended trial as the driver saw it."""

    trial_id: str
    status: Status
    params: dict[str, Any]  # the sampled values (Tune's trial.config)
    history: list[dict[str, Any]] = field(default_factory=list)  # per-epoch metrics, in epoch order
    started_at: datetime | None = None
    ended_at: datetime | None = None
    num_failures: int = 0  # Tune's retries of the trial
    checkpoint: str | None = None  # its best checkpoint's URI
    error: str | None = None
    config_json: str | None = None  # the resolved TrialConfig the trial wrote; None: resolved here
    # An early-stopped trial cut by the end of the whole search ("time_budget", "target"), not by ASHA.
    ended_by: str | None = None


def param_types(experiment: Experiment) -> dict[str, pa.DataType]:
    """The Parquet type of each sampled parameter's column (a `--set` pins a parameter: no column)."""
    return {
        path: pa.type_for_alias(param.column_type())
        for path, param in experiment.space.params.items()
        if path not in experiment.overrides
    }


def build_record(experiment: Experiment, seen: TrialSeen, git: GitState) -> TrialRecord:
    section = experiment.experiment
    types = param_types(experiment)
    error = seen.error
    try:
        sampled = names.sampled_values(seen.params)
        config = TrialConfig.from_json(seen.config_json) if seen.config_json else resolve_trial(experiment, sampled)
        config_json, seed, phase = config.to_json(), config.seed, config.chain
        max_epochs, teacher = config.total_epochs, teacher_of(config)
    except RayclsError as err:  # the sampled values do not make a valid config: still a failed row
        config_json, seed, phase, max_epochs, teacher = None, experiment.base.seed, experiment.base.chain, None, None
        error = error or str(err)
    last = seen.history[-1] if seen.history else {}
    return TrialRecord(
        experiment=experiment.name,
        trial_id=seen.trial_id,
        status=seen.status,
        metric=section.metric,
        mode=section.mode,
        params={k: v for k, v in names.sampled_values(seen.params).items() if k in types},
        param_types=types,
        history=seen.history,
        phase=phase,
        max_epochs=max_epochs,
        started_at=seen.started_at,
        ended_at=seen.ended_at,
        device=str(last[names.DEVICE]) if last.get(names.DEVICE) else None,
        node_id=str(last[names.NODE_ID]) if last.get(names.NODE_ID) else None,
        workers=section.resources.workers,
        seed=seed,
        restarts=count_restarts(seen.history, seen.num_failures, failed=seen.status == "failed"),
        checkpoint=seen.checkpoint,
        teacher=teacher,
        config_json=config_json,
        error=error,
        git=git,
        ended_by=seen.ended_by,
        objectives=format_objectives([(o.metric, o.mode) for o in section.objectives]),
        constraints=list(section.constraints),
        lineage=list(seen.params.get(names.LINEAGE) or []),
        schedule=list(seen.params.get(names.SCHEDULE) or []),
    )


def count_restarts(history: list[dict[str, Any]], num_failures: int, *, failed: bool) -> int:
    """How many times the trial started again: the count its workers report (every start from a checkpoint,
    Ray Train's worker-group restarts included) or Tune's retries (`num_failures`, of which the last one of
    a failed trial was not followed by a retry), whichever saw more."""
    reported = max(
        (int(h[names.RESTARTS]) for h in history if isinstance(h.get(names.RESTARTS), (int, float))), default=0
    )
    return max(reported, num_failures - 1 if failed else num_failures, 0)


def teacher_of(config: TrialConfig) -> str | None:
    """What a distilled trial (or chain stage) learned from: the referenced trial, the checkpoint path, or "ema"."""
    for stage in config.stages:
        phase = stage.phase
        if isinstance(phase, TeacherPhaseConfig):
            if phase.teacher_trial or phase.teacher:
                return phase.teacher_trial or str(phase.teacher)
            # No checkpoint: a pretrained teacher_model (token_distill's DINOv2), or distill's EMA of the student.
            return phase.teacher_model.name if phase.teacher_model and phase.teacher_model.pretrained else "ema"
    return None
