"""The report's parts that need no search: a chain's stage section, ASHA's rungs, an experiment without rows.
The report of a real digits search (every section, PNGs, headless Chromium, W&B, optuna-dashboard) is
tested in test_tune.py, on the search that file runs anyway."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pytest

from raycls.cli import main
from raycls.config import load_experiment
from raycls.errors import LeaderboardError
from raycls.report.data import load_report_data
from raycls.report.figures import REPORT_SECTIONS, build_sections
from raycls.report.page import write_report
from raycls.results.leaderboard import TrialRecord, write_trial
from raycls.results.provenance import write_space_as_run

from .conftest import write_yaml

CHAIN = """
experiment: {name: chain, trials: 3, metric: val_acc}
scheduler: {name: asha, max_t: 9, grace_period: 1, reduction_factor: 3}
wandb: {mode: disabled}
base:
  data: {name: digits}
space:
  train.lr: {type: loguniform, low: 1.0e-3, high: 1.0e-1}
"""


def write_chain_rows(storage: Path, tmp_path: Path) -> None:
    """Three trials of a two-stage chain as raycls's writer leaves them (rows with `<stage>.val_acc`)."""
    experiment = load_experiment(write_yaml(tmp_path / "chain.yaml", CHAIN))
    write_space_as_run(experiment, str(storage))
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    for i, (status, supcon, arcface) in enumerate(
        [("completed", 0.8, 0.9), ("completed", 0.7, 0.85), ("early_stopped", 0.5, None)]
    ):
        history = [{"epoch": e, "val_acc": 0.1 * e, "supcon.val_knn_acc": supcon} for e in (1, 2, 3)]
        if arcface is not None:
            history[-1]["arcface.val_acc"] = arcface
        write_trial(
            str(storage),
            TrialRecord(
                experiment="chain",
                trial_id=f"t{i}",
                status=status,
                metric="val_acc",
                mode="max",
                params={"train.lr": 0.01 * (i + 1)},
                param_types={"train.lr": pa.float64()},
                history=history,
                started_at=start + timedelta(minutes=i),
                ended_at=start + timedelta(minutes=i + 1),
            ),
        )


def test_a_chain_gets_a_section_with_each_stage_per_trial(tmp_path: Path) -> None:
    storage = tmp_path / "results"
    write_chain_rows(storage, tmp_path)
    data = load_report_data(str(storage), "chain")
    assert [r["trial_id"] for r in data.rows] == ["t0", "t1", "t2"]  # in the order they ended
    assert data.rungs() == [1, 3]  # ASHA: grace 1, reduction 3, below max_t 9
    sections = {s.name: s for s in build_sections(data)}
    assert list(sections) == [n for n, _ in REPORT_SECTIONS.in_order() if n in sections]
    stages = sections["stages"].figure
    assert stages is not None
    drawn = {t.name: [v for v in t.y if v is not None] for t in stages.data}
    assert drawn == {"completed": [0.8, 0.9, 0.7, 0.85], "early_stopped": [0.5]}
    assert "pareto" not in sections  # single objective: no Pareto section at all


def test_without_a_study_the_optuna_sections_say_why(tmp_path: Path) -> None:
    storage = tmp_path / "results"
    write_chain_rows(storage, tmp_path)  # rows only: no optuna.journal
    sections = {s.name: s for s in build_sections(load_report_data(str(storage), "chain"))}
    for name in ("importance", "slices"):
        assert sections[name].figure is None and "no Optuna study" in sections[name].note
    assert sections["evaluation"].figure is None and "raycls eval" in sections["evaluation"].note


def test_an_experiment_without_rows_is_an_error_naming_the_folder(tmp_path: Path, capsys) -> None:
    with pytest.raises(LeaderboardError, match="no leaderboard rows of experiment 'nothing'"):
        write_report(str(tmp_path), "nothing")
    with pytest.raises(SystemExit) as info:
        main(["report", "nothing", "--storage", str(tmp_path)])
    assert info.value.code == 2 and str(tmp_path / "nothing" / "leaderboard") in capsys.readouterr().out


def test_a_zoo_gets_its_models_compared(tmp_path: Path) -> None:
    """A categorical parameter (model.name) is compared value by value: each value's best trial, with its
    held-out metrics; a failed trial's value does not appear."""
    storage = tmp_path / "results"
    experiment = load_experiment(
        write_yaml(
            tmp_path / "zoo.yaml",
            """
experiment: {name: zoo, trials: 4, metric: val_acc}
search: {algorithm: grid}
scheduler: {name: fifo}
base: {data: {name: digits}}
space:
  model.name: {type: choice, values: [resnet18, small_cnn, adaptive_cnn]}
""",
        )
    )
    write_space_as_run(experiment, str(storage))
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    trials = [
        ("resnet18", 0.90, 0.88, "completed"),
        ("resnet18", 0.95, 0.93, "completed"),
        ("small_cnn", 0.80, 0.79, "completed"),
        ("adaptive_cnn", 0.5, None, "failed"),
    ]
    for i, (model, val, test, status) in enumerate(trials):
        write_trial(
            str(storage),
            TrialRecord(
                experiment="zoo",
                trial_id=f"t{i}",
                status=status,
                metric="val_acc",
                mode="max",
                params={"model.name": model},
                param_types={"model.name": pa.string()},
                history=[{"epoch": 1, "val_acc": val}],
                evaluation={"metrics": {"test_acc": test}} if test is not None else {},
                started_at=start + timedelta(minutes=i),
                ended_at=start + timedelta(minutes=i + 1),
            ),
        )
    sections = {s.name: s for s in build_sections(load_report_data(str(storage), "zoo"))}
    bars = {t.name: dict(zip(t.x, t.y)) for t in sections["choices"].figure.data}
    assert bars["val_acc"] == {"resnet18": 0.95, "small_cnn": 0.80}  # each model's best trial; the failed one left out
    assert bars["test_acc"] == {"resnet18": 0.93, "small_cnn": 0.79}
