"""The sections of a search-space YAML besides `base` (the TrialConfig) and `space`."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from pydantic import Field, field_validator, model_validator

from raycls.config.schema import Frozen, PositiveInt, TrialConfig, registered
from raycls.config.space import Param, Space
from raycls.ranking import mode_of

PLATEAU = "plateau"  # the key of `experiment.stop` that holds the plateau rule, not a metric target


class Resources(Frozen):
    """What one trial asks of the cluster: `workers` Ray Train workers, each with these CPUs and GPUs."""

    workers: PositiveInt = 1
    cpus_per_worker: Annotated[float, Field(gt=0)] = 1.0
    # Fractions pack several trials on one GPU (0.25: four small CIFAR models per GPU).
    gpus_per_worker: Annotated[float, Field(ge=0)] = 0.0
    # "auto": use a GPU when gpus_per_worker > 0.
    use_gpu: Union[Literal["auto"], bool] = "auto"

    @model_validator(mode="after")
    def _gpu_consistent(self) -> Resources:
        if self.use_gpu is True and self.gpus_per_worker == 0:
            raise ValueError("use_gpu=true needs gpus_per_worker > 0")
        if self.gpus_per_worker > 1 and self.gpus_per_worker != int(self.gpus_per_worker):
            raise ValueError(f"gpus_per_worker={self.gpus_per_worker}: above 1 it must be a whole number")
        return self

    @property
    def gpu(self) -> bool:
        return self.gpus_per_worker > 0 if self.use_gpu == "auto" else bool(self.use_gpu)


class Objective(Frozen):
    """One objective of a multi-objective search: a metric and which way is better."""

    metric: str
    mode: Literal["max", "min"]


class PlateauRule(Frozen):
    """`experiment.stop: {plateau: {patience: N, min_delta: x}}`: end the whole search once `patience` epochs in
    a row, counted over all trials as they report, have not raised the search's best score (by `metric`) by
    more than `min_delta` (early stopping for the search, beside the time budget and targets)."""

    patience: PositiveInt
    min_delta: Annotated[float, Field(ge=0.0)] = 0.0


# `experiment.constraints: ["latency_ms <= 5", "params <= 2e6"]`: a metric, a comparison, a number.
CONSTRAINT_PATTERN = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*(<=|>=|<|>)\s*([-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?)\s*$")


@dataclass(frozen=True)
class Constraint:
    """One parsed constraint. `violation` is Optuna's convention for constraint values: <= 0 is feasible."""

    metric: str
    op: str
    bound: float

    @classmethod
    def parse(cls, text: str) -> Constraint:
        match = CONSTRAINT_PATTERN.match(text)
        if match is None:
            raise ValueError(
                f"{text!r}: expected `METRIC OP NUMBER` with OP one of <=, >=, <, > (e.g. 'latency_ms <= 5')"
            )
        return cls(match.group(1), match.group(2), float(match.group(3)))

    def violation(self, value: float) -> float:
        """How far `value` is past the bound (> 0: infeasible; a strict bound counts equality as infeasible)."""
        excess = value - self.bound if self.op in ("<=", "<") else self.bound - value
        return excess if self.op in ("<=", ">=") or excess != 0 else 1e-12

    def holds(self, value: float) -> bool:
        return self.violation(value) <= 0

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.bound:g}"


