"""Optuna search for Ray Tune: the YAML space as a define-by-run function, a persistent study, and
early-stopped trials told to Optuna as PRUNED.

Ray's OptunaSearch tells Optuna a trial that ASHA stopped as COMPLETE with its early-rung score, so TPE
learns from 2-epoch scores as if they were final. Here such trials are PRUNED (their per-epoch values were
already reported as intermediate values), and failed trials are FAIL even when they reported some epochs.
(`search.early_stopped_as: complete` keeps Ray's bookkeeping, for benchmarks/search_efficiency.py.)

Multi-objective searches (`experiment.objectives`): Optuna has no pruning for them (optuna#3450) and Ray's
bridge tells an ASHA-stopped trial COMPLETE with its missing objectives as None, which Optuna refuses: the
trial stays RUNNING in the study forever. Here ASHA stops trials on `experiment.metric` as usual, stopped
trials are told PRUNED (never a point on the front), and a completed trial is told every objective: epoch
metrics at its best epoch (as its leaderboard row has them), held-out and cost metrics from its last epoch.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter, SearchAlgorithm, Searcher
from ray.tune.search.optuna import OptunaSearch

from raycls import names
from raycls.config.experiment import Constraint, Experiment
from raycls.config.space import Space, suggest
from raycls.ranking import Ranking, number
from raycls.search import SAMPLERS, population_based
from raycls.storage import journal_file
from raycls.tune.resume import TRIAL_ID_ATTR


def constraint_values(constraints: list[Constraint], best: dict, last: dict) -> list[float]:
    """Each constraint's violation (<= 0: feasible): epoch metrics at the best epoch, held-out and cost metrics
    from the last (as the row has them); a metric the trial never reported is not judged (0.0)."""
    values = []
    for constraint in constraints:
        source = (
            last if names.is_evaluation_metric(constraint.metric) or constraint.metric in names.COST_METRICS else best
        )
        value = number(source.get(constraint.metric))
        values.append(constraint.violation(value) if value is not None else 0.0)
    return values


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


def open_study_storage(path: Path) -> optuna.storages.BaseStorage:
    """A journal file: append-only, safe against a killed driver, readable by optuna-dashboard."""
    from optuna.storages.journal import JournalFileBackend

    path.parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


class RayclsOptunaSearch(OptunaSearch):
    def __init__(
        self,
        *args: Any,
        warm_start_journal: Path | None = None,
        objectives: list[tuple[str, str]] | None = None,
        distributions: dict[str, BaseDistribution] | None = None,
        early_stopped_as: str = "pruned",
        constraints: list[str] | None = None,
        **kwargs: Any,
    ):
        # Set before super().__init__, which already sets up the study when given metric and mode.
        self._warm_start_journal = str(warm_start_journal) if warm_start_journal else None
        self._objectives = list(objectives or [])  # (metric, mode) pairs; empty: one objective, `metric`
        self._distributions = dict(distributions or {})  # the space's, for the warm start's checks
        self._early_stopped_as = early_stopped_as
        self._best_epoch: dict[str, dict] = {}  # each trial's result at its best epoch so far
        self._constraints = list(constraints or [])  # experiment.constraints (strings: picklable as they are)
        super().__init__(*args, **kwargs)

    def _setup_study(self, mode: str | list) -> None:
        super()._setup_study([m for _, m in self._objectives] if self._objectives else mode)
        # Only a fresh study (points_to_evaluate are already queued as WAITING trials by now).
        started = self._ot_study.get_trials(
            deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)
        )
        if self._warm_start_journal and not started:
            self._warm_start(Path(self._warm_start_journal))

    def _warm_start(self, journal: Path) -> None:
        """Seed the sampler with another experiment's finished trials: the parameters that still fit this space
        are kept, the rest dropped (renamed, re-ranged, removed), with a warning saying which."""
        storage = open_study_storage(journal)
        trials = []
        for summary in optuna.get_all_study_summaries(storage):
            other = optuna.load_study(study_name=summary.study_name, storage=storage)
            trials += [t for t in other.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
        kept, dropped = fitting_trials(trials, self._distributions, objectives=len(self._objectives) or 1)
        if dropped:
            warnings.warn(
                f"search.warm_start from {journal.parent.parent.name}: kept {len(kept)} of {len(trials)} "
                f"trials; dropped {'; '.join(f'{k}: {v}' for k, v in sorted(dropped.items()))}",
                stacklevel=2,
            )
        self._ot_study.add_trials(kept)

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

    @property
    def multi_objective(self) -> bool:
        return len(self._objectives) > 1

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        # A trial Optuna has already closed (told by a driver killed before the trial's row was written;
        # Tune's restored snapshot still has it running) reports its last epoch again on resume: Optuna
        # refuses intermediate values for a finished trial (UpdateFinishedTrialError), which would end the
        # whole resumed search. Its row is written when it ends; the study already has its outcome.
        if trial_id in self._ot_trials and self._told(trial_id):
            return None
        if self.multi_objective or self._constraints:  # objectives / constraints read the best epoch's values
            self._keep_best_epoch(trial_id, result)
        if self.multi_objective:  # Optuna takes no intermediate values for several objectives
            return None
        if not self._ranking.counts(result):
            return None  # a chain's earlier stage: its values are not the trial's (raycls.ranking)
        return super().on_trial_result(trial_id, result)

    @property
    def _ranking(self) -> Ranking:
        return Ranking.of(self._metric, self._mode)

    def _keep_best_epoch(self, trial_id: str, result: dict) -> None:
        """The result of the trial's best epoch by `metric`, as a leaderboard row ranks them (chains too)."""
        best = self._best_epoch.get(trial_id)
        if self._ranking.best_epoch([best, result] if best else [result]) is result:
            self._best_epoch[trial_id] = dict(result)

    def objective_values(self, trial_id: str, last: dict) -> list[float] | None:
        """A completed trial's objectives: epoch metrics at its best epoch, the others (test_*, costs) from its
        last epoch. None when one is missing or not a finite number."""
        best = self._best_epoch.get(trial_id, last)
        values = []
        for metric, _ in self._objectives:
            value = (last if metric.startswith(names.EVAL_PREFIX) or metric in names.COST_METRICS else best).get(metric)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
                return None
            values.append(float(value))
        return values

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return super().on_trial_complete(trial_id, result, error)
        if self._told(trial_id):
            self._completed_trials.add(trial_id)
            return None
        if self.multi_objective or self._constraints:
            self._keep_best_epoch(trial_id, result or {})
        if self._constraints and not error:
            self._store_constraints(trial_id, result or {})
        if not error and stopped_early(result) and self._early_stopped_as == "complete" and not self.multi_objective:
            return super().on_trial_complete(trial_id, result, error)  # Ray's bookkeeping: the rung score as final
        if error or stopped_early(result):
            state = TrialState.FAIL if error else TrialState.PRUNED
            ot_trial = self._ot_trials[trial_id]
            try:
                value = self._ranking.value(result or {})
                if state == TrialState.PRUNED and not self.multi_objective and value is not None:
                    # Tune withholds the result that made the scheduler stop the trial from the searcher;
                    # report it, so the pruned trial's last intermediate value is its score at that rung.
                    # (Optuna ignores, with a warning, a second report for the same step.)
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        ot_trial.report(value, int(result.get("training_iteration", result[names.EPOCH])))
                self._ot_study.tell(ot_trial, state=state)
            except Exception as err:  # optuna refuses e.g. a second tell; never break the search for it
                warnings.warn(f"optuna could not record trial {trial_id} as {state.name}: {err}", stacklevel=2)
            self._completed_trials.add(trial_id)
            self._best_epoch.pop(trial_id, None)
            return None
        if self.multi_objective:
            return self._tell_objectives(trial_id, result or {})
        if result and not error:
            # Told the row's score, the best epoch's value (not the last epoch's: a plateau's last epoch is
            # `patience` epochs past its best, and a chain's earlier stages do not count).
            result = {**result, self._metric: self._best_reported(trial_id, self._ranking.value(result))}
        self._best_epoch.pop(trial_id, None)
        return super().on_trial_complete(trial_id, result, error)

    def _store_constraints(self, trial_id: str, last: dict) -> None:
        """The trial's constraint violations, set on its Optuna trial under each constraint's text (Optuna's
        Trial.set_constraint: TPE and NSGA-II read them from the trials, <= 0 is feasible)."""
        best = self._best_epoch.get(trial_id, last)
        parsed = [Constraint.parse(text) for text in self._constraints]
        ot_trial = self._ot_trials[trial_id]
        try:
            for text, value in zip(self._constraints, constraint_values(parsed, best, last)):
                ot_trial.set_constraint(text, value)
        except Exception as err:  # never break the search for Optuna's bookkeeping
            warnings.warn(f"optuna could not record trial {trial_id}'s constraints: {err}", stacklevel=2)

    # BOHB-style brackets (HyperBandForBOHB) pause trials at rungs and say so to the searcher: nothing to do
    # here (a paused trial's epochs are already intermediate values); PausingLimiter frees its slot.
    def on_pause(self, trial_id: str) -> None:
        pass

    def on_unpause(self, trial_id: str) -> None:
        pass

    def _tell_objectives(self, trial_id: str, result: dict) -> None:
        values = self.objective_values(trial_id, result)
        ot_trial = self._ot_trials[trial_id]
        if values is None:
            missing = [m for m, _ in self._objectives if not isinstance(result.get(m), (int, float))]
            warnings.warn(
                f"trial {trial_id} ended without objective(s) {missing}: told to Optuna as FAIL", stacklevel=2
            )
        try:
            self._ot_study.tell(ot_trial, values, state=TrialState.COMPLETE if values is not None else TrialState.FAIL)
        except Exception as err:  # never break the search for Optuna's bookkeeping
            warnings.warn(f"optuna could not record trial {trial_id}: {err}", stacklevel=2)
        self._completed_trials.add(trial_id)
        self._best_epoch.pop(trial_id, None)

    def _best_reported(self, trial_id: str, last: float | None) -> float | None:
        """The best of the trial's intermediate values (one per epoch that counts), its last value included."""
        ot_trial = self._ot_trials[trial_id]
        reported = list(self._storage.get_trial(ot_trial._trial_id).intermediate_values.values())
        return self._ranking.best_of([*reported, *([last] if last is not None else [])])


