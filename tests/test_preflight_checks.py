"""The checks run before any trial starts (raycls.prepare), and what a search says when it ends: issue 26's
items 7-13. Real YAML files, real timm models on the meta device, the real Hugging Face cache lookup, a real
local Ray for the one search."""

from __future__ import annotations

import re
import time
from pathlib import Path
from types import SimpleNamespace

import optuna
import pyarrow as pa
import pytest
import torch

from raycls.cli import main
from raycls.config import load_experiment, resolve_trial
from raycls.config.schema import ModelConfig
from raycls.errors import ConfigError
from raycls.prepare import prepare_experiment

from .conftest import REPO, write_yaml

DIGITS = """
experiment: {name: tiny, trials: 2, concurrency: 2}
wandb: {mode: disabled}
base:
  data: {name: digits, val_fraction: 0.2}
  model: {name: small_cnn, width: 8}
  train: {epochs: 1, batch_size: 64, warmup_epochs: 0}
  eval: {on: none}
space:
  train.lr: {type: loguniform, low: 1.0e-3, high: 1.0e-2}
"""


def exit_code(argv: list[str]) -> int:
    try:
        main(argv)
    except SystemExit as exited:
        return int(exited.code or 0)
    return 0


def said(capsys: pytest.CaptureFixture[str]) -> str:
    out = capsys.readouterr()
    return " ".join((out.out + out.err).split())


# ------------------------------------------------------------------------ 7: a search with nothing to show
@pytest.mark.slow
def test_a_search_whose_trials_all_fail_exits_1_and_says_so_last(ray_local, tmp_path: Path, capsys) -> None:
    """Two trials that fail at run time (a data folder that exists but holds no class folders): exit 1, and
    the last line says no trial completed, how many failed and the first error."""
    space = write_yaml(tmp_path / "tiny.yaml", DIGITS)
    (tmp_path / "no-images").mkdir()
    code = exit_code(  # on the session's Ray (`ray_local`): `raycls tune` keeps a Ray it finds running
        [
            "tune",
            str(space),
            "--storage",
            str(tmp_path / "results"),
            "--no-report",
            "--set",
            "data.name=folder",
            "--set",
            f"data.path={tmp_path / 'no-images'}",
        ]
    )
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert code == 1, lines[-5:]
    assert lines[-1].startswith("no trial completed: 2 failed (first error:") and "no class subfolders" in lines[-1]


# --------------------------------------------------------------------------------- 8: data paths
def test_a_relative_data_path_is_read_under_the_space_files_folder(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "spaces" / "images").mkdir(parents=True)
    space = write_yaml(tmp_path / "spaces" / "s.yaml", "base: {data: {name: folder, path: images}}")
    monkeypatch.delenv("RAYCLS_DATA", raising=False)
    monkeypatch.chdir(tmp_path)  # not the working folder
    experiment = prepare_experiment(space)
    expected = str(tmp_path / "spaces" / "images")
    assert experiment.base.data.path == expected
    assert f'"path":"{expected}"' in resolve_trial(experiment).to_json()  # what trials and rows see


def test_a_relative_data_path_is_read_under_raycls_data_when_set(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "datasets" / "images").mkdir(parents=True)
    space = write_yaml(tmp_path / "s.yaml", "base: {data: {name: folder, path: images}}")
    monkeypatch.setenv("RAYCLS_DATA", str(tmp_path / "datasets"))
    assert prepare_experiment(space).base.data.path == str(tmp_path / "datasets" / "images")
    absolute = write_yaml(tmp_path / "a.yaml", f"base: {{data: {{name: folder, path: {tmp_path / 'datasets'}}}}}")
    assert load_experiment(absolute).base.data.path == str(tmp_path / "datasets")  # absolute: as it is


