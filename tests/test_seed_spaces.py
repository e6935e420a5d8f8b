"""The shipped seed-pipeline spaces' CPU twins, end to end through `run_tune` (Ray Tune, Optuna, the
leaderboard, the held-out evaluation): the twin as shipped, only fewer trials (one; the zoo's comparison two).
benchmarks/seeds_cpu.py runs them whole. Every twin is a whole search: `slow`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raycls.config import TrialConfig, load_experiment
from raycls.results import read_leaderboard
from raycls.train.evaluation import read_checkpoint
from raycls.tune.driver import TuneOptions, run_tune

from .conftest import REPO

pytestmark = pytest.mark.slow

SPACES = REPO / "search_spaces"


def run_twin(name: str, storage: Path, trials: int = 1, **overrides) -> list[dict]:
    """The twin's first `trials` trials' rows (CI time); with ASHA one may be stopped early, none may fail."""
    experiment = load_experiment(SPACES / name, {"experiment.trials": trials, **overrides})
    run_tune(experiment, TuneOptions(storage=str(storage), live=False, wandb_mode="disabled"))
    rows = read_leaderboard(str(storage), experiment.name).table.to_pylist()
    statuses = [(r["status"], r["error"]) for r in rows]
    assert len(rows) == trials and all(r["status"] != "failed" for r in rows), statuses
    assert any(r["status"] == "completed" for r in rows), statuses
    if experiment.scheduler.name == "fifo":  # nothing stops a trial early
        assert all(r["status"] == "completed" for r in rows), statuses
    return rows


def test_zoo_twin_compares_models_with_test_and_shift_metrics(ray_local, tmp_path: Path) -> None:
    from raycls.report.page import write_report

    # Two of the four models: the grid's first two at search.seed 0 are small_cnn and adaptive_cnn (the cheap
    # ones: CI time); benchmarks/seeds_cpu.py runs all four.
    rows = run_twin("zoo-digits.yaml", tmp_path, trials=2)
    assert len({r["model.name"] for r in rows}) == 2  # the grid: each model once
    for row in rows:
        assert row["test_acc"] > 0.2 and 0 < row["test_shift_mca"] <= 1  # chance: 0.1
        files = {p.name for p in (tmp_path / "zoo-digits" / "eval" / row["trial_id"]).iterdir()}
        assert {"metrics.json", "corruptions.png", "confusion_matrix.png"} <= files
    page = write_report(str(tmp_path), "zoo-digits", png=False).html.read_text()
    assert '<section id="choices">' in page and all(r["model.name"] in page for r in rows)


def test_adaptive_deit_twin_scores_the_deit_it_hands_over(ray_local, tmp_path: Path) -> None:
    """A chain whose stages have their own models: the row's score, best epoch, checkpoint and held-out
    evaluation are all the last stage's (the DeiT's), even where the CNN stage scored higher."""
    rows = run_twin("adaptive-deit-digits.yaml", tmp_path)
    for row in rows:
        config = TrialConfig.from_json(row["config_json"])
        assert [s.model.name for s in config.stages] == ["adaptive_cnn", "cifar_deit_distilled"]
        assert row["score"] == row["deit.val_acc"] and row["best_epoch"] > config.stages[0].train.epochs
        assert read_checkpoint(row["checkpoint"])[1] == 1  # a checkpoint of the DeiT stage
        assert row["test_acc"] > 0.2 and row["cnn.val_acc"] > 0.5


def test_deit_cst_twin_distils_tokens_from_a_vit_stage(ray_local, tmp_path: Path) -> None:
    rows = run_twin("deit-cst-digits.yaml", tmp_path)
    for row in rows:
        assert row["phase"] == "teacher>cst" and row["score"] == row["cst.val_acc"]
        assert row["test_acc"] > 0.2 and "phases.cst.phase.tok_weight" in row


def test_finetune_twin_on_real_jpegs(ray_local, tmp_path: Path, shared_data: Path) -> None:
    """Head on a frozen backbone, then the whole network with early stopping, on imagenette-mini's JPEGs
    (from scratch offline, as the twin says); the full evaluation's error analysis is written."""
    mini = shared_data / "imagenette-mini"
    rows = run_twin(
        "finetune-imagenette.yaml", tmp_path, **{"data.path": str(mini), "after.predict.images": str(mini / "val")}
    )
    for row in rows:
        assert row["phase"] == "head>full" and row["head.val_acc"] >= 0.0 and row["test_acc"] >= 0.0
        folder = tmp_path / "finetune-imagenette" / "eval" / row["trial_id"]
        assert (folder / "label_issues.csv").is_file() and json.loads((folder / "metrics.json").read_text())["metrics"]


def test_pipeline_twin_with_the_toolkit_options(ray_local, tmp_path: Path) -> None:
    rows = run_twin("pipeline-digits.yaml", tmp_path)
    for row in rows:
        config = TrialConfig.from_json(row["config_json"])
        arcface, distill = config.stages[1], config.stages[2]
        assert (
            arcface.train.ema is not None and arcface.augment.randaugment is not None and distill.train.sam is not None
        )
        assert distill.train.sam.rho == row["phases.distill.train.sam.rho"]
    for row in (r for r in rows if r["status"] == "completed"):
        # The score is the last stage's best epoch by the experiment metric (val_knn_acc); the stage's own
        # column is at its best epoch by its phase's metric, which the score can only match or beat.
        assert row["score"] >= row["distill.val_knn_acc"] and row["test_acc"] > 0.5
