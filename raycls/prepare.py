"""From a search-space file to an Experiment ready to run: one path for `raycls tune`, `raycls train`,
`raycls space validate` and `run_tune`, so each checks the same things in the same order.

    load the YAML (--set applied, once) -> the fast-dev-run variant -> every stage reports the metric
    -> each model takes the input size -> OOD and shift datasets fit its images
    -> this machine has the data and the pretrained weights
    -> leaderboard references resolved (teacher / init: {from: EXPERIMENT, pick: best})
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from raycls.config import load_experiment, parse_overrides, resolve_trial
from raycls.config.experiment import Experiment
from raycls.config.schema import ModelConfig, TrialConfig
from raycls.errors import ConfigError
from raycls.phases.base import check_experiment_metric, check_objectives, check_stages
from raycls.references import resolve_references
from raycls.search import check_schedule, check_search
from raycls.storage import is_local


def prepare_experiment(
    source: str | Path | Experiment,
    overrides: Sequence[str] | Mapping[str, Any] | None = None,
    *,
    storage: str | None = None,
    fast_dev_run: bool = False,
    environment: bool = True,
) -> Experiment:
    """`storage`: where references are looked up (None: left unresolved, as `space validate` does).
    `environment`: also refuse what this machine lacks (data paths, pretrained weights); `space validate`
    checks the file alone and reports those as warnings (`environment_problems`)."""
    if isinstance(source, Experiment):
        experiment = source
    else:
        pinned = dict(overrides) if isinstance(overrides, Mapping) else parse_overrides(list(overrides or []))
        experiment = load_experiment(source, pinned)
    if fast_dev_run:  # one epoch per stage; the loop runs two batches per split
        experiment = experiment.as_fast_dev_run()
    # Before anything starts: a chain whose stages do not all report the experiment metric is refused.
    check_experiment_metric(experiment)
    check_objectives(experiment)  # objectives and stop targets name metrics a trial reports
    check_search(experiment)  # a grid enumerates choices, and has enough of them
    check_schedule(experiment)  # pbt / pb2 perturb trial-config paths their values fit
    check_stages(experiment)  # what each phase can run on (token_distill: ViTs only)
    check_loader(experiment)  # data.loader: stream reads image files only
    check_progressive_freeze(experiment)  # progressive unfreezing on one worker per trial
    check_input_sizes(experiment)  # each model a trial builds takes the images' size (ViTs: a fixed one)
    check_model_modules(experiment)  # model.modules fit their models (CNN modules on CNNs, ...)
    check_eval_sets(experiment)  # OOD and shift datasets have the trial's channels (shift sets: its classes)
    if environment:
        problems = environment_problems(experiment)
        if problems:
            raise ConfigError(problems, source=experiment.source)
    return resolve_references(experiment, storage) if storage is not None else experiment


def check_loader(experiment: Experiment) -> None:
    """`data.loader: stream` on a dataset held as arrays (MNIST, CIFAR) is refused before any trial starts."""
    from raycls.data.datasets import DATASETS
    from raycls.data.splits import streamable

    data = experiment.base.data
    if data.loader == "stream" and DATASETS.get(data.name).list_files is None:
        raise ConfigError(
            [
                f"data.loader: stream needs a dataset of image files ({', '.join(streamable())}); "
                f"data.name {data.name!r} is read into memory whole: use loader memory or auto"
            ],
            source=experiment.source,
        )


def check_progressive_freeze(experiment: Experiment) -> None:
    """`train.freeze: progressive` changes which parameters train from epoch to epoch; DDP fixes the set it
    synchronises when it wraps the model, so such a trial runs on one worker."""
    workers = experiment.experiment.resources.workers
    progressive = [s.label for s in experiment.base.stages if s.train.freeze == "progressive"]
    if workers > 1 and progressive:
        where = "train.freeze" if len(experiment.base.stages) == 1 else f"phases {', '.join(progressive)}: train.freeze"
        raise ConfigError(
            [f"{where}: progressive trains on one worker per trial; experiment.resources.workers is {workers}"],
            source=experiment.source,
        )


# ---------------------------------------------------------------------------------------------- models
MODEL_NAME = "model.name"  # a choice over it puts each of its values in every trial that samples it


def models_to_check(experiment: Experiment) -> list[tuple[str, ModelConfig, TrialConfig]]:
    """Each distinct model a trial will build whose config is fixed before sampling, with the dotted key a user
    writes for it and the trial config it is built in: every stage's model and teacher model in the base (with
    --set), and again for each value of a `model.name` choice (prefixed `space.model.name value '...': `)."""
    variants = [("", resolve_trial(experiment))]
    param = experiment.space.params.get(MODEL_NAME)
    for value in getattr(param, "values", []) if MODEL_NAME not in experiment.overrides else []:
        variants.append((f"space.{MODEL_NAME} value {value!r}: ", resolve_trial(experiment, {MODEL_NAME: value})))
    found: dict[tuple[str, str], tuple[str, ModelConfig, TrialConfig]] = {}
    for prefix, config in variants:
        for key, model in stage_models(config):  # a model the choice leaves alone is checked once
            found.setdefault((key, model.model_dump_json()), (prefix + key, model, config))
    return list(found.values())


def stage_models(config: TrialConfig) -> list[tuple[str, ModelConfig]]:
    """Each stage's model and teacher model, under the dotted key a user writes for it."""
    models = []
    for i, stage in enumerate(config.stages):
        own = config.phases is not None and config.phases[i].model is not None
        models.append((f"phases.{i}.model" if own else "model", stage.model))
        teacher = getattr(stage.phase, "teacher_model", None)
        if teacher is not None:
            models.append(
                (f"{'phases.' + str(i) + '.' if config.phases is not None else ''}phase.teacher_model", teacher)
            )
    return models


