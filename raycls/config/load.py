"""YAML -> Experiment, `--set` overrides, and sampled values -> TrialConfig.

Precedence, lowest first: TrialConfig defaults < the YAML's `base` < sampled values < `--set`.
Every problem in a file is reported at once, each as `FILE: dotted.key: what is wrong (what is allowed)`.
"""

from __future__ import annotations

import copy
import json
import os
import re
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from raycls.config.experiment import (
    AfterSection,
    Experiment,
    ExperimentSection,
    MlflowSection,
    SchedulerSection,
    SearchSection,
    WandbSection,
)
from raycls.config.schema import PHASE_CONFIGS, PhaseConfig, TrialConfig
from raycls.config.space import Space, unknown_conditions
from raycls.errors import ConfigError, RegistryError

SECTIONS: dict[str, type[BaseModel]] = {
    "experiment": ExperimentSection,
    "search": SearchSection,
    "scheduler": SchedulerSection,
    "wandb": WandbSection,
    "mlflow": MlflowSection,
    "after": AfterSection,
    "base": TrialConfig,
}
TOP_LEVEL = (*SECTIONS, "space")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


# ----------------------------------------------------------------------------------------------- reading
class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's booleans: only true/false. YAML 1.1 also reads on/off/yes/no as
    booleans, which turns `eval: {on: all}` into the key True."""


YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def load_yaml_text(text: str) -> Any:
    # A safe loader: a YAML file must never be able to construct Python objects.
    return yaml.load(text, Loader=YamlLoader)  # noqa: S506 (YamlLoader is a SafeLoader)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError("no such file (expected a search-space YAML)", source=str(path))
    try:
        raw = load_yaml_text(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"not valid YAML: {err}", source=str(path)) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"top level must be a mapping with keys {', '.join(TOP_LEVEL)}", source=str(path))
    return raw


# ------------------------------------------------------------------------------------------- overrides
def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """`["train.lr=0.01", "model.name=resnet18"]` -> {"train.lr": 0.01, ...}; values are parsed as YAML."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.lr=0.01")
        try:
            overrides[key.strip()] = load_yaml_text(text) if text.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {item!r}: value is not valid YAML ({err})") from None
    return overrides


