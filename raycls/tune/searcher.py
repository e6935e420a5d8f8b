"""Optuna search for Ray Tune: the YAML space as a define-by-run function, a persistent study, and
early-stopped trials told to Optuna as PRUNED.

Ray's OptunaSearch tells Optuna a trial that ASHA stopped as COMPLETE with its early-rung score, so TPE
learns from 2-epoch scores as if they were final. Here such trials are PRUNED (their per-epoch values were
already reported as intermediate values), and failed trials are FAIL even when they reported some epochs.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from raycls.config.experiment import Experiment
from raycls.config.space import Space, suggest
from raycls.evaluate import names
from raycls.search import SAMPLERS
from raycls.tune.resume import TRIAL_ID_ATTR

class SpaceFunction:
    """The define-by-run function (picklable, for Tune's searcher checkpoints). No computation inside."""

    def __init__(self, space: Space, fixed: dict[str, Any]):
        self.space_json = space.model_dump_json()
        self.fixed = fixed
        self._space: Space | None = None

    def __call__(self, trial: optuna.Trial) -> None:
        if self._space is None:
            self._space = Space.model_validate_json(self.space_json)
        suggest(trial, self._space, fixed=self.fixed)

    def __getstate__(self) -> dict[str, Any]:
        return {"space_json": self.space_json, "fixed": self.fixed, "_space": None}


def stopped_early(result: dict[str, Any] | None) -> bool:
    """Whether the trial scheduler cut the trial: it ended before its last epoch, and not by its own early
    stopping (train.early_stopping ends a trial early, and completed)."""
    if not result or names.EPOCH not in result or names.MAX_EPOCHS not in result:
        return False
    return result[names.EPOCH] < result[names.MAX_EPOCHS] and result.get(names.STOPPED_BY) != names.PATIENCE


def journal_path(experiment_dir: Path) -> Path:
    return experiment_dir / "optuna.journal"


def open_study_storage(path: Path) -> optuna.storages.BaseStorage:
    """A journal file: append-only, safe against a killed driver, readable by optuna-dashboard."""
    from optuna.storages.journal import JournalFileBackend

    path.parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


class RayclsOptunaSearch(OptunaSearch):
    def __init__(self, *args: Any, warm_start_journal: Path | None = None, **kwargs: Any):
        # Set before super().__init__, which already sets up the study when given metric and mode.
        self._warm_start_journal = str(warm_start_journal) if warm_start_journal else None
        super().__init__(*args, **kwargs)

    def _setup_study(self, mode: str | list) -> None:
        super()._setup_study(mode)
        # Only a fresh study (points_to_evaluate are already queued as WAITING trials by now).
        started = self._ot_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED,
                                                                    TrialState.FAIL, TrialState.RUNNING))  # fmt: skip
        if self._warm_start_journal and not started:
            self._warm_start(Path(self._warm_start_journal))

    def _warm_start(self, journal: Path) -> None:
        """Seed TPE with another experiment's finished trials (same parameter names and ranges)."""
        storage = open_study_storage(journal)
        summaries = optuna.get_all_study_summaries(storage)
        for summary in summaries:
            other = optuna.load_study(study_name=summary.study_name, storage=storage)
            done = [t for t in other.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
            self._ot_study.add_trials(done)

    def suggest(self, trial_id: str) -> dict | None:
        suggestion = super().suggest(trial_id)
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is not None and suggestion is not None:
            # Ties the Optuna trial to its Tune trial, so its leaderboard row can be found (reconcile_study).
            ot_trial.set_user_attr(TRIAL_ID_ATTR, trial_id)
        return suggestion

    def _told(self, trial_id: str) -> bool:
        """Whether Optuna already has this trial's outcome: it ended before a driver was killed, was restored
        by Tune as unfinished, and now ends again without training (its row exists)."""
        ot_trial = self._ot_trials[trial_id]
        return self._storage.get_trial(ot_trial._trial_id).state.is_finished()

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        # A trial Optuna has already closed (told by a driver killed before the trial's row was written;
        # Tune's restored snapshot still has it running) reports its last epoch again on resume: Optuna
        # refuses intermediate values for a finished trial (UpdateFinishedTrialError), which would end the
        # whole resumed search. Its row is written when it ends; the study already has its outcome.
        if trial_id in self._ot_trials and self._told(trial_id):
            return None
        return super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return super().on_trial_complete(trial_id, result, error)
        if self._told(trial_id):
            self._completed_trials.add(trial_id)
            return None
        if error or stopped_early(result):
            state = TrialState.FAIL if error else TrialState.PRUNED
            ot_trial = self._ot_trials[trial_id]
            try:
                if state == TrialState.PRUNED and isinstance(result.get(self._metric), (int, float)):
                    # Tune withholds the result that made the scheduler stop the trial from the searcher;
                    # report it, so the pruned trial's last intermediate value is its score at that rung.
                    # (Optuna ignores, with a warning, a second report for the same step.)
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        ot_trial.report(result[self._metric], int(result.get("training_iteration", result[names.EPOCH])))
                self._ot_study.tell(ot_trial, state=state)
            except Exception as err:  # optuna refuses e.g. a second tell; never break the search for it
                warnings.warn(f"optuna could not record trial {trial_id} as {state.name}: {err}")
            self._completed_trials.add(trial_id)
            return None
        if result and result.get(names.STOPPED_BY) == names.PATIENCE:
            # Stopped on a plateau: its last epoch is `patience` epochs past its best, which is its score.
            result = {**result, self._metric: self._best_reported(trial_id, result[self._metric])}
        return super().on_trial_complete(trial_id, result, error)

    def _best_reported(self, trial_id: str, last: float) -> float:
        """The best of the trial's intermediate values (one per epoch reported), its last value included."""
        ot_trial = self._ot_trials[trial_id]
        reported = list(self._storage.get_trial(ot_trial._trial_id).intermediate_values.values()) + [last]
        return max(reported) if self._mode == "max" else min(reported)


def create_searcher(experiment: Experiment, experiment_dir: Path, warm_start_dir: Path | None) -> RayclsOptunaSearch:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    search = experiment.search
    return RayclsOptunaSearch(
        space=SpaceFunction(experiment.space, experiment.overrides),
        metric=experiment.experiment.metric,
        mode=experiment.experiment.mode,
        # The sampler sees the space less the parameters --set pinned (those are not sampled).
        sampler=SAMPLERS.create(search.algorithm, search, experiment.space.model_copy(
            update={"params": {k: v for k, v in experiment.space.params.items() if k not in experiment.overrides}})),
        points_to_evaluate=[dict(p) for p in search.points_to_evaluate] or None,
        study_name=experiment.name,
        storage=open_study_storage(journal_path(experiment_dir)),
        warm_start_journal=journal_path(warm_start_dir) if warm_start_dir else None,
    )