def fitting_trials(
    trials: list[FrozenTrial], distributions: dict[str, BaseDistribution], *, objectives: int
) -> tuple[list[FrozenTrial], dict[str, str]]:
    """Another study's finished trials cut to this space: each keeps the parameters that exist here with a value
    inside this space's distribution (under this space's distribution); a trial with none left, or told a
    different number of objectives, is dropped. Returns the trials and why each parameter was dropped."""
    kept: list[FrozenTrial] = []
    dropped: dict[str, str] = {}
    outside: dict[str, int] = {}
    for trial in trials:
        if trial.state == TrialState.COMPLETE and len(trial.values) != objectives:
            dropped["(objectives)"] = f"{len(trial.values)} objective(s) there, {objectives} here"
            continue
        params = {}
        for name, value in trial.params.items():
            if name not in distributions:
                dropped[name] = "not a parameter of this space"
            elif _fits(distributions[name], value):
                params[name] = value
            else:
                outside[name] = outside.get(name, 0) + 1
        if not params:
            continue
        kept.append(
            optuna.trial.create_trial(
                state=trial.state,
                values=trial.values if trial.state == TrialState.COMPLETE else None,
                params=params,
                distributions={k: distributions[k] for k in params},
                intermediate_values=trial.intermediate_values if objectives == 1 else None,
                user_attrs={"warm_start_from": trial.number},
            )
        )
    dropped.update({name: f"{n} value(s) outside {distributions[name]}" for name, n in outside.items()})
    return kept, dropped