def test_a_missing_data_path_exits_2_before_any_trial_naming_file_key_and_path(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.delenv("RAYCLS_DATA", raising=False)
    space = write_yaml(tmp_path / "s.yaml", DIGITS.replace("name: digits", "name: folder, path: missing-images"))
    started = time.perf_counter()
    code = exit_code(["tune", str(space), "--storage", str(tmp_path / "results")])
    message = said(capsys)
    assert code == 2 and time.perf_counter() - started < 30, message
    assert str(space) in message and "data.path" in message and str(tmp_path / "missing-images") in message
    assert not (tmp_path / "results").exists()  # refused before Ray, before any trial


def test_the_shipped_imagenette_space_finds_its_data_under_raycls_data(
    shared_data: Path, monkeypatch, tmp_path: Path
) -> None:
    """A fresh clone anywhere: RAYCLS_DATA names the datasets' folder, the space names its dataset in it."""
    monkeypatch.setenv("RAYCLS_DATA", str(shared_data))
    monkeypatch.chdir(tmp_path)
    experiment = prepare_experiment(REPO / "search_spaces" / "finetune-imagenette.yaml")
    assert experiment.base.data.path == str(shared_data / "imagenette-mini")


# ------------------------------------------------------------------------------ 9: input sizes
def test_a_model_that_cannot_take_the_image_size_is_refused_with_the_fix(tmp_path: Path, capsys) -> None:
    """EVA-02 is built for 224 px (patch 14): on 8 px digits it would trace back inside timm in every trial."""
    space = write_yaml(tmp_path / "tiny.yaml", DIGITS)
    code = exit_code(
        ["tune", str(space), "--storage", str(tmp_path / "results"), "--set", "model.name=eva02_tiny_patch14_224"]
    )
    message = said(capsys)
    assert code == 2 and str(space) in message and "model.name: eva02_tiny_patch14_224 cannot take 8 px" in message
    assert "data.image_size: 224" in message and "Traceback" not in message
    assert not (tmp_path / "results").exists()


def test_each_choice_of_model_name_is_checked_and_img_size_is_offered_where_it_builds(tmp_path: Path) -> None:
    space = write_yaml(
        tmp_path / "s.yaml",
        DIGITS.replace("name: digits", "name: cifar10")
        + "  model.name: {type: choice, values: [small_cnn, swinv2_cr_tiny_ns_224]}\n",
    )
    with pytest.raises(ConfigError) as info:
        prepare_experiment(space, environment=False)
    [problem] = info.value.problems
    assert problem.startswith("space.model.name value 'swinv2_cr_tiny_ns_224': model.name:") and "32 px" in problem
    assert "data.image_size: 224" in problem and "model.kwargs: {img_size: 32}" in problem
    fixed = prepare_experiment(space, ["model.kwargs={img_size: 32}"], environment=False)  # the fix works
    assert fixed.overrides["model.kwargs"] == {"img_size": 32}


# ------------------------------------------------------------------------------ 10: pretrained weights
@pytest.fixture
def empty_weight_caches(tmp_path: Path, monkeypatch) -> None:
    """No weights on this machine, whatever the developer's own caches hold."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))


def test_teacher_weights_missing_offline_name_the_teachers_key_at_once(
    tmp_path: Path, capsys, empty_weight_caches
) -> None:
    space = write_yaml(
        tmp_path / "kd.yaml",
        DIGITS.replace(
            "  eval: {on: none}",
            """  eval: {on: none}
  phase: {name: distill, teacher_model: {name: resnet18, pretrained: true}}""",
        ),
    )
    started = time.perf_counter()
    code = exit_code(["tune", str(space), "--storage", str(tmp_path / "results")])
    message = said(capsys)
    assert code == 2 and time.perf_counter() - started < 20, message  # no network retries
    assert "phase.teacher_model.pretrained: the weights of resnet18" in message and str(space) in message
    assert (
        "HF_HOME" in message
        and "pretrained: false" in message
        and not re.search(r"(?<!teacher_)model\.pretrained", message)
    )


def test_weights_in_the_hugging_face_cache_are_found(tmp_path: Path, empty_weight_caches) -> None:
    """The cache layout huggingface_hub itself reads: refs/main names the snapshot holding the file."""
    from raycls.models.preflight import weights_problem

    config = ModelConfig(name="resnet18", pretrained=True)
    assert weights_problem(config) is not None
    repo = tmp_path / "hf" / "models--timm--resnet18.a1_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "model.safetensors").write_bytes(b"")
    assert weights_problem(config) is None


# -------------------------------------------------------------------- 11: every problem at once, true hints
def test_space_validate_lists_a_bad_field_and_a_condition_on_an_unknown_parameter_together(
    tmp_path: Path, capsys
) -> None:
    space = write_yaml(
        tmp_path / "s.yaml",
        """
space:
  train.lr: {type: loguniform, low: -1.0, high: 1.0e-1}
  train.momentum: {type: uniform, low: 0.8, high: 0.99, when: {train.optimizr: sgd}}
""",
    )
    assert exit_code(["space", "validate", str(space)]) == 2
    message = said(capsys)
    assert "2 problems" in message and "space.train.lr: loguniform needs low > 0" in message
    assert "train.momentum: condition on 'train.optimizr', which is not a parameter of the space" in message


def test_an_ood_set_of_other_channels_suggests_only_registered_sets() -> None:
    from raycls.data.datasets import DATASETS
    from raycls.evaluate.suite import GENERATED_OOD, registered_set

    # The evaluation's part registered_set reads: 3-channel test images (digits are 1-channel).
    evaluation = SimpleNamespace(
        test=SimpleNamespace(images=torch.zeros(2, 3, 8, 8, dtype=torch.uint8)), data_config=None
    )
    with pytest.raises(ConfigError) as info:
        registered_set(evaluation, "digits", key="eval.ood")
    message = str(info.value)
    suggested = set(re.findall(r"[a-z0-9_]+", " ".join(re.findall(r"\(([^)]*)\)", message.split("; ", 1)[1]))))
    suggested -= {"made", "with", "any", "channels"}
    assert "svhn" not in message and suggested and suggested <= set(DATASETS.names()) | set(GENERATED_OOD.names())


# --------------------------------------------------------------------------------------- 13: cosmetics
def test_a_grid_search_tells_its_last_point_without_study_stop() -> None:
    """Optuna's GridSampler calls Study.stop when the grid is used up, which raises outside optimize():
    the last point's tell failed (raycls warned and Optuna kept the trial RUNNING)."""
    from raycls.config.experiment import SearchSection
    from raycls.config.space import Space
    from raycls.search import SAMPLERS

    space = Space(params={"model.width": {"type": "choice", "values": [8, 16]}})
    study = optuna.create_study(sampler=SAMPLERS.create("grid", SearchSection(algorithm="grid"), space))
    for _ in range(2):
        trial = study.ask()
        study.tell(trial, float(trial.suggest_categorical("model.width", [8, 16])))
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2


def test_kaleidos_bare_error_gets_a_reason() -> None:
    from raycls.report.page import error_reason

    assert (
        error_reason(RuntimeError())
        == "RuntimeError without a message; usually no Chrome or Chromium that kaleido can start"
    )
    try:
        try:
            raise ValueError("browser closed")
        except ValueError as err:
            raise RuntimeError() from err
    except RuntimeError as err:
        assert error_reason(err) == "ValueError: browser closed"


def test_the_final_table_in_a_log_keeps_each_trial_on_one_line(capsys) -> None:
    """stdout is not a terminal here (as in CI logs): no cell may wrap onto a second line."""
    from raycls.cli import console
    from raycls.results.leaderboard import ReadResult
    from raycls.results.render import print_top

    n = 3
    columns = {
        "experiment": ["quickstart-with-a-long-name"] * n,
        "trial_id": [f"trial_{i:05d}" for i in range(n)],
        "status": ["completed"] * n,
        "phase": ["supcon>arcface>distill"] * n,
        "score": [0.91, 0.82, 0.73],
        "val_acc": [0.91, 0.82, 0.73],
        "val_loss": [0.3] * n,
        "test_acc": [0.9] * n,
        "test_ece": [0.05] * n,
        "epochs": [10] * n,
        "wall_s": [123.4] * n,
        "train.lr": [0.001234] * n,
        "train.weight_decay": [0.0005] * n,
        "model.name": ["efficientnet_b0_with_a_long_name"] * n,
        "augment.randaugment_magnitude": [9] * n,
        "phase.label_smoothing": [0.1] * n,
        "train.optimizer": ["adamw"] * n,
    }
    print_top(console, ReadResult(pa.table(columns)), "val_acc", descending=True, top=5)
    lines = capsys.readouterr().out.splitlines()
    for i in range(n):
        [line] = [line for line in lines if f"trial_{i:05d}" in line]
        assert "completed" in line and "efficientnet_b0_with_a_long_name" in line and "adamw" in line, "\n".join(lines)


# ------------------------------------------------------------------- an OOD or shift set of other channels
def test_an_ood_or_shift_dataset_of_other_channels_is_refused_before_any_trial(tmp_path: Path) -> None:
    """Known from the dataset registry (CIFAR-10 is RGB, digits grey) without reading either: each trial's
    evaluation would otherwise fail it after training. A dataset of the same channels passes."""
    space = write_yaml(
        tmp_path / "ood.yaml",
        DIGITS.replace("eval: {on: none}", "eval: {on: completed, ood: [uniform_noise, cifar10], shift: [cifar100]}"),
    )
    with pytest.raises(ConfigError) as refused:
        prepare_experiment(space, environment=False)
    text = str(refused.value)
    assert "ood.yaml" in text
    assert "eval.ood: cifar10: its images have 3 channel(s), the model's have 1" in text
    assert "eval.shift: cifar100: its images have 3 channel(s)" in text
    # Each family suggests its own generated sets: noise is an OOD set, corruptions a shift set.
    ood_line, shift_line = (line for line in text.splitlines() if "channel(s)" in line)
    assert "uniform_noise" in ood_line and "corruptions" not in ood_line
    assert "(made with any channels: corruptions)" in shift_line and "uniform_noise" not in shift_line
    assert "1-channel images (digits, fashion_mnist, mnist)" in text  # only datasets that would fit are named
    fits = write_yaml(
        tmp_path / "fits.yaml", DIGITS.replace("eval: {on: none}", "eval: {ood: [mnist], shift: [corruptions, mnist]}")
    )
    assert prepare_experiment(fits, environment=False).base.eval.shift == ("corruptions", "mnist")  # same classes


def test_a_shift_dataset_of_other_classes_is_refused_before_any_trial(tmp_path: Path) -> None:
    """A shift set's accuracy compares its labels with the model's: Fashion-MNIST's coat is not MNIST's 4."""
    space = write_yaml(
        tmp_path / "shift.yaml",
        DIGITS.replace("name: digits", "name: mnist").replace("eval: {on: none}", "eval: {shift: [fashion_mnist]}"),
    )
    with pytest.raises(
        ConfigError,
        match=r"shift.yaml.*eval.shift: fashion_mnist: its classes \(10: t-shirt, "
        r"trouser, pullover, dress, \.\.\.\) are not the model's \(10: 0, 1, 2, 3, \.\.\.\)",
    ):
        prepare_experiment(space, environment=False)
