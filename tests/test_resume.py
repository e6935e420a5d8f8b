"""The parts of `--resume` that need no Ray: reading Tune's snapshot, repairing it from the kept copy, and
giving Optuna's trials their rows' states. The kill-and-resume runs themselves are in test_faults.py."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import optuna
from optuna.trial import TrialState

from raycls.storage import kept_snapshot_dir
from raycls.tune.resume import (
    LOST_ATTR,
    TRIAL_ID_ATTR,
    ResumeMode,
    prepare_resume,
    reconcile_study,
    snapshot_problem,
)


def write_snapshot(folder: Path, stamp: str, *, trials: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"experiment_state-{stamp}.json").write_text(json.dumps({"trial_data": [], "trials": trials}))
    (folder / f"search_gen_state-{stamp}.json").write_bytes(pickle.dumps({"counter": trials}))
    (folder / f"searcher-state-{stamp}.pkl").write_bytes(pickle.dumps({"trials": trials}))


def test_a_snapshot_cut_short_is_a_problem(tmp_path: Path) -> None:
    write_snapshot(tmp_path, "2026-01-01_00-00-00", trials=2)
    assert snapshot_problem(tmp_path) is None
    (tmp_path / "searcher-state-2026-01-01_00-00-00.pkl").write_bytes(b"\x80\x05\x95")  # a copy cut short
    assert "searcher-state" in snapshot_problem(tmp_path)
    (tmp_path / "experiment_state-2026-01-01_00-00-00.json").write_text("")
    assert "experiment_state" in snapshot_problem(tmp_path)


def test_the_kept_snapshot_replaces_a_broken_one(tmp_path: Path) -> None:
    (tmp_path / "tuner.pkl").write_bytes(b"tuner")
    write_snapshot(tmp_path, "2026-01-01_00-00-00", trials=3)
    write_snapshot(kept_snapshot_dir(tmp_path), "2026-01-01_00-00-00", trials=4)  # kept at the newer snapshot
    (tmp_path / "experiment_state-2026-01-01_00-00-00.json").write_text("")  # the kill emptied Tune's copy
    plan = prepare_resume(tmp_path, can_restore=True)
    assert plan.mode is ResumeMode.RESTORE and plan.repaired
    assert json.loads((tmp_path / "experiment_state-2026-01-01_00-00-00.json").read_text())["trials"] == 4
    # The broken file is kept for a post-mortem where Tune never looks.
    (broken,) = (tmp_path / ".raycls").glob("broken-*")
    assert (broken / "experiment_state-2026-01-01_00-00-00.json").read_text() == ""


def test_without_any_whole_snapshot_the_experiment_is_rebuilt(tmp_path: Path) -> None:
    (tmp_path / "tuner.pkl").write_bytes(b"tuner")
    write_snapshot(tmp_path, "2026-01-01_00-00-00", trials=3)
    (tmp_path / "search_gen_state-2026-01-01_00-00-00.json").write_bytes(b"")
    assert prepare_resume(tmp_path, can_restore=True).mode is ResumeMode.REBUILD
    assert not list(tmp_path.glob("*state-*"))  # out of Tune's way: the new run writes its own


def test_nothing_there_starts_the_experiment(tmp_path: Path) -> None:
    assert prepare_resume(tmp_path, can_restore=False).mode is ResumeMode.START


def test_reconcile_gives_optuna_trials_their_rows_states(tmp_path: Path) -> None:
    study = optuna.create_study(direction="maximize")
    asked = {name: study.ask() for name in ("done", "stopped", "broke", "told", "lost")}
    for name, trial in asked.items():
        trial.set_user_attr(TRIAL_ID_ATTR, name)
        trial.report(0.5, 1)
    study.tell(asked["told"], 0.7)  # told before the kill: left as it is
    rows = [
        {"trial_id": "done", "status": "completed", "score": 0.9},
        {"trial_id": "stopped", "status": "early_stopped", "score": 0.4},
        {"trial_id": "broke", "status": "failed", "score": None},
        {"trial_id": "told", "status": "completed", "score": 0.7},
    ]
    told = reconcile_study(study, rows)
    states = {t.user_attrs[TRIAL_ID_ATTR]: t for t in study.trials}
    assert states["done"].state == TrialState.COMPLETE and states["done"].value == 0.9
    assert states["stopped"].state == TrialState.PRUNED
    assert states["broke"].state == TrialState.FAIL and not states["broke"].user_attrs.get(LOST_ATTR)
    assert states["told"].state == TrialState.COMPLETE and states["told"].value == 0.7
    assert states["lost"].state == TrialState.FAIL and states["lost"].user_attrs[LOST_ATTR] is True
    assert told == {"from_row": 3, "lost": 1}
    assert reconcile_study(study, rows) == {"from_row": 0, "lost": 0}  # nothing RUNNING is left


def test_a_trial_optuna_closed_before_the_kill_may_report_again(tmp_path: Path) -> None:
    """The killed driver told Optuna a trial's end but wrote no row; Tune's older snapshot restores the trial
    as running, and it reports its last epoch again. Optuna refuses values for a finished trial: the
    searcher must let the result pass instead of ending the resumed search."""
    from raycls.config import load_experiment
    from raycls.tune.searcher import create_searcher

    space = tmp_path / "told.yaml"
    space.write_text(
        "experiment: {name: told}\nbase: {data: {name: digits}}\n"
        "space: {train.lr: {type: loguniform, low: 1.0e-3, high: 1.0e-1}}\n"
    )
    searcher = create_searcher(load_experiment(space), tmp_path, None)
    assert searcher.suggest("t1") is not None
    result = {"val_acc": 0.8, "epoch": 2, "max_epochs": 2, "training_iteration": 2}
    searcher.on_trial_result("t1", {**result, "val_acc": 0.7, "epoch": 1, "training_iteration": 1})
    searcher._ot_study.tell(searcher._ot_trials["t1"], 0.8)  # what the killed driver did
    searcher.on_trial_result("t1", result)  # raised UpdateFinishedTrialError
    searcher.on_trial_complete("t1", result)
    (trial,) = searcher._ot_study.trials
    assert trial.state == TrialState.COMPLETE and trial.value == 0.8 and trial.intermediate_values == {1: 0.7}


def test_a_second_run_without_resume_says_it_adds_to_the_experiment(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raycls.storage import ExperimentPaths
    from raycls.tune.driver import TuneOptions, _resume_plan

    paths = ExperimentPaths(str(tmp_path), "again")
    fresh = _resume_plan(TuneOptions(storage=str(tmp_path)), paths)
    assert fresh.mode is ResumeMode.START and fresh.note == ""  # a first run says nothing
    board = Path(paths.leaderboard_dir())
    board.mkdir(parents=True)
    for trial in ("t1", "t2"):
        pq.write_table(pa.table({"trial_id": [trial]}), board / f"{trial}.parquet")
    second = _resume_plan(TuneOptions(storage=str(tmp_path)), paths)
    assert second.mode is ResumeMode.START and "already has 2 trial row(s)" in second.note
    assert "--resume" in second.note