class ExperimentSection(Frozen):
    # None: the YAML file's stem.
    name: str | None = None
    # What ASHA stops trials by and checkpoints are kept by: a metric every epoch reports.
    metric: str = "val_acc"
    mode: Literal["max", "min"] = "max"
    # A multi-objective search: Optuna is told every objective at a trial's end and keeps a Pareto front
    # (test_acc vs params, latency_ms, flops). The first objective reported every epoch is the `metric`
    # when `metric` is not set.
    objectives: list[Objective] = Field(default_factory=list)
    trials: PositiveInt = 8
    # The whole search's wall-clock budget: no new trial starts after it, running ones are stopped.
    time_budget_s: Annotated[float, Field(gt=0)] | None = None
    # Stop the search as soon as any trial reaches one of these, e.g. {val_acc: 0.99} (the direction is
    # the metric's mode: `metric`'s, an objective's, or the metric's usual one); `plateau: {patience, min_delta}`
    # stops it once the best score stops improving (PlateauRule).
    stop: dict[str, Union[float, PlateauRule]] = Field(default_factory=dict)
    # Feasibility rules, e.g. ["latency_ms <= 5", "params <= 2e6"]: set on each Optuna trial (set_constraint),
    # marked per row (`feasible`), and an infeasible trial is never "best".
    constraints: list[str] = Field(default_factory=list)
    # Trials at a time; None: as many as the cluster's CPUs/GPUs fit.
    concurrency: PositiveInt | None = None
    resources: Resources = Resources()
    # Ray Tune retries a failed trial from its last checkpoint this many times.
    max_failures: Annotated[int, Field(ge=0)] = 0
    # Keep this many best checkpoints per trial (by `metric`).
    keep_checkpoints: PositiveInt = 1
    # A smoke test of the whole search (`raycls tune --fast-dev-run`): every trial runs one epoch per stage
    # and two batches of each split (TrialConfig.fast_dev_run, FAST_DEV_BATCHES).
    fast_dev_run: bool = False
    # Where each trial's params, epochs, final metrics, evaluation files and model are mirrored (the
    # leaderboard is the record either way): W&B (the `wandb` section), MLflow (the `mlflow` section).
    tracking: list[Literal["wandb", "mlflow"]] = Field(default_factory=lambda: ["wandb"])

    @model_validator(mode="before")
    @classmethod
    def _metric_from_objectives(cls, data: Any) -> Any:
        """Without an explicit `metric`, ASHA ranks by the first objective an epoch reports (not a held-out
        `test_*` metric nor a cost, which exist only once a trial ends)."""
        from raycls import names

        if not isinstance(data, dict) or "metric" in data or not isinstance(data.get("objectives"), list):
            return data
        for objective in data["objectives"]:
            metric = objective.get("metric") if isinstance(objective, dict) else None
            if (
                isinstance(metric, str)
                and not metric.startswith(names.EVAL_PREFIX)
                and metric not in names.COST_METRICS
            ):
                return {**data, "metric": metric, "mode": data.get("mode", objective.get("mode", "max"))}
        return data

    @field_validator("objectives")
    @classmethod
    def _objectives(cls, objectives: list[Objective]) -> list[Objective]:
        metrics = [o.metric for o in objectives]
        if len(metrics) == 1:
            raise ValueError(f"{metrics}: a multi-objective search needs two or more (one: use metric and mode)")
        if len(set(metrics)) != len(metrics):
            raise ValueError(f"{metrics}: each metric once")
        return objectives

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, stop: Any) -> Any:
        """`plateau` holds a rule; every other key a metric's target number."""
        if not isinstance(stop, dict):
            return stop
        wrong = [
            f"stop.{key}: expected a number (a target), got {value!r}"
            for key, value in stop.items()
            if key != PLATEAU and (isinstance(value, (bool, dict, list, str)) or value is None)
        ]
        if PLATEAU in stop and not isinstance(stop[PLATEAU], dict):
            wrong.append(f"stop.plateau: expected {{patience: N, min_delta: x}}, got {stop[PLATEAU]!r}")
        if wrong:
            raise ValueError("; ".join(wrong))
        return {k: (PlateauRule.model_validate(v) if k == PLATEAU else v) for k, v in stop.items()}

    @field_validator("constraints")
    @classmethod
    def _constraints(cls, constraints: list[str]) -> list[str]:
        problems = []
        for text in constraints:
            try:
                Constraint.parse(text)
            except ValueError as err:
                problems.append(str(err))
        if problems:
            raise ValueError("; ".join(problems))
        return constraints

    @property
    def targets(self) -> dict[str, float]:
        """`stop`'s metric targets (the plateau rule aside)."""
        return {k: float(v) for k, v in self.stop.items() if not isinstance(v, PlateauRule)}

    @property
    def plateau(self) -> PlateauRule | None:
        rule = self.stop.get(PLATEAU)
        return rule if isinstance(rule, PlateauRule) else None

    @property
    def parsed_constraints(self) -> list[Constraint]:
        return [Constraint.parse(text) for text in self.constraints]

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    def direction(self, metric: str) -> Literal["max", "min"]:
        """Which way `metric` is better: the experiment metric's mode, an objective's, or its usual one."""
        if metric == self.metric:
            return self.mode
        return next((o.mode for o in self.objectives if o.metric == metric), mode_of(metric))


