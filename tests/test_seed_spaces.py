"""The shipped seed-pipeline spaces' CPU twins, end to end through `raycls tune` (Ray Tune, Optuna, the
leaderboard, the held-out evaluation, and the space's `after:` steps): the twin as shipped, only fewer trials
(one; the zoo's comparison two). benchmarks/seeds_cpu.py runs them whole. Every twin is a whole search, run
once here for every property of it (issue 31's one-command checks included): `slow`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raycls.cli import main
from raycls.config import TrialConfig, load_experiment
from raycls.results import read_leaderboard
from raycls.storage import ExperimentPaths
from raycls.train.evaluation import read_checkpoint

from .conftest import REPO

pytestmark = pytest.mark.slow

SPACES = REPO / "search_spaces"


def run_twin(name: str, storage: Path, trials: int = 1, *, report: bool = False, **overrides) -> list[dict]:
    """`raycls tune` of the twin's first `trials` trials (CI time), its `after:` steps included; the rows. With
    ASHA one may be stopped early; none may fail."""
    sets = [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]
    main(["tune", str(SPACES / name), "--storage", str(storage), "--wandb", "disabled", "--trials", str(trials),
          *sets, *([] if report else ["--no-report"])])  # fmt: skip
    experiment = load_experiment(SPACES / name, overrides)
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
        # The full suite's pictures are drawn in the trial; the default suite's are left as tables.
        assert {"metrics.json", "corruptions.png", "confusion_matrix.csv"} <= files
    page = write_report(str(tmp_path), "zoo-digits", png=False).html.read_text()
    assert '<section id="choices">' in page and all(r["model.name"] in page for r in rows)


def test_adaptive_deit_twin_scores_the_deit_it_hands_over(ray_local, tmp_path: Path) -> None:
    """A chain whose stages have their own models: the row's score, best epoch, checkpoint and held-out
    evaluation are all the last stage's (the DeiT's), even where the CNN stage scored higher. The DeiT is
    the ViT baseline (no distillation, class-token head, SWA), and `after:` evaluates and exports it."""
    (row,) = run_twin("adaptive-deit-digits.yaml", tmp_path)
    config = TrialConfig.from_json(row["config_json"])
    assert [s.model.name for s in config.stages] == ["adaptive_cnn", "cifar_deit_distilled"]
    assert row["score"] == row["deit.val_acc"] and row["best_epoch"] > config.stages[0].train.epochs
    assert read_checkpoint(row["checkpoint"])[1] == 1  # a checkpoint of the DeiT stage
    assert row["test_acc"] > 0.2 and row["cnn.val_acc"] > 0.5
    deit = config.stages[1]
    assert deit.phase.alpha == 0.0 and deit.model.inference_head == "class" and deit.train.swa is not None
    steps = after_records(tmp_path, "adaptive-deit-digits")
    assert (tmp_path / "adaptive-deit-digits" / "export" / row["trial_id"] / "model.onnx").is_file()
    assert steps["evaluate"]["metrics"]["test_acc"] > 0.2


def test_deit_cst_twin_distils_tokens_from_a_vit_stage(ray_local, tmp_path: Path) -> None:
    rows = run_twin("deit-cst-digits.yaml", tmp_path)
    for row in rows:
        assert row["phase"] == "teacher>cst" and row["score"] == row["cst.val_acc"]
        assert row["test_acc"] > 0.2 and "phases.cst.phase.tok_weight" in row


def test_finetune_twin_on_real_jpegs_is_one_command(ray_local, tmp_path: Path, shared_data: Path) -> None:
    """Seed 002 in one command, on imagenette-mini's JPEGs (from scratch offline, as the twin says): head on a
    frozen backbone, then the whole network with early stopping; then the data report, the full evaluation
    (its error analysis), labels for an unlabelled test CSV, the ONNX export, MLflow runs, and the report
    showing the steps."""
    from mlflow.tracking import MlflowClient

    mini = shared_data / "imagenette-mini"
    val = sorted((mini / "val").rglob("*.JPEG"))[::10]
    csv = tmp_path / "test.csv"
    csv.write_text("filename\n" + "\n".join(str(p) for p in val) + "\n")  # absolute names work too
    storage = tmp_path / "results"
    (row,) = run_twin(
        "finetune-imagenette.yaml",
        storage,
        report=True,
        **{"data.path": str(mini), "after.predict.images": str(csv), "phases.full.train.epochs": 2},
    )
    assert row["phase"] == "head>full" and row["head.val_acc"] >= 0.0 and row["test_acc"] >= 0.0
    folder = storage / "finetune-imagenette" / "eval" / row["trial_id"]
    assert (folder / "label_issues.csv").is_file() and json.loads((folder / "metrics.json").read_text())["metrics"]
    steps = after_records(storage, "finetune-imagenette")
    assert list(steps) == ["explore", "evaluate", "export", "predict"]
    assert Path(steps["explore"]["out"]).is_file() and steps["explore"]["metrics"]["train_images"] > 0
    assert (Path(steps["evaluate"]["out"]) / "label_issues.csv").is_file()
    trial = steps["predict"]["trial_id"]
    assert (storage / "finetune-imagenette" / "export" / trial / "model.onnx").is_file()
    predictions = (storage / "finetune-imagenette" / "after" / trial / "predictions.csv").read_text().splitlines()
    assert len(predictions) == len(val) + 1 and steps["predict"]["metrics"]["unreadable"] == 0
    page = (storage / "finetune-imagenette" / "report" / "report.html").read_text()
    assert '<section id="after">' in page and "class balance" in page
    client = MlflowClient(tracking_uri=f"sqlite:///{storage}/mlruns/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("finetune-imagenette").experiment_id])
    assert run.info.run_name == trial and "after.predict.images" in run.data.metrics


def test_pipeline_twin_with_the_toolkit_options(ray_local, tmp_path: Path) -> None:
    (row,) = run_twin("pipeline-digits.yaml", tmp_path)
    config = TrialConfig.from_json(row["config_json"])
    arcface, distill = config.stages[1], config.stages[2]
    assert arcface.train.ema is not None and arcface.augment.randaugment is not None and distill.train.sam is not None
    assert distill.train.sam.rho == row["phases.distill.train.sam.rho"]
    if row["status"] == "completed":
        # The score is the last stage's best epoch by the experiment metric (val_knn_acc); the stage's own
        # column is at its best epoch by its phase's metric, which the score can only match or beat.
        assert row["score"] >= row["distill.val_knn_acc"] and row["test_acc"] > 0.5
    # `after:` evaluates the winner with the full suite and exports it.
    steps = after_records(tmp_path, "pipeline-digits")
    trial = steps["evaluate"]["trial_id"]
    assert steps["evaluate"]["suite"] == "full" and steps["evaluate"]["metrics"]["test_acc"] > 0.2
    files = {p.name for p in Path(steps["evaluate"]["out"]).iterdir()}
    assert {"metrics.json", "reliability.png", "corruptions.png"} <= files
    assert (tmp_path / "pipeline-digits" / "export" / trial / "model.onnx").is_file()


def after_records(storage: Path, experiment: str) -> dict[str, dict]:
    recorded = json.loads(ExperimentPaths(str(storage), experiment).after_file().read_text())
    assert all(r["status"] == "ok" for r in recorded["records"]), recorded["records"]
    return {r["step"]: r for r in recorded["records"]}