def _fits(distribution: BaseDistribution, value: Any) -> bool:
    try:
        return distribution._contains(distribution.to_internal_repr(value))
    except (ValueError, TypeError):  # a choice this space no longer has, a string where a number goes
        return False


def create_searcher(experiment: Experiment, experiment_dir: Path, warm_start_dir: Path | None) -> RayclsOptunaSearch:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    search, section = experiment.search, experiment.experiment
    return RayclsOptunaSearch(
        space=SpaceFunction(experiment.space, experiment.overrides),
        # Tune checks every result for `metric` and ASHA ranks by it; the objectives are told at the end.
        metric=section.metric,
        mode=section.mode,
        objectives=[(o.metric, o.mode) for o in section.objectives],
        distributions={path: param.distribution() for path, param in experiment.space.params.items()},
        early_stopped_as=search.early_stopped_as,
        constraints=list(section.constraints),
        # The sampler sees the space less the parameters --set pinned (those are not sampled).
        sampler=SAMPLERS.create(
            search.algorithm,
            search,
            experiment.space.model_copy(
                update={"params": {k: v for k, v in experiment.space.params.items() if k not in experiment.overrides}}
            ),
        ),
        points_to_evaluate=[dict(p) for p in search.points_to_evaluate] or None,
        study_name=experiment.name,
        storage=open_study_storage(journal_file(experiment_dir)),
        warm_start_journal=journal_file(warm_start_dir) if warm_start_dir else None,
    )