class SearchSection(Frozen):
    algorithm: str = "tpe"  # a SAMPLERS name (raycls.search)
    seed: int = 0
    # Trials to try first, as {dotted.path: value} mappings over the space's parameters.
    points_to_evaluate: list[dict[str, Any]] = Field(default_factory=list)
    # Seed TPE with the trials of another experiment in the same storage.
    warm_start: str | None = None
    # Random trials before TPE starts modelling (Optuna's n_startup_trials); None: Optuna's default.
    n_startup_trials: Annotated[int, Field(ge=0)] | None = None
    # How a trial the scheduler stopped early is told to Optuna: pruned (raycls), or complete with its
    # rung score as if final (Ray's OptunaSearch; kept to measure the difference, benchmarks/search_efficiency.py).
    early_stopped_as: Literal["pruned", "complete"] = "pruned"
    _known_sampler = registered("sampler", "algorithm")


class SchedulerSection(Frozen):
    name: str = "asha"  # a TRIAL_SCHEDULERS name (raycls.search)
    # In epochs (counted over a whole chain). None: the trial's epochs, all stages together.
    max_t: PositiveInt | None = None
    grace_period: PositiveInt = 1
    reduction_factor: Annotated[float, Field(gt=1)] = 2.0
    # asha: more than one bracket is asynchronous Hyperband (brackets of different grace periods).
    brackets: PositiveInt = 1
    # median: trials that must have reached an epoch before the median of theirs judges another.
    min_samples: PositiveInt = 3
    # pbt / pb2: every `perturbation_interval` epochs a trial in the bottom `quantile_fraction` clones a top
    # trial's checkpoint and perturbs `mutations` (trial-config paths, in the space's distribution syntax).
    perturbation_interval: PositiveInt = 2
    burn_in: Annotated[int, Field(ge=0)] = 0
    quantile_fraction: Annotated[float, Field(gt=0, le=0.5)] = 0.25
    resample_probability: Annotated[float, Field(ge=0, le=1)] = 0.25
    mutations: dict[str, Param] = Field(default_factory=dict)
    _known_trial_scheduler = registered("trial scheduler", "name")


class WandbSection(Frozen):
    # auto: online when WANDB_API_KEY is set or the user has logged in, else offline.
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    project: str = "raycls"
    entity: str | None = None
    tags: list[str] = Field(default_factory=list)


class MlflowSection(Frozen):
    """MLflow tracking (`experiment.tracking: [mlflow]`): one MLflow run per trial, in one MLflow experiment."""

    # None: MLflow's local file store `<storage>/mlruns` (storage.mlruns_uri); else any MLflow tracking URI
    # (http://host:5000, sqlite:///mlflow.db, databricks).
    tracking_uri: str | None = None
    # The MLflow experiment's name; None: the raycls experiment's.
    experiment: str | None = None
    # Also log each trial's best checkpoint folder as an artefact (`checkpoint/`): models can be large.
    log_checkpoint: bool = True


class AfterExport(Frozen):
    """`after.export`: the picked trials' best models to ONNX (`raycls export`)."""

    format: Literal["onnx"] = "onnx"
    int8: bool = False  # also try int8 copies, shipped only when they keep the accuracy