def check_input_sizes(experiment: Experiment) -> None:
    """A model that cannot take the images' size (EVA, Swin V2 at 32 px) is refused with the fix, instead of
    every trial tracing back inside timm. Teachers are left out: token_distill resizes for its teacher."""
    from raycls.data.datasets import DATASETS
    from raycls.models.preflight import input_size_problem

    problems: list[str] = []
    for key, model, config in models_to_check(experiment):
        size = DATASETS.get(config.data.name).image_size(config.data)  # None: known only once read
        problem = None if size is None or key.endswith("teacher_model") else input_size_problem(model, size)
        if problem:
            problems.append(f"{key}.name: {problem}")
    if problems:
        raise ConfigError(problems, source=experiment.source)


def check_model_modules(experiment: Experiment) -> None:
    """`model.modules` that do not fit their model (CBAM on a ViT, ToMe on a CNN, a stage index out of range)
    are refused under the model's key before any trial starts."""
    from raycls.data.datasets import DATASETS
    from raycls.models.preflight import modules_problem

    problems: list[str] = []
    for key, model, config in models_to_check(experiment):
        size = DATASETS.get(config.data.name).image_size(config.data)
        problem = None if size is None else modules_problem(model, size)
        if problem:  # the modules name themselves `model.modules.<name>`; a stage's model has its own key
            problems.append(problem.replace("model.modules", f"{key}.modules") if key != "model" else problem)
    if problems:
        raise ConfigError(problems, source=experiment.source)


def check_eval_sets(experiment: Experiment) -> None:
    """An OOD or shift set that is a dataset of other channels than the trial's (CIFAR-10 beside MNIST), or a
    shift set of other classes (Fashion-MNIST beside MNIST), is refused before any trial starts: each trial's
    evaluation would otherwise fail it after training, or score unrelated labels. Known from the dataset
    registry; classes only where both datasets have fixed ones (a folder's are read with it)."""
    from raycls.data.datasets import DATASETS
    from raycls.evaluate.suite import set_channels_problem, shift_classes_problem

    config = resolve_trial(experiment)
    trial = DATASETS.get(config.data.name)
    checked: list[str | None] = []  # one answer per check, None where it passed
    for key, sets in (("eval.ood", config.eval.ood), ("eval.shift", config.eval.shift)):
        for name in (n for n in sets if n in DATASETS):  # the generated sets are made for any model
            checked.append(set_channels_problem(name, trial.channels, key=key))
            found = DATASETS.get(name).classes
            if key == "eval.shift" and found is not None and trial.classes is not None:
                checked.append(shift_classes_problem(found, trial.classes, what=f"{key}: {name}"))
    problems = [p for p in checked if p]
    if problems:
        raise ConfigError(problems, source=experiment.source)


# ----------------------------------------------------------------------------------------- environment
def environment_problems(experiment: Experiment) -> list[str]:
    """What this machine lacks for the experiment: data paths that do not exist, pretrained weights that are
    not in the local caches. Checked without the network, before any trial starts."""
    return data_path_problems(experiment) + weights_problems(experiment) + after_path_problems(experiment)


def after_path_problems(experiment: Experiment) -> list[str]:
    """`after.predict.images` that match nothing: said before the search, not after hours of it."""
    import glob

    predict = experiment.after.predict
    if predict is None:
        return []
    return [
        f"after.predict.images: {image} does not exist and matches no file as a glob (relative entries are read "
        "under $RAYCLS_DATA when that is set, else under the space file's folder)"
        for image in predict.images
        if is_local(image) and not Path(image).exists() and not glob.glob(image, recursive=True)
    ]


def data_path_problems(experiment: Experiment) -> list[str]:
    config = resolve_trial(experiment)
    path = config.data.path
    if path is None or not is_local(path) or Path(path.removeprefix("file://")).exists():
        return []
    given = "--set data.path" if "data.path" in experiment.overrides else "data.path"
    return [
        f"{given}: {path} does not exist (a relative data.path in a space file is read under $RAYCLS_DATA "
        f"when that is set, else under the space file's folder; a --set one under the working folder)"
    ]


def weights_problems(experiment: Experiment) -> list[str]:
    from raycls.models.preflight import weights_problem

    problems = [(key, weights_problem(model)) for key, model, _ in models_to_check(experiment)]
    return [f"{key}.pretrained: {problem}" for key, problem in problems if problem]
