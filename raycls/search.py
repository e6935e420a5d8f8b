"""A search's parts by name: Optuna samplers (`search.algorithm`) and trial schedulers (`scheduler.name`).

The registries live outside `raycls.tune` so that validating a config checks these names without importing
Ray or Optuna: each factory imports what it builds when it is called (by `raycls.tune`, on the driver).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

from raycls import names
from raycls.registry import Registry

if TYPE_CHECKING:
    import optuna
    from ray.tune.schedulers import TrialScheduler

    from raycls.config.experiment import Experiment, SearchSection
    from raycls.config.space import Space

# A sampler is made from the search section and the space it samples (the grid enumerates the space).
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


@TRIAL_SCHEDULERS.register("asha")
def asha(experiment: Experiment) -> TrialScheduler:
    """Stops weak trials at rungs counted in epochs (a chain's last stage only)."""
    from ray.tune.schedulers import ASHAScheduler

    section = experiment.scheduler
    # time_attr is our own epoch counter, not Tune's training_iteration: it stays right across restores.
    return last_stage(ASHAScheduler)(
        time_attr=names.EPOCH,
        max_t=experiment.max_t,
        grace_period=section.grace_period,
        reduction_factor=section.reduction_factor,
        # Let a trial that reaches max_t finish on its own: stopping it there would kill a multi-worker
        # trial's Train run at its last epoch (and count a finished trial as stopped).
        stop_last_trials=False,
    )


@TRIAL_SCHEDULERS.register("fifo")
def fifo(experiment: Experiment) -> TrialScheduler:
    """Runs every trial out."""
    from ray.tune.schedulers import FIFOScheduler

    return FIFOScheduler()