class AfterPredict(Frozen):
    """`after.predict`: labels with confidence for new images (`raycls predict`), e.g. an unlabelled test set."""

    # Image files, folders, globs, or CSV files of image paths (a path/filepath/file/image column, else the
    # first; relative to the CSV's folder). Relative entries are read like `data.path` (under $RAYCLS_DATA
    # when set, else the space file's folder).
    images: list[str]
    # A .parquet or .csv file name, written under `<experiment>/after/<trial_id>/`; an absolute path as is.
    out: str = "predictions.parquet"
    topk: PositiveInt = 3
    tta: bool = False
    # Make grey images light-on-dark before predicting: true (always), auto (those whose mean is above
    # half-grey: a digit drawn dark on white paper, for a model trained on MNIST), false.
    invert: Union[Literal["auto"], bool] = False

    @field_validator("images", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("images")
    @classmethod
    def _some(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("expected at least one image file, folder, glob or CSV")
        return value

    @field_validator("out")
    @classmethod
    def _format(cls, value: str) -> str:
        if not value.endswith((".parquet", ".csv")):
            raise ValueError(f"{value!r}: predictions are written as .parquet or .csv")
        return value


class AfterSection(Frozen):
    """What `raycls tune` does with the winner once the search ends, before it draws the report. Every step
    is optional (absent or false: skipped); each writes under `<experiment>/after/` (storage.ExperimentPaths)
    and the report shows them. Steps run in the order explore, evaluate, export, predict (raycls.after)."""

    # Which trials: best, or top:K (by the experiment metric, completed trials; raycls.ranking).
    trials: str = "best"
    explore: bool = False  # the data report of `raycls data explore` (class balance, duplicates, leakage)
    evaluate: str | None = None  # an eval suite (default, full): `raycls eval` of the picked trials
    export: AfterExport | None = None
    predict: AfterPredict | None = None

    @field_validator("evaluate", mode="before")
    @classmethod
    def _evaluate_off(cls, value: Any) -> Any:
        if value is True:
            return "default"
        return None if value is False else value

    @field_validator("evaluate")
    @classmethod
    def _suite(cls, value: str | None) -> str | None:
        from raycls.config.schema import check_name

        return None if value is None else check_name("eval suite", value)

    @field_validator("export", mode="before")
    @classmethod
    def _export_switch(cls, value: Any) -> Any:
        return {} if value is True else (None if value is False else value)

    @field_validator("predict", mode="before")
    @classmethod
    def _predict_off(cls, value: Any) -> Any:
        return None if value is False else value

    @field_validator("trials")
    @classmethod
    def _pick(cls, value: str) -> str:
        if value != "best" and not (value.startswith("top:") and value[4:].isdigit() and int(value[4:]) >= 1):
            raise ValueError("expected best or top:K with K >= 1")
        return value

    @property
    def steps(self) -> list[str]:
        """The steps asked for, by name (raycls.after.AFTER_STEPS)."""
        asked = {
            "explore": self.explore,
            "evaluate": self.evaluate is not None,
            "export": self.export is not None,
            "predict": self.predict is not None,
        }
        return [name for name, on in asked.items() if on]


class Experiment(Frozen):
    """A loaded search-space YAML: everything a `raycls tune` run needs besides the CLI flags."""

    source: str
    experiment: ExperimentSection
    search: SearchSection
    scheduler: SchedulerSection
    wandb: WandbSection
    base: TrialConfig
    space: Space
    after: AfterSection = AfterSection()
    mlflow: MlflowSection = MlflowSection()
    # `--set` overrides on trial-config paths: they win over sampled values (and pin those parameters).
    overrides: dict[str, Any] = Field(default_factory=dict)

    @property
    def name(self) -> str:
        assert self.experiment.name is not None  # filled by the loader
        return self.experiment.name

    def as_fast_dev_run(self, *, trials: int = 2) -> Experiment:
        """This search as a smoke test under its own name (so the real experiment's leaderboard and study are
        untouched): `trials` trials of one epoch per stage and two batches per split."""
        section = self.experiment.model_copy(
            update={
                "name": f"{self.name}-fast-dev-run",
                "trials": min(trials, self.experiment.trials),
                "fast_dev_run": True,
            }
        )
        return self.model_copy(update={"experiment": section})

    def with_limits(self, *, trials: int | None = None, time_budget_s: float | None = None) -> Experiment:
        """This search with `--trials` / `--time-budget` from the command line in place of the YAML's."""
        from pydantic import ValidationError

        from raycls.errors import ConfigError

        given = {"trials": trials, "time_budget_s": time_budget_s}
        update = {k: v for k, v in given.items() if v is not None}
        if not update:
            return self
        flags = {"trials": "--trials", "time_budget_s": "--time-budget"}
        try:
            section = ExperimentSection.model_validate({**self.experiment.model_dump(), **update})
        except ValidationError as err:
            raise ConfigError(
                [
                    f"{flags[str(e['loc'][0])]} (experiment.{e['loc'][0]}): {e['msg']}, got {e['input']!r}"
                    for e in err.errors()
                ],
                source=self.source,
            ) from None
        return self.model_copy(update={"experiment": section})

    @property
    def max_t(self) -> int:
        return self.scheduler.max_t or self.base.total_epochs
