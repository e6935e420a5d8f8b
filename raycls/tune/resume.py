"""`raycls tune --resume` after a killed driver: every one of the experiment's N trials ends with one row.

Why this module exists (the mechanism, found by killing drivers in a loop): Tune writes its experiment state
(`experiment_state-*.json`, `search_gen_state-*.json`, `searcher-state-*.pkl`) to a local staging folder,
then copies the folder to the storage in a background thread with `pyarrow.fs.copy_files`, which truncates
and rewrites each file in place. Snapshots are taken at every trial checkpoint (every epoch), so a SIGKILL
often lands mid-copy and leaves the storage with empty or cut files. `Tuner.restore` then logs "Failed to
restore the run state" and *restarts the experiment* with whatever it half-restored: in one run of three a
6-trial search resumed into a single new trial and exited 0 with 3 rows.

What raycls does about it:
- `SnapshotKeeper`, a Tune callback, copies each complete snapshot from the staging folder into
  `<experiment>/.raycls/tune-snapshot/` (a temp folder, then a rename: never half a snapshot);
- `prepare_resume` reads Tune's newest snapshot in the storage; when it is not whole, it puts the kept copy
  back in its place (Tune then resumes every unfinished trial from its checkpoint). With no whole snapshot at
  all (a kill before the first one was kept) the experiment is rebuilt from raycls's own durable records:
  a new Tune run of the trials that have no row yet, continuing the same Optuna study;
- a trial that already has a row is never trained again (Tune may restore it as unfinished when it ended
  after the snapshot), and `reconcile_study` gives every Optuna trial the state of its row at the end:
  COMPLETE, PRUNED or FAIL; one that Tune lost with the driver (asked, never run to a row) is FAIL with the
  user attribute `raycls_lost`, so TPE's constant liar stops counting it as running.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import cloudpickle
import optuna
from optuna.trial import TrialState
from ray.tune import Callback
from ray.tune.experiment import Trial

from raycls.storage import TRIAL_CHECKPOINTS, aside_dir, kept_snapshot_dir

# Tune's snapshot files, one of each per driver session (the newest of each is what Tune restores).
SNAPSHOT_PATTERNS = ("experiment_state-*.json", "search_gen_state-*.json", "searcher-state-*.pkl")
# The Optuna user attribute that ties an Optuna trial to its Tune trial (and so to its leaderboard row).
TRIAL_ID_ATTR = "trial_id"
LOST_ATTR = "raycls_lost"
ROW_STATES = {"completed": TrialState.COMPLETE, "early_stopped": TrialState.PRUNED, "failed": TrialState.FAIL}


class ResumeMode(Enum):
    RESTORE = "restore"  # Tune's snapshot is whole (maybe repaired from the kept copy): Tuner.restore
    REBUILD = "rebuild"  # no whole snapshot: a new Tune run of the trials without a row
    START = "start"  # nothing of Tune's there: a new experiment


@dataclass(frozen=True)
class ResumePlan:
    mode: ResumeMode
    repaired: bool = False  # Tune's snapshot in the storage was broken and the kept copy replaced it
    note: str = ""


# ------------------------------------------------------------------------------------------- snapshots
def newest_snapshot(folder: Path) -> dict[str, Path] | None:
    """The newest file of each snapshot kind in `folder`, or None when a kind is missing."""
    found: dict[str, Path] = {}
    for pattern in SNAPSHOT_PATTERNS:
        files = sorted(p for p in folder.glob(pattern) if p.is_file())
        if not files:
            return None
        found[pattern] = files[-1]  # names end in the session's start time: the last sorts newest
    return found


def snapshot_problem(folder: Path) -> str | None:
    """Why Tune could not restore from `folder` (None when every newest file reads back whole)."""
    files = newest_snapshot(folder)
    if files is None:
        return f"{folder}: no complete set of {', '.join(SNAPSHOT_PATTERNS)}"
    for pattern, path in files.items():
        try:
            data = path.read_bytes()
            # The experiment state is JSON; the other two are pickles (Tune names one of them .json).
            json.loads(data) if pattern.startswith("experiment_state") else cloudpickle.loads(data)
        except Exception as err:  # empty, cut short, or not loadable: all mean Tune cannot use it
            return f"{path.name}: unreadable ({type(err).__name__}: {str(err)[:100] or 'empty'})"
    return None


def _copy_snapshot(files: dict[str, Path], dest: Path) -> None:
    """Copy one snapshot into `dest`, replacing it whole: a temp folder, then renames."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for path in files.values():
        shutil.copy2(path, tmp / path.name)
    old = dest.with_name(f"{dest.name}.old")
    if dest.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dest, old)  # a kill between these two renames leaves `.old`, which kept_snapshot reads
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)