class PausingLimiter(ConcurrencyLimiter):
    """Tune's ConcurrencyLimiter, less the trials a bracket scheduler paused at a rung (HyperBandForBOHB says
    so through on_pause): a paused trial holds no slot, so new trials fill the bracket meanwhile, as BOHB
    intends; it takes one again when unpaused or when it ends."""

    def __init__(self, searcher: RayclsOptunaSearch, max_concurrent: int):
        super().__init__(searcher, max_concurrent=max_concurrent)
        self.paused: set[str] = set()

    def on_pause(self, trial_id: str) -> None:
        if trial_id in self.live_trials:
            self.live_trials.remove(trial_id)
            self.paused.add(trial_id)
        self.searcher.on_pause(trial_id)

    def on_unpause(self, trial_id: str) -> None:
        self._resume(trial_id)
        self.searcher.on_unpause(trial_id)

    def _resume(self, trial_id: str) -> None:
        if trial_id in self.paused:
            self.paused.remove(trial_id)
            self.live_trials.add(trial_id)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self._resume(trial_id)  # stopped while paused: it is told to the searcher like any other
        return super().on_trial_complete(trial_id, result=result, error=error)


class PopulationGenerator(BasicVariantGenerator):
    """Tune's generator of the given points, one trial each. Tune resolves a point against the param_space, so
    every sampled path goes into it first (a member that did not sample one holds names.UNSAMPLED)."""

    def __init__(self, points: list[dict[str, Any]]):
        self.keys = sorted({key for point in points for key in point})
        super().__init__(
            points_to_evaluate=[{**{key: names.UNSAMPLED for key in self.keys}, **point} for point in points]
        )

    def add_configurations(self, experiments: Any) -> None:
        from ray.tune.experiment import _convert_to_experiment_list

        for experiment in _convert_to_experiment_list(experiments):
            config = experiment.spec.setdefault("config", {})
            for key in self.keys:
                config.setdefault(key, {})  # a sub-dict a point replaces whole (Tune checks no value against it)
        super().add_configurations(experiments)


def initial_population(experiment: Experiment, size: int | None = None) -> list[dict[str, Any]]:
    """A population-based search's first trials: `experiment.trials` points of the space drawn by the
    configured sampler (an in-memory study: PBT is its own search algorithm, and no Optuna study is kept),
    `search.points_to_evaluate` first; `size`: fewer (a resumed search's remaining trials)."""
    space = experiment.space.model_copy(
        update={"params": {k: v for k, v in experiment.space.params.items() if k not in experiment.overrides}}
    )
    study = optuna.create_study(
        study_name=f"{experiment.name}-population",
        sampler=SAMPLERS.create(experiment.search.algorithm, experiment.search, space),
    )
    for point in experiment.search.points_to_evaluate:
        study.enqueue_trial(dict(point))
    function = SpaceFunction(experiment.space, experiment.overrides)
    points = []
    for _ in range(size or experiment.experiment.trials):
        trial = study.ask()
        function(trial)
        points.append(dict(trial.params))
        study.tell(trial, 0.0)  # the population is drawn up front: no score to tell
    return points


def search_algorithm(
    experiment: Experiment, experiment_dir: Path, warm_start_dir: Path | None, concurrency: int, trials: int
) -> SearchAlgorithm | Searcher:
    """What proposes the trials: raycls's Optuna search, `concurrency` trials at a time (paused trials hold no
    slot); or, for a population-based scheduler (PBT, PB2: Tune allows them no searcher), the population
    drawn up front, every member started at once (the cluster's resources limit how many run)."""
    if population_based(experiment.scheduler.name):
        return PopulationGenerator(initial_population(experiment, trials))
    return PausingLimiter(create_searcher(experiment, experiment_dir, warm_start_dir), max_concurrent=concurrency)
