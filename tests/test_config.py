"""Config loading, every bad-input case, --set overrides, JSON round-trip, and the define-by-run space."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from pydantic import ValidationError

from raycls.cli import main
from raycls.config import TrialConfig, load_experiment, parse_overrides, resolve_trial, suggest
from raycls.config.load import get_path
from raycls.config.sampling import sample_configs
from raycls.errors import ConfigError
from raycls.phases.base import check_experiment_metric, check_stages

from .conftest import REPO, write_yaml

GOOD = """
experiment: {name: t, trials: 4}
base:
  data: {name: digits}
  train: {epochs: 2, optimizer: sgd}
space:
  train.optimizer: {type: choice, values: [sgd, adamw]}
  train.lr: {type: loguniform, low: 1.0e-4, high: 1.0e-1}
  train.momentum: {type: uniform, low: 0.8, high: 0.99, when: {train.optimizer: sgd}}
  model.width: {type: int, low: 8, high: 32, step: 8}
"""


@pytest.fixture
def good(tmp_path: Path) -> Path:
    return write_yaml(tmp_path / "good.yaml", GOOD)


def test_loads_typed_and_frozen(good: Path) -> None:
    exp = load_experiment(good)
    assert exp.name == "t" and exp.experiment.trials == 4
    assert exp.base.train.optimizer == "sgd" and exp.base.train.epochs == 2
    assert list(exp.space.params) == ["train.optimizer", "train.lr", "train.momentum", "model.width"]
    with pytest.raises(ValidationError, match="frozen"):
        exp.base.train.lr = 1.0  # frozen


def test_name_defaults_to_file_stem(tmp_path: Path) -> None:
    assert load_experiment(write_yaml(tmp_path / "my-exp.yaml", "base: {}")).name == "my-exp"


@pytest.mark.parametrize("path", sorted((REPO / "search_spaces").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_space_loads_and_samples(path: Path) -> None:
    exp = load_experiment(path)
    for params, config in sample_configs(exp, 5, seed=1):
        assert isinstance(config, TrialConfig)
        for key, value in params.items():
            assert get_path(config.to_dict(), key) == value
    check_experiment_metric(exp)  # every stage reports the metric ASHA ranks by
    check_stages(exp)  # each stage's phase can run on its models (token_distill: ViTs)


@pytest.mark.parametrize("path", sorted((REPO / "search_spaces").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_space_passes_space_validate_and_says_what_it_is(path: Path, capsys) -> None:
    try:
        main(["space", "validate", str(path)])
    except SystemExit as exited:  # typer exits 0, or returns
        assert exited.code in (0, None)
    assert f"OK {path}" in " ".join(capsys.readouterr().out.split())
    header = path.read_text().split("\nexperiment:")[0]
    assert header.startswith(f"# {path.stem}:") and "raycls tune search_spaces/" in header  # what it is, how to run it


BAD = [
    ("base: {train: {lrr: 0.1}}", "base.train.lrr", "unknown key; allowed: epochs"),
    ("base: {train: {lr: fast}}", "base.train.lr", "valid number"),
    ("base: {train: {lr: -1}}", "base.train.lr", "greater than 0"),
    ("base: {data: {name: imagenet22k}}", "base.data.name", "unknown dataset 'imagenet22k'; known: cifar10"),
    ("base: {model: {name: resnet1800}}", "base.model.name", "unknown model 'resnet1800'"),
    ("base: {train: {optimizer: adagrad}}", "base.train.optimizer", "known: adam, adamw, lamb, lars, sgd"),
    ("base: {phase: {name: arcfaze}}", "base.phase", "unknown phase 'arcfaze'"),
    ("experiment: {mode: maximize}", "experiment.mode", "'max' or 'min'"),
    ("experimnt: {}", "experimnt", "unknown section"),
    ("space: {train.lr: {type: uniform, low: 0.1, high: 0.01}}", "space.train.lr", "low=0.1 must be < high=0.01"),
    ("space: {train.lr: {type: loguniform, low: 0, high: 0.1}}", "space.train.lr", "loguniform needs low > 0"),
    (
        "space: {train.lr: {type: gaussian, low: 0, high: 1}}",
        "space.train.lr",
        "expected tags: 'uniform', 'loguniform', 'int', 'choice'",
    ),
    ("space: {train.lr: [0.1, 0.2]}", "space.train.lr", "expected a mapping with a `type`"),
    ("space: {train.lrr: {type: uniform, low: 0.1, high: 0.2}}", "space.train.lrr", "does not fit the trial config"),
    ("space: {model.name: {type: choice, values: [resnet18, nonet]}}", "space.model.name", "unknown model 'nonet'"),
    (
        "space: {train.momentum: {type: uniform, low: 0.8, high: 0.9, when: {train.optimizer: sgd}}}",
        "space",
        "condition on 'train.optimizer', which is not a parameter",
    ),
]


@pytest.mark.parametrize(("text", "key", "expected"), BAD, ids=[b[1] for b in BAD])
def test_bad_input_names_file_key_and_rule(tmp_path: Path, text: str, key: str, expected: str) -> None:
    path = write_yaml(tmp_path / "bad.yaml", text)
    with pytest.raises(ConfigError) as info:
        load_experiment(path)
    message = str(info.value)
    assert str(path) in message and key in message and expected in message, message


def test_every_problem_reported_at_once(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "bad.yaml", "base: {train: {lr: -1, epochs: 0}, data: {name: nope}}")
    with pytest.raises(ConfigError) as info:
        load_experiment(path)
    assert len(info.value.problems) == 3


def test_not_yaml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_experiment(write_yaml(tmp_path / "x.yaml", "base: {train: [}"))
    with pytest.raises(ConfigError, match="no such file"):
        load_experiment(tmp_path / "missing.yaml")


def test_yaml_cannot_build_python_objects(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "x.yaml", "base: !!python/object/apply:os.system ['echo pwned']")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_experiment(path)


def test_overrides_win_and_are_checked(good: Path) -> None:
    exp = load_experiment(good, parse_overrides(["train.lr=0.5", "experiment.trials=2", "model.width=16"]))
    assert exp.experiment.trials == 2
    config = resolve_trial(exp, {"train.lr": 0.001, "model.width": 24})
    assert config.train.lr == 0.5 and config.model.width == 16  # --set beats sampled values
    with pytest.raises(ConfigError, match=r"--set .*base\.train\.lrr: unknown key"):
        load_experiment(good, parse_overrides(["train.lrr=1"]))
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_overrides(["train.lr"])


def test_trial_config_json_round_trip_exact(good: Path) -> None:
    exp = load_experiment(good)
    for _, config in sample_configs(exp, 10, seed=3):
        text = config.to_json()
        again = TrialConfig.from_json(text)
        assert again == config and again.to_json() == text


def test_define_by_run_conditions_with_fixed_trial(good: Path) -> None:
    space = load_experiment(good).space
    sgd = suggest(
        optuna.trial.FixedTrial({"train.optimizer": "sgd", "train.lr": 0.01, "train.momentum": 0.9, "model.width": 16}),
        space,
    )
    assert sgd == {"train.optimizer": "sgd", "train.lr": 0.01, "train.momentum": 0.9, "model.width": 16}
    adamw = suggest(optuna.trial.FixedTrial({"train.optimizer": "adamw", "train.lr": 0.01, "model.width": 8}), space)
    assert "train.momentum" not in adamw  # conditional parameter not sampled
    pinned = suggest(
        optuna.trial.FixedTrial({"train.lr": 0.01, "train.momentum": 0.9, "model.width": 8}),
        space,
        fixed={"train.optimizer": "sgd"},
    )
    assert "train.optimizer" not in pinned and pinned["train.momentum"] == 0.9


def test_conditional_parameters_in_sampling(good: Path) -> None:
    for params, _ in sample_configs(load_experiment(good), 30, seed=0):
        assert ("train.momentum" in params) == (params["train.optimizer"] == "sgd")


def test_cli_bad_input_exit_code_2_no_traceback(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "bad.yaml", "base: {train: {lr: -1}}")
    result = subprocess.run(
        [sys.executable, "-m", "raycls.cli", "space", "validate", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    output = result.stdout + result.stderr
    assert "base.train.lr" in output and "bad.yaml" in output and "Traceback" not in output


def test_cli_space_validate_prints_samples() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "raycls.cli",
            "space",
            "validate",
            str(REPO / "search_spaces" / "quickstart.yaml"),
            "--samples",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "sample 2:" in result.stdout and "train.lr" in result.stdout