def kept_snapshot(experiment_dir: Path) -> Path | None:
    """The newest whole snapshot raycls kept for this experiment, if any."""
    kept = kept_snapshot_dir(experiment_dir)
    for folder in (kept, kept.with_name(f"{kept.name}.old")):
        if folder.is_dir() and snapshot_problem(folder) is None:
            return folder
    return None


class SnapshotKeeper(Callback):
    """Keeps a whole copy of Tune's latest experiment snapshot under `<experiment>/.raycls/`.

    Tune calls every callback's `get_state` while it saves a snapshot, right after it has written the
    experiment state and the searcher state to its local staging folder: the moment those files are whole
    and belong together. The copy is made then; the callback itself has no state for Tune to save (None).
    """

    def __init__(self, experiment_dir: Path):
        self.experiment_dir = str(experiment_dir)
        self.staging: str | None = None

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        # Callbacks are not told where Tune stages its files; every trial's storage context knows.
        self.staging = trial.storage.experiment_driver_staging_path

    def get_state(self) -> dict | None:
        if self.staging is not None:
            files = newest_snapshot(Path(self.staging))
            if files is not None:
                _copy_snapshot(files, kept_snapshot_dir(Path(self.experiment_dir)))
        return None


def _clear_tune_snapshot(experiment_dir: Path, *, keep_as: str | None) -> None:
    """Remove Tune's snapshot files from the experiment folder; broken ones are moved aside (`keep_as`)
    for a post-mortem instead, under `.raycls/`, where Tune never looks."""
    aside = aside_dir(experiment_dir, keep_as) if keep_as else None
    for pattern in SNAPSHOT_PATTERNS:
        for path in experiment_dir.glob(pattern):
            if aside is None:
                path.unlink()
                continue
            aside.mkdir(parents=True, exist_ok=True)
            os.replace(path, aside / path.name)


def prepare_resume(experiment_dir: Path | None, *, can_restore: bool) -> ResumePlan:
    """Decide how to resume; put raycls's kept snapshot in place of Tune's when there is one.

    The kept copy is written at the same moment as Tune's staging snapshot, before Tune copies that to the
    storage, so it is never older than what the storage holds, and its files always belong together (the
    storage's may mix two snapshots when a kill lands between two file copies, each file whole).
    `experiment_dir` is the local experiment folder (None for object storage, whose objects appear whole:
    nothing to repair); `can_restore` is Tune's own `Tuner.can_restore`.
    """
    if experiment_dir is None:
        return ResumePlan(ResumeMode.RESTORE if can_restore else ResumeMode.START)
    problem = snapshot_problem(experiment_dir)
    broken = f"broken-{time.strftime('%Y%m%d-%H%M%S')}" if problem else None
    kept = kept_snapshot(experiment_dir)
    if kept is not None and (experiment_dir / "tuner.pkl").is_file():
        _clear_tune_snapshot(experiment_dir, keep_as=broken)
        for path in newest_snapshot(kept).values():  # type: ignore[union-attr]
            tmp = experiment_dir / f".{path.name}.tmp"
            shutil.copy2(path, tmp)
            os.replace(tmp, experiment_dir / path.name)
        restore_missing_checkpoints(experiment_dir)
        return ResumePlan(
            ResumeMode.RESTORE,
            repaired=problem is not None,
            note=f"{problem}: restored from the snapshot raycls kept" if problem else "",
        )
    if problem is None and can_restore:
        restore_missing_checkpoints(experiment_dir)
        return ResumePlan(ResumeMode.RESTORE)
    if not can_restore and newest_snapshot(experiment_dir) is None:
        return ResumePlan(ResumeMode.START)
    _clear_tune_snapshot(experiment_dir, keep_as=broken)
    return ResumePlan(
        ResumeMode.REBUILD, note=f"{problem}; no whole snapshot kept: running the trials that have no row"
    )


