"""A search's parts by name: Optuna samplers (`search.algorithm`) and trial schedulers (`scheduler.name`).

The registries live outside `raycls.tune` so that validating a config checks these names without importing
Ray or Optuna: each factory imports what it builds when it is called (by `raycls.tune`, on the driver).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from raycls import names
from raycls.registry import Registry

if TYPE_CHECKING:
    import optuna
    from ray.tune.schedulers import TrialScheduler

    from raycls.config.experiment import Experiment, SearchSection
    from raycls.config.space import Space

# A sampler is made from the search section and the space it samples (the grid enumerates the space).
# Constraints need nothing here: the searcher sets them on each trial (Optuna's Trial.set_constraint), and
# TPE and NSGA-II read them from the trials (the others ignore them; the rows still say which are feasible).
SAMPLERS: Registry[Callable[[SearchSection, Space], optuna.samplers.BaseSampler]] = Registry("sampler")
TRIAL_SCHEDULERS: Registry[Callable[[Experiment], TrialScheduler]] = Registry("trial scheduler")


# ------------------------------------------------------------------------------------------- samplers
@SAMPLERS.register("tpe")
def tpe(search: SearchSection, space: Space) -> optuna.samplers.BaseSampler:
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # multivariate + group: TPE models conditional parameters per sub-space (Optuna's advice for
        # define-by-run spaces); constant_liar keeps parallel trials from sampling the same point.
        return optuna.samplers.TPESampler(
            seed=search.seed,
            multivariate=True,
            group=True,
            constant_liar=True,
            **({"n_startup_trials": search.n_startup_trials} if search.n_startup_trials is not None else {}),
        )


@SAMPLERS.register("random")
def random(search: SearchSection, space: Space) -> optuna.samplers.BaseSampler:
    import optuna

    return optuna.samplers.RandomSampler(seed=search.seed)


@SAMPLERS.register("cmaes")
def cmaes(search: SearchSection, space: Space) -> optuna.samplers.BaseSampler:
    import optuna

    # CMA-ES handles numeric parameters; categorical ones fall back to independent (random) sampling.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.CmaEsSampler(seed=search.seed, warn_independent_sampling=False)


@SAMPLERS.register("nsga2")
def nsga2(search: SearchSection, space: Space) -> optuna.samplers.BaseSampler:
    """NSGA-II, the classic multi-objective evolutionary sampler (TPE handles several objectives too).
    `search.n_startup_trials` sets its population size (Optuna's default: 50)."""
    import optuna

    population = {"population_size": max(2, search.n_startup_trials)} if search.n_startup_trials else {}
    return optuna.samplers.NSGAIISampler(seed=search.seed, **population)


@SAMPLERS.register("grid")
def grid(search: SearchSection, space: Space) -> optuna.samplers.BaseSampler:
    """Every combination of the space's choices once (Optuna's GridSampler, in a seeded random order):
    "each model once" without listing points_to_evaluate. Only for spaces of unconditional choices."""
    from raycls.samplers import AskTellGridSampler

    return AskTellGridSampler(grid_values(space), seed=search.seed)


def grid_values(space: Space) -> dict[str, list]:
    """The grid's axes: every parameter must be a choice without `when` (a grid cannot enumerate a range)."""
    from raycls.errors import ConfigError

    wrong = [
        f"{path} ({param.type})" if param.type != "choice" else f"{path} (has `when`)"
        for path, param in space.params.items()
        if param.type != "choice" or param.when
    ]
    if wrong:
        raise ConfigError(f"search.algorithm: grid enumerates choices without `when`; not these: {', '.join(wrong)}")
    return {path: list(param.values) for path, param in space.params.items()}


def check_search(experiment: Experiment) -> None:
    """Before any trial: a grid's space is all choices, and it has at least `experiment.trials` points (past
    that, Optuna's GridSampler would run combinations again)."""
    from math import prod

    from raycls.errors import ConfigError

    if experiment.search.algorithm != "grid":
        return
    space = experiment.space.model_copy(
        update={"params": {k: v for k, v in experiment.space.params.items() if k not in experiment.overrides}}
    )
    try:
        points = prod(len(values) for values in grid_values(space).values())
    except ConfigError as err:
        raise ConfigError(err.problems, source=experiment.source) from None
    if experiment.experiment.trials > points:
        raise ConfigError(
            f"experiment.trials={experiment.experiment.trials} > the grid's {points} combinations: "
            f"set trials to {points} (each combination runs once)",
            source=experiment.source,
        )


# ----------------------------------------------------------------------------------- trial schedulers
def last_stage(scheduler: type[TrialScheduler]) -> type[TrialScheduler]:
    """A Tune scheduler that judges a trial as its leaderboard row does (raycls.ranking): only the epochs that
    count, so a chain's earlier stage (a CNN teacher) is never compared at a rung. A chain's trials reach
    their last stage at the same epoch (epochs are numbered over the chain), so a trial's first counted
    result fills every rung it has passed, against other trials' values of the same stage. (Defined when
    called: this module must load without Ray.)"""
    from raycls.ranking import Ranking

    class LastStage(scheduler):  # type: ignore[misc, valid-type]
        def on_trial_result(self, tune_controller, trial, result: dict) -> str:  # noqa: ANN001 - Tune's types
            if not Ranking.counts(result):
                return self.CONTINUE
            return super().on_trial_result(tune_controller, trial, result)

    LastStage.__name__ = LastStage.__qualname__ = f"LastStage{scheduler.__name__}"
    return LastStage


def _async_hyperband(experiment: Experiment, brackets: int) -> TrialScheduler:
    """Ray's AsyncHyperBandScheduler (ASHA is its 1-bracket case) on rungs counted in epochs of the last stage."""
    from ray.tune.schedulers import AsyncHyperBandScheduler

    section = experiment.scheduler
    # time_attr is our own epoch counter, not Tune's training_iteration: it stays right across restores.
    return last_stage(AsyncHyperBandScheduler)(
        time_attr=names.EPOCH,
        max_t=experiment.max_t,
        grace_period=section.grace_period,
        reduction_factor=section.reduction_factor,
        brackets=brackets,
        # Let a trial that reaches max_t finish on its own: stopping it there would kill a multi-worker
        # trial's Train run at its last epoch (and count a finished trial as stopped).
        stop_last_trials=False,
    )


@TRIAL_SCHEDULERS.register("asha")
def asha(experiment: Experiment) -> TrialScheduler:
    """Stops weak trials at rungs counted in epochs (a chain's last stage only); `brackets` above 1 gives
    ASHA's brackets of different rigor."""
    return _async_hyperband(experiment, experiment.scheduler.brackets)


@TRIAL_SCHEDULERS.register("hyperband")
def hyperband(experiment: Experiment) -> TrialScheduler:
    """Hyperband with brackets, asynchronously (Li et al. 2020, the ASHA paper's Hyperband): `brackets`
    (default 3 here) brackets of growing grace periods, each trial assigned to one at random; no trial waits
    for its bracket. (Ray's synchronous HyperBandScheduler pauses trials until their bracket fills; under
    raycls's concurrency limit it stopped no trial in our digits test, so the synchronous brackets are
    offered as bohb's, whose pausing is handled.)"""
    brackets = experiment.scheduler.brackets
    return _async_hyperband(experiment, brackets if brackets > 1 else 3)


@TRIAL_SCHEDULERS.register("bohb")
def bohb(experiment: Experiment) -> TrialScheduler:
    """BOHB-style (Falkner et al. 2018): Ray's HyperBandForBOHB brackets (largest bracket first, trials paused
    at rungs) with raycls's Optuna TPE as the model in place of TuneBOHB's (hpbandster/ConfigSpace): TPE learns
    from every rung through the pruned trials' intermediate values, and the study stays raycls's journal."""
    from ray.tune.schedulers import HyperBandForBOHB

    section = experiment.scheduler
    return last_stage(HyperBandForBOHB)(
        time_attr=names.EPOCH,
        max_t=experiment.max_t,
        reduction_factor=section.reduction_factor,
        stop_last_trials=False,
    )


@TRIAL_SCHEDULERS.register("median")
def median(experiment: Experiment) -> TrialScheduler:
    """The median stopping rule (Golovin et al. 2017, Google Vizier): stop a trial whose best score so far is
    worse than the median of the other trials' running averages at the same epoch."""
    from ray.tune.schedulers import MedianStoppingRule

    section = experiment.scheduler
    return last_stage(MedianStoppingRule)(
        time_attr=names.EPOCH,
        grace_period=section.grace_period,
        min_samples_required=section.min_samples,
    )


def population_based(name: str) -> bool:
    """Whether a scheduler clones and perturbs trials (PBT, PB2): Tune runs it without a searcher."""
    return bool(getattr(TRIAL_SCHEDULERS.get(name), "population_based", False))


def _population(factory: Callable[[Experiment], TrialScheduler]) -> Callable[[Experiment], TrialScheduler]:
    factory.population_based = True  # type: ignore[attr-defined]
    return factory


def with_lineage(scheduler: type[TrialScheduler]) -> type[TrialScheduler]:
    """A PBT-family scheduler whose exploits write themselves into the exploiting trial's config: the events
    (names.LINEAGE: which trial it cloned, at which epoch, the perturbed values) and the schedule of values its
    weights trained under (names.SCHEDULE). They travel with the trial (Tune's params.json, its snapshot), and
    the trial's leaderboard row reads them. Defined when called: this module loads without Ray."""

    class WithLineage(scheduler):  # type: ignore[misc, valid-type]
        def on_trial_add(self, tune_controller, trial) -> None:  # noqa: ANN001 - Tune's types
            super().on_trial_add(tune_controller, trial)
            if names.SCHEDULE not in trial.config:  # its starting values (sampled or filled in by PBT)
                trial.config[names.SCHEDULE] = [{"epoch": 0, "values": self._mutated(trial.config)}]
                trial.config[names.LINEAGE] = []

        def _mutated(self, config: dict) -> dict:
            return {key: config.get(key) for key in self._hyperparam_mutations}

        def _get_new_config(self, trial, trial_to_clone):  # noqa: ANN001, ANN202 - Tune's types
            new_config, operations = super()._get_new_config(trial, trial_to_clone)
            at = int(self._trial_state[trial].last_train_time)
            source = int(self._trial_state[trial_to_clone].last_train_time)  # the epoch of the cloned checkpoint
            values = self._mutated(new_config)
            ancestry = [s for s in trial_to_clone.config.get(names.SCHEDULE, []) if s["epoch"] < source]
            new_config[names.SCHEDULE] = [*ancestry, {"epoch": source, "values": values}]
            event = {"epoch": at, "cloned": trial_to_clone.trial_id, "from_epoch": source, "values": values}
            new_config[names.LINEAGE] = [*trial.config.get(names.LINEAGE, []), event]
            return new_config, operations

    WithLineage.__name__ = WithLineage.__qualname__ = f"WithLineage{scheduler.__name__}"
    return WithLineage


def tune_domain(param: Any) -> Any:
    """A space parameter as PBT's mutation: a list for choices (PBT steps to a neighbouring value), Tune's
    distribution for ranges (resampled, or scaled by 0.8 / 1.2)."""
    from ray import tune

    if param.type == "choice":
        return list(param.values)
    if param.type == "loguniform":
        return tune.loguniform(param.low, param.high)
    if param.type == "int":
        return (
            tune.qrandint(param.low, param.high, param.step)
            if not param.log
            else tune.lograndint(param.low, param.high + 1)
        )
    return tune.uniform(param.low, param.high)


@TRIAL_SCHEDULERS.register("pbt")
@_population
def pbt(experiment: Experiment) -> TrialScheduler:
    """Population-based training (Jaderberg et al. 2017): every `perturbation_interval` epochs a trial in the
    bottom quantile clones a top trial's checkpoint and perturbs `mutations` (Ray's PopulationBasedTraining)."""
    from ray.tune.schedulers import PopulationBasedTraining

    section = experiment.scheduler
    return with_lineage(PopulationBasedTraining)(
        time_attr=names.EPOCH,
        perturbation_interval=section.perturbation_interval,
        burn_in_period=section.burn_in,
        hyperparam_mutations={path: tune_domain(param) for path, param in section.mutations.items()},
        quantile_fraction=section.quantile_fraction,
        resample_probability=section.resample_probability,
        log_config=False,  # the lineage goes to the leaderboard rows instead
    )


@TRIAL_SCHEDULERS.register("pb2")
@_population
def pb2(experiment: Experiment) -> TrialScheduler:
    """PB2 (Parker-Holder et al. 2020): PBT whose explore step is a GP bandit over `mutations`' ranges
    (uniform / loguniform only; Ray's PB2, which needs GPy and scikit-learn)."""
    from ray.tune.schedulers.pb2 import PB2

    section = experiment.scheduler
    return with_lineage(PB2)(
        time_attr=names.EPOCH,
        perturbation_interval=section.perturbation_interval,
        hyperparam_bounds={path: [param.low, param.high] for path, param in section.mutations.items()},
        quantile_fraction=section.quantile_fraction,
        log_config=False,
    )


def check_schedule(experiment: Experiment) -> None:
    """Before any trial: PBT and PB2 have mutations, each a trial-config path its values fit (PB2: ranges of
    floats); other schedulers take none."""
    from raycls.config.load import resolve_trial
    from raycls.errors import ConfigError, RayclsError

    section = experiment.scheduler
    problems = []
    if not population_based(section.name):
        if section.mutations:
            problems.append(f"scheduler.mutations: only pbt and pb2 perturb parameters, not {section.name!r}")
    elif not section.mutations:
        problems.append(
            f"scheduler.mutations: {section.name} needs the parameters it perturbs, e.g. "
            "{train.lr: {type: loguniform, low: 1.0e-4, high: 0.1}}"
        )
    for path, param in section.mutations.items():
        if section.name == "pb2" and param.type not in ("uniform", "loguniform"):
            problems.append(f"scheduler.mutations.{path}: pb2 perturbs ranges of floats, not {param.type!r}")
        if param.when:
            problems.append(f"scheduler.mutations.{path}: a mutation cannot have `when`")
        try:
            resolve_trial(experiment, {path: param.representative()})
        except RayclsError as err:
            problems.append(f"scheduler.mutations.{path}: {err}")
    if problems:
        raise ConfigError(problems, source=experiment.source)


@TRIAL_SCHEDULERS.register("fifo")
def fifo(experiment: Experiment) -> TrialScheduler:
    """Runs every trial out."""
    from ray.tune.schedulers import FIFOScheduler

    return FIFOScheduler()
