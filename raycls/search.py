"""A search's parts by name: Optuna samplers (`search.algorithm`) and trial schedulers (`scheduler.name`).

The registries live outside `raycls.tune` so that validating a config checks these names without importing
Ray or Optuna: each factory imports what it builds when it is called (by `raycls.tune`, on the driver).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

from raycls.evaluate import names
from raycls.registry import Registry

if TYPE_CHECKING:
    import optuna
    from ray.tune.schedulers import TrialScheduler

    from raycls.config.experiment import Experiment, SearchSection
    from raycls.config.space import Space

# A sampler is made from the search section and the space it samples (the grid enumerates the space).
SAMPLERS: Registry[Callable[["SearchSection", "Space"], "optuna.samplers.BaseSampler"]] = Registry("sampler")
TRIAL_SCHEDULERS: Registry[Callable[["Experiment"], "TrialScheduler"]] = Registry("trial scheduler")


# ------------------------------------------------------------------------------------------- samplers
@SAMPLERS.register("tpe")
def tpe(search: SearchSection, space: Space) -> optuna.samplers.BaseSampler:
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # multivariate + group: TPE models conditional parameters per sub-space (Optuna's advice for
        # define-by-run spaces); constant_liar keeps parallel trials from sampling the same point.
        return optuna.samplers.TPESampler(
            seed=search.seed, multivariate=True, group=True, constant_liar=True,
            **({"n_startup_trials": search.n_startup_trials} if search.n_startup_trials is not None else {}),
        )  # fmt: skip


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


@SAMPLERS.register("grid")
def grid(search: SearchSection, space: Space) -> optuna.samplers.BaseSampler:
    """Every combination of the space's choices once (Optuna's GridSampler, in a seeded random order):
    "each model once" without listing points_to_evaluate. Only for spaces of unconditional choices; set
    experiment.trials to the number of combinations."""
    import optuna

    from raycls.errors import ConfigError

    wrong = [path for path, param in space.params.items() if param.type != "choice" or param.when]
    if wrong:
        raise ConfigError(f"search.algorithm: grid enumerates choices without `when`; not these: {', '.join(wrong)}")
    return optuna.samplers.GridSampler({path: list(param.values) for path, param in space.params.items()}, seed=search.seed)


# ----------------------------------------------------------------------------------- trial schedulers
@TRIAL_SCHEDULERS.register("asha")
def asha(experiment: Experiment) -> TrialScheduler:
    """Stops weak trials at rungs counted in epochs."""
    from ray.tune.schedulers import ASHAScheduler

    section = experiment.scheduler
    # time_attr is our own epoch counter, not Tune's training_iteration: it stays right across restores.
    return ASHAScheduler(
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
