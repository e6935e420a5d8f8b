"""Leaderboard references -> checkpoint paths, resolved by the driver before any trial starts.

`phase.teacher: {from: arcface-cifar10, pick: best}` becomes the best completed trial's checkpoint path (and,
unless given, that trial's model section as `teacher_model`), so phases only ever see a path; so does
`init: {from: supcon-cifar10, pick: best}`, whose backbone weights a trial starts from.
"""

from __future__ import annotations

from typing import Any

from raycls.config.experiment import Experiment
from raycls.config.load import config_of_row
from raycls.config.schema import PhaseConfig, Reference, TeacherPhaseConfig
from raycls.errors import CheckpointError
from raycls.ranking import PickError, Ranking, row_of
from raycls.results.leaderboard import read_leaderboard


def pick_trial(storage: str, reference: Reference) -> dict[str, Any]:
    """The leaderboard row a reference names: the best completed trial by its score, or a trial id."""
    table = read_leaderboard(storage, reference.experiment).table
    rows = table.to_pylist()
    if not rows:
        raise CheckpointError(
            f"reference {{from: {reference.experiment}}}: no leaderboard for that experiment under {storage}"
        )
    try:
        what = f"reference {{from: {reference.experiment}, pick: {reference.pick}}}:"
        row = Ranking.of(rows[0]["metric"], rows[0]["mode"]).pick(rows, reference.pick, what=what)[0]
    except PickError as err:
        raise CheckpointError(str(err)) from None
    if not row.get("checkpoint"):
        raise CheckpointError(f"trial {reference.experiment}/{row['trial_id']} has no checkpoint")
    return row


def replay_row(storage: str, reference: str) -> dict[str, Any]:
    """The row `raycls train --trial EXPERIMENT/TRIAL_ID` replays: it must hold the trial's full config."""
    experiment, sep, trial_id = reference.rpartition("/")
    if not sep or not experiment or not trial_id:
        raise CheckpointError(f"--trial {reference!r}: expected EXPERIMENT/TRIAL_ID, e.g. quickstart/3f2a9c1e")
    rows = read_leaderboard(storage, experiment).table.to_pylist()
    if not rows:
        raise CheckpointError(f"--trial {reference}: no leaderboard for experiment {experiment!r} under {storage}")
    try:
        row = row_of(rows, trial_id, what=f"--trial {reference}:")
    except PickError as err:
        raise CheckpointError(str(err)) from None
    if not row.get("config_json"):
        raise CheckpointError(
            f"--trial {reference}: the row has no config_json (its sampled values were not a valid config)"
        )
    return row


def resolve_references(experiment: Experiment, storage: str) -> Experiment:
    """Every leaderboard reference of the base config (`init`, each distill teacher) -> a checkpoint path."""
    base = experiment.base
    update: dict[str, Any] = {}
    if isinstance(base.init, Reference):
        update["init"] = pick_trial(storage, base.init)["checkpoint"]
    if base.phases is None:
        update["phase"] = resolve_teacher(base.phase, storage)
    else:
        update["phases"] = [
            stage.model_copy(update={"phase": resolve_teacher(stage.phase, storage)}) for stage in base.phases
        ]
    # A `--set phase.teacher={from: ...}` is already in the base (and now resolved there); re-applying the
    # override to every trial would put the unresolved reference back.
    overrides = {k: v for k, v in experiment.overrides.items() if not (isinstance(v, dict) and "from" in v)}
    return experiment.model_copy(update={"base": base.model_copy(update=update), "overrides": overrides})


def resolve_teacher(phase: PhaseConfig, storage: str) -> PhaseConfig:
    if not isinstance(phase, TeacherPhaseConfig) or not isinstance(phase.teacher, Reference):
        return phase
    row = pick_trial(storage, phase.teacher)
    teacher_model, teacher_phase = phase.teacher_model, phase.teacher_phase
    if row.get("config_json"):
        # The teacher is built as it was trained: its architecture, and the phase (of a chain: the last
        # stage) whose heads give its logits.
        trained = config_of_row(row)
        stage = trained.stages[_checkpoint_stage(row.get("checkpoint"), len(trained.stages))]
        teacher_model = teacher_model or stage.model
        teacher_phase = teacher_phase or stage.phase
    return phase.model_copy(
        update={
            "teacher": row["checkpoint"],
            "teacher_model": teacher_model,
            "teacher_phase": teacher_phase,
            "teacher_trial": f"{phase.teacher.experiment}/{row['trial_id']}",
        }
    )


def _checkpoint_stage(uri: str | None, stages: int) -> int:
    """The chain stage the trial's best checkpoint holds: its last, unless the trial stopped before it."""
    if not uri:
        return stages - 1
    from raycls.errors import CheckpointError
    from raycls.train.evaluation import checkpoint_stage

    try:
        stage = checkpoint_stage(uri)
    except CheckpointError:  # missing: the teacher's loading reports it, naming the path
        return stages - 1
    return stages - 1 if stage is None else stage