def set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `a.b.c` in nested dicts, creating missing levels (validation reports unknown keys later).

    In a list (a chain's `phases`) a level is an index or a stage's name: `phases.arcface.phase.margin`.
    """
    _inherit_stage_model(tree, dotted)
    *parents, leaf = dotted.split(".")
    node: Any = tree
    for i, key in enumerate(parents):
        if isinstance(node, list):
            child = _list_item(node, key, dotted, ".".join(parents[:i]))
        else:
            child = node.get(key)
            if child is None:
                child = node[key] = {}
        if not isinstance(child, (dict, list)):
            raise ConfigError(f"{dotted}: {'.'.join(parents[: i + 1])} is a value, not a section")
        node = child
    if isinstance(node, list):
        raise ConfigError(f"{dotted}: {'.'.join(parents)} is a list; name one of its items")
    node[leaf] = value


def _inherit_stage_model(tree: dict[str, Any], dotted: str) -> None:
    """`phases.<stage>.model.<key>` on a stage without a model of its own changes the trial's model *for that
    stage*: the stage starts from a copy of the top-level `model`, not from the defaults (which would make
    it another model, cut off from the previous stage's weights)."""
    parts = dotted.split(".")
    if len(parts) < 4 or parts[0] != "phases" or parts[2] != "model" or not isinstance(tree.get("phases"), list):
        return
    try:
        stage = _list_item(tree["phases"], parts[1], dotted, "phases")
    except ConfigError:
        return  # set_path reports the unknown stage
    if isinstance(stage, dict) and stage.get("model") is None:
        stage["model"] = copy.deepcopy(tree.get("model") or {})


def get_path(tree: dict[str, Any], dotted: str) -> Any:
    """The value at `a.b.c` (list levels by index or stage name, as in `set_path`); KeyError when absent."""
    node: Any = tree
    for i, key in enumerate(dotted.split(".")):
        node = _list_item(node, key, dotted, ".".join(dotted.split(".")[:i])) if isinstance(node, list) else node[key]
    return node


def _list_item(items: list[Any], key: str, dotted: str, where: str) -> Any:
    if key.isdigit() and int(key) < len(items):
        return items[int(key)]
    named = [item for item in items if isinstance(item, dict) and key == _item_name(item)]
    if len(named) == 1:
        return named[0]
    known = ", ".join(str(_item_name(item)) for item in items if isinstance(item, dict))
    raise ConfigError(f"{dotted}: {where} has no item {key!r} (give an index 0..{len(items) - 1} or a name: {known})")


def _item_name(item: dict[str, Any]) -> str | None:
    # A stage is named by `name`, else by its phase's name (as TrialConfig.stages labels it).
    phase = item.get("phase")
    return item.get("name") or (phase.get("name") if isinstance(phase, dict) else None)


def split_overrides(overrides: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Overrides of a top-level section (`experiment.trials=4`) vs of the trial config (`train.lr=0.1`)."""
    sections, trial = {}, {}
    for key, value in overrides.items():
        head = key.split(".", 1)[0]
        if head == "base":
            trial[key.split(".", 1)[1]] = value
        elif head in SECTIONS:
            sections[key] = value
        elif head == "space":
            raise ConfigError(f"--set {key}: the space cannot be overridden; edit the YAML")
        else:
            trial[key] = value
    return sections, trial


# ----------------------------------------------------------------------------------------------- errors
def _model_at(model: type[BaseModel], loc: tuple[Any, ...], raw: Any) -> type[BaseModel] | None:
    """The config class that owns the key at `loc` (to list the allowed keys next to an unknown one)."""
    current: type[BaseModel] | None = model
    for key in loc:
        if current is None:
            return None
        raw = raw.get(key) if isinstance(raw, dict) else None
        field = current.model_fields.get(str(key))
        if field is None:
            return None
        current = _first_model(field.annotation)
        if current is PhaseConfig and isinstance(raw, dict):
            current = PHASE_CONFIGS.get(raw.get("name", "supervised"), PhaseConfig)
    return current


def _first_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _first_model(arg)
        if found is not None:
            return found
    return None


def format_validation_error(
    err: ValidationError, *, section: str, model: type[BaseModel], raw: Any, skip: tuple[str, ...] = ()
) -> list[str]:
    problems = []
    for item in err.errors():
        loc = tuple(str(part) for part in item["loc"] if str(part) not in skip)
        key = ".".join((section, *loc)) if section else ".".join(loc)
        if item["type"] == "extra_forbidden":
            owner = _model_at(model, tuple(loc[:-1]), raw)
            allowed = f"; allowed: {', '.join(owner.model_fields)}" if owner else ""
            problems.append(f"{key}: unknown key{allowed}")
        elif item["type"] == "missing":
            problems.append(f"{key}: required key is missing")
        else:
            message = item["msg"].removeprefix("Value error, ")
            problems.append(f"{key}: {message} (got {item.get('input')!r})")
    return problems


def _validate(model: type[BaseModel], raw: Any, *, section: str) -> tuple[Any, list[str]]:
    try:
        return model.model_validate(raw if raw is not None else {}), []
    except ValidationError as err:
        return None, format_validation_error(err, section=section, model=model, raw=raw)
    except RegistryError as err:  # raised by registry lookups outside pydantic's own error collection
        return None, [f"{section}: {err}"]


# -------------------------------------------------------------------------------------------- loading
def load_experiment(path: str | Path, overrides: Mapping[str, Any] | None = None) -> Experiment:
    """Read and validate a search-space YAML; raise ConfigError listing every problem."""
    source = str(path)
    raw = read_yaml(path)
    problems = [f"{key}: unknown section; allowed: {', '.join(TOP_LEVEL)}" for key in raw if key not in TOP_LEVEL]

    # The file alone first, so that its errors name the file and not an override.
    parsed: dict[str, Any] = {}
    for section, model in SECTIONS.items():
        parsed[section], errs = _validate(model, raw.get(section), section=section)
        problems += errs
    space, errs = _load_space(raw.get("space"), raw.get("base") or {})
    problems += errs
    if problems:
        raise ConfigError(problems, source=source)

    section_overrides, trial_overrides = split_overrides(overrides or {})
    if overrides:
        parsed, space = _apply_overrides(raw, parsed, space, section_overrides, trial_overrides)

    parsed["base"], trial_overrides = _absolute_data_paths(parsed["base"], trial_overrides, Path(path).parent)
    experiment = parsed["experiment"]
    name = experiment.name or Path(path).stem
    if not NAME_PATTERN.match(name):
        raise ConfigError(f"experiment.name: {name!r} must match {NAME_PATTERN.pattern}", source=source)
    return Experiment(
        source=source,
        experiment=experiment.model_copy(update={"name": name}),
        search=parsed["search"],
        scheduler=parsed["scheduler"],
        wandb=parsed["wandb"],
        mlflow=parsed["mlflow"],
        after=_absolute_predict_paths(
            parsed["after"],
            Path(path).parent,
            typed=any(k == "after" or k.startswith("after.predict") for k in section_overrides),
        ),
        base=parsed["base"],
        space=space,
        overrides=trial_overrides,
    )


DATA_PATHS = ("path", "root")  # data.path, data.root


def _absolute_data_paths(
    base: TrialConfig, overrides: dict[str, Any], space_dir: Path
) -> tuple[TrialConfig, dict[str, Any]]:
    """Trials run elsewhere (Ray Tune gives each its own working folder), so data paths are made absolute
    here, once, and the absolute path is what the serialized config carries to trials and rows."""
    data = {
        key: resolve_file_path(key, value, space_dir)
        for key in DATA_PATHS
        if isinstance(value := getattr(base.data, key), str) and not _is_uri(value)
    }
    # `--set` values were typed in a shell: relative to where the command runs, as the shell completes them.
    pinned = {
        key: os.path.abspath(os.path.expanduser(value))
        if key in {f"data.{k}" for k in DATA_PATHS} and isinstance(value, str) and not _is_uri(value)
        else value
        for key, value in overrides.items()
    }
    return base.model_copy(update={"data": base.data.model_copy(update=data)}), pinned


def _absolute_predict_paths(after: AfterSection, space_dir: Path, *, typed: bool) -> AfterSection:
    """`after.predict.images` are read after the search: absolute here, read like `data.path` (in the file:
    under $RAYCLS_DATA when set, else the space file's folder; `typed` on a command line: the working folder)."""
    if after.predict is None:
        return after
    images = [
        value
        if _is_uri(value)
        else os.path.abspath(os.path.expanduser(value))
        if typed
        else resolve_file_path("path", value, space_dir)
        for value in after.predict.images
    ]
    return after.model_copy(update={"predict": after.predict.model_copy(update={"images": images})})


def resolve_file_path(key: str, value: str, space_dir: Path) -> str:
    """A path written in a space file, made absolute: an absolute path as it is; a relative `data.path` under
    $RAYCLS_DATA when that is set (the folder holding the datasets, as for data.root), else under the space
    file's folder, never the working folder (a shipped space must not depend on where the command runs).
    A relative `data.root` is under the space file's folder."""
    path = Path(value).expanduser()
    if path.is_absolute():
        return str(path)
    data_home = os.environ.get("RAYCLS_DATA")
    anchor = Path(data_home).expanduser() if key == "path" and data_home else space_dir
    return os.path.abspath(anchor / path)


def _is_uri(value: str) -> bool:
    return "://" in value


def _load_space(raw_space: Any, raw_base: dict[str, Any]) -> tuple[Space, list[str]]:
    if raw_space is None:
        return Space(), []
    if not isinstance(raw_space, dict):
        return Space(), ["space: expected a mapping of dotted.path -> {type: ..., ...}"]
    problems = []
    for path, spec in raw_space.items():
        if not isinstance(spec, dict) or "type" not in spec:
            problems.append(
                f"space.{path}: expected a mapping with a `type` (uniform, loguniform, int or choice), got {spec!r}"
            )
    if problems:
        return Space(), problems + [f"space: {problem}" for problem in unknown_conditions(raw_space)]
    try:
        space = Space(params=raw_space)
    except ValidationError as err:
        # Drop pydantic's internal `params` level and the union tag from the location.
        tags = ("params", "uniform", "loguniform", "int", "choice")
        problems = format_validation_error(err, section="space", model=Space, raw=raw_space, skip=tags)
        if any(item["loc"] for item in err.errors()):  # a field failed, so Space's own checks did not run
            problems += [f"space: {problem}" for problem in unknown_conditions(raw_space)]
        return Space(), problems
    return space, _check_space_paths(space, raw_base)


def _check_space_paths(space: Space, raw_base: dict[str, Any]) -> list[str]:
    """Each parameter path must exist in the TrialConfig and accept the distribution's values."""
    problems = []
    for path, param in space.params.items():
        candidates = param.values if hasattr(param, "values") else [param.low, param.high]
        for value in candidates:
            tree = copy.deepcopy(raw_base)
            try:
                set_path(tree, path, value)
            except ConfigError as err:
                problems.append(f"space.{err.problems[0]}")
                break
            _, errs = _validate(TrialConfig, tree, section="")
            if errs:
                problems.append(f"space.{path}: value {value!r} does not fit the trial config: {errs[0]}")
                break
    return problems


def _apply_overrides(
    raw: dict[str, Any],
    parsed: dict[str, Any],
    space: Space,
    section_overrides: dict[str, Any],
    trial_overrides: dict[str, Any],
) -> tuple[dict[str, Any], Space]:
    tree = copy.deepcopy(raw)
    tree.setdefault("base", {})
    for key, value in section_overrides.items():
        set_path(tree, key, value)
    for key, value in trial_overrides.items():
        set_path(tree["base"], key, value)
    problems: list[str] = []
    for section, model in SECTIONS.items():
        parsed[section], errs = _validate(model, tree.get(section), section=section)
        problems += errs
    if problems:
        given = ", ".join(f"{k}={v!r}" for k, v in {**section_overrides, **trial_overrides}.items())
        raise ConfigError(problems, source=f"--set {given}")
    return parsed, space


# -------------------------------------------------------------------------------------------- trials
def resolve_trial(experiment: Experiment, sampled: Mapping[str, Any] | None = None) -> TrialConfig:
    """The base config with sampled values, then `--set` overrides, applied: one trial's full config."""
    tree = experiment.base.to_dict()
    for key, value in {**(sampled or {}), **experiment.overrides}.items():
        set_path(tree, key, value)
    config, errs = _validate(TrialConfig, tree, section="")
    if errs:
        raise ConfigError(errs, source=f"{experiment.source} (trial with {dict(sampled or {})})")
    return config.fast_dev_run() if experiment.experiment.fast_dev_run else config


def config_of_row(row: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> TrialConfig:
    """The TrialConfig a leaderboard row ran with (its `config_json`), `--set` overrides applied: the one way
    back from a row to its config (replay, eval, export, serve, references), with the same error messages as
    a YAML's."""
    what = f"trial {row.get('experiment')}/{row.get('trial_id')}"
    if not row.get("config_json"):
        raise ConfigError("the row has no config_json (its sampled values were not a valid config)", source=what)
    tree = json.loads(row["config_json"])
    for key, value in (overrides or {}).items():
        set_path(tree, key, value)
    config, errs = _validate(TrialConfig, tree, section="")
    if errs:
        raise ConfigError(errs, source=f"{what} (with {dict(overrides)})" if overrides else what)
    return config
