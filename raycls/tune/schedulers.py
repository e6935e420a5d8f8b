"""Trial schedulers: ASHA (stops weak trials at rungs counted in epochs) or FIFO (runs every trial out)."""

from __future__ import annotations

from collections.abc import Callable

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from raycls.config.experiment import Experiment
from raycls.evaluate import names
from raycls.registry import Registry

SCHEDULERS: Registry[Callable[[Experiment], TrialScheduler]] = Registry("trial scheduler")


@SCHEDULERS.register("asha")
def asha(experiment: Experiment) -> TrialScheduler:
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


@SCHEDULERS.register("fifo")
def fifo(experiment: Experiment) -> TrialScheduler:
    return FIFOScheduler()


def create_scheduler(experiment: Experiment) -> TrialScheduler:
    return SCHEDULERS.get(experiment.scheduler.name)(experiment)
