"""The sections of a search-space YAML besides `base` (the TrialConfig) and `space`."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Field, model_validator

from raycls.config.schema import Frozen, PositiveInt, TrialConfig, registered
from raycls.config.space import Space


class Resources(Frozen):
    """What one trial asks of the cluster: `workers` Ray Train workers, each with these CPUs and GPUs."""

    workers: PositiveInt = 1
    cpus_per_worker: Annotated[float, Field(gt=0)] = 1.0
    # Fractions pack several trials on one GPU (0.25: four small CIFAR models per GPU).
    gpus_per_worker: Annotated[float, Field(ge=0)] = 0.0
    # "auto": use a GPU when gpus_per_worker > 0.
    use_gpu: Union[Literal["auto"], bool] = "auto"

    @model_validator(mode="after")
    def _gpu_consistent(self) -> "Resources":
        if self.use_gpu is True and self.gpus_per_worker == 0:
            raise ValueError("use_gpu=true needs gpus_per_worker > 0")
        if self.gpus_per_worker > 1 and self.gpus_per_worker != int(self.gpus_per_worker):
            raise ValueError(f"gpus_per_worker={self.gpus_per_worker}: above 1 it must be a whole number")
        return self

    @property
    def gpu(self) -> bool:
        return self.gpus_per_worker > 0 if self.use_gpu == "auto" else bool(self.use_gpu)


class ExperimentSection(Frozen):
    # None: the YAML file's stem.
    name: str | None = None
    metric: str = "val_acc"
    mode: Literal["max", "min"] = "max"
    trials: PositiveInt = 8
    # Trials at a time; None: as many as the cluster's CPUs/GPUs fit.
    concurrency: PositiveInt | None = None
    resources: Resources = Resources()
    # Ray Tune retries a failed trial from its last checkpoint this many times.
    max_failures: Annotated[int, Field(ge=0)] = 0
    # Keep this many best checkpoints per trial (by `metric`).
    keep_checkpoints: PositiveInt = 1
    # A smoke test of the whole search (`raycls tune --fast-dev-run`): every trial runs one epoch per stage
    # and two batches of each split (TrialConfig.fast_dev_run, loop.FAST_DEV_BATCHES).
    fast_dev_run: bool = False


class SearchSection(Frozen):
    algorithm: str = "tpe"  # a SAMPLERS name (raycls.search)
    seed: int = 0
    # Trials to try first, as {dotted.path: value} mappings over the space's parameters.
    points_to_evaluate: list[dict[str, Any]] = Field(default_factory=list)
    # Seed TPE with the trials of another experiment in the same storage.
    warm_start: str | None = None
    # Random trials before TPE starts modelling (Optuna's n_startup_trials); None: Optuna's default.
    n_startup_trials: Annotated[int, Field(ge=0)] | None = None
    _known_sampler = registered("sampler", "algorithm")


class SchedulerSection(Frozen):
    name: str = "asha"  # a TRIAL_SCHEDULERS name (raycls.search)
    # In epochs (counted over a whole chain). None: the trial's epochs, all stages together.
    max_t: PositiveInt | None = None
    grace_period: PositiveInt = 1
    reduction_factor: Annotated[float, Field(gt=1)] = 2.0
    _known_trial_scheduler = registered("trial scheduler", "name")


class WandbSection(Frozen):
    # auto: online when WANDB_API_KEY is set or the user has logged in, else offline.
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    project: str = "raycls"
    entity: str | None = None
    tags: list[str] = Field(default_factory=list)


class Experiment(Frozen):
    """A loaded search-space YAML: everything a `raycls tune` run needs besides the CLI flags."""

    source: str
    experiment: ExperimentSection
    search: SearchSection
    scheduler: SchedulerSection
    wandb: WandbSection
    base: TrialConfig
    space: Space
    # `--set` overrides on trial-config paths: they win over sampled values (and pin those parameters).
    overrides: dict[str, Any] = Field(default_factory=dict)

    @property
    def name(self) -> str:
        assert self.experiment.name is not None  # filled by the loader
        return self.experiment.name

    def as_fast_dev_run(self, *, trials: int = 2) -> "Experiment":
        """This search as a smoke test under its own name (so the real experiment's leaderboard and study are
        untouched): `trials` trials of one epoch per stage and two batches per split."""
        section = self.experiment.model_copy(update={
            "name": f"{self.name}-fast-dev-run", "trials": min(trials, self.experiment.trials), "fast_dev_run": True,
        })  # fmt: skip
        return self.model_copy(update={"experiment": section})

    @property
    def max_t(self) -> int:
        return self.scheduler.max_t or self.base.total_epochs