def restore_missing_checkpoints(experiment_dir: Path) -> list[str]:
    """Make every checkpoint an unfinished trial of the snapshot resumes from exist again.

    The snapshot is taken every so often, while Tune deletes a trial's older checkpoints (beyond
    `keep_checkpoints`) as newer ones arrive: a kill in between leaves a snapshot whose trial would resume
    from a deleted folder (Tune fails it: "Could not recover from checkpoint as it does not exist"). The
    newest whole checkpoint of that trial is copied in its place: the loop reads the epoch it resumes from
    out of the checkpoint itself, so the trial goes on from there. Returns the paths put back.
    """
    from ray.tune.experiment.trial import Trial
    from ray.tune.utils.serialization import TuneFunctionDecoder

    from raycls.train.state import is_whole

    files = newest_snapshot(experiment_dir)
    if files is None:
        return []
    # Our own experiment's snapshot, which Tune itself is about to load the same way.
    state = TuneFunctionDecoder(allow_cloudpickle=True).decode(files[SNAPSHOT_PATTERNS[0]].read_text())
    restored = []
    for trial_json, run_metadata in state["trial_data"]:
        trial = Trial.from_json_state(trial_json, stub=True)
        trial.restore_run_metadata(run_metadata)
        if trial.status in (Trial.TERMINATED, Trial.ERROR) or trial.checkpoint is None:
            continue
        wanted = Path(trial.checkpoint.path)
        wanted = experiment_dir / wanted.parent.name / wanted.name  # the experiment folder may have moved
        if is_whole(wanted):
            continue
        candidates = sorted(
            (p for p in wanted.parent.glob(TRIAL_CHECKPOINTS) if p.is_dir() and p != wanted), reverse=True
        )
        newest = next((p for p in candidates if is_whole(p)), None)
        if newest is None:  # nothing to resume from: the trial starts again (Tune will say so)
            continue
        tmp = wanted.with_name(f".{wanted.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(newest, tmp)
        shutil.rmtree(wanted, ignore_errors=True)
        os.replace(tmp, wanted)
        restored.append(str(wanted))
    return restored


# ----------------------------------------------------------------------------------------------- study
def reconcile_study(study: optuna.Study, rows: list[dict[str, Any]]) -> dict[str, int]:
    """Give every Optuna trial still RUNNING the state of its leaderboard row; FAIL (lost) without one.

    Called when no trial of the experiment runs any more. Returns how many trials were told what.
    """
    by_id = {row["trial_id"]: row for row in rows}
    told = {"from_row": 0, "lost": 0}
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        row = by_id.get(trial.user_attrs.get(TRIAL_ID_ATTR))
        if row is None:
            optuna.Trial(study, trial._trial_id).set_user_attr(LOST_ATTR, True)
            study.tell(trial.number, state=TrialState.FAIL)
            told["lost"] += 1
            continue
        state = ROW_STATES.get(row.get("status"), TrialState.FAIL)
        score = row.get("score")
        if state == TrialState.COMPLETE and isinstance(score, (int, float)):
            study.tell(trial.number, score)
        else:
            study.tell(trial.number, state=TrialState.FAIL if state == TrialState.COMPLETE else state)
        told["from_row"] += 1
    return told
