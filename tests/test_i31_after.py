"""Issue 31's one-command pipelines: the `after:` section (explore, evaluate, export, predict for the best or
top-K trials, recorded in after/after.json and the report), predictions for an unlabelled test CSV, MLflow
tracking read back with MLflow's own client, the serve Dockerfile, and the shipped spaces and their CPU twins
end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from raycls.cli import main
from raycls.config import load_experiment
from raycls.errors import ConfigError
from raycls.storage import ExperimentPaths

from .conftest import REPO, write_digits_row, write_yaml

SPACES = REPO / "search_spaces"

DIGITS = """
experiment: {name: NAME, trials: 2, concurrency: 2}
scheduler: {name: fifo}
base:
  data: {name: digits, val_fraction: 0.2}
  model: {name: small_cnn, width: 8}
  train: {epochs: 2, batch_size: 64, optimizer: adamw, lr: 3.0e-3}
space:
  train.lr: {type: loguniform, low: 1.0e-3, high: 1.0e-2}
"""


def digits_pngs(folder: Path, count: int = 20) -> tuple[list[Path], np.ndarray]:
    """Real digits (scikit-learn's, the dataset the trials train on) as 8x8 grey PNGs, and their labels."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(count):
        # The trials' test split is drawn from the same 1,797 images; these are read as new files, and the
        # check below is that a trained model labels them, not a held-out accuracy.
        path = folder / f"digit{i:03d}.png"
        Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)).save(path)
        files.append(path)
    return files, digits.target[:count]


def unlabelled_csv(path: Path, files: list[Path], *, column: str = "filename", missing: int = 1) -> Path:
    """A test CSV as seed 002's --test_csv gives it: file names relative to the CSV, no labels."""
    names = [str(f.relative_to(path.parent)) for f in files] + [f"gone{i}.png" for i in range(missing)]
    path.write_text(f"{column}\n" + "\n".join(names) + "\n")
    return path


# ------------------------------------------------------------------------------------------- config
def test_after_section_reads_switches_and_lists_steps_in_order(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    space = write_yaml(
        tmp_path / "s.yaml",
        DIGITS.replace("NAME", "s")
        + "after: {trials: 'top:2', predict: {images: imgs, out: p.csv}, export: true, evaluate: true, explore: true}\n",
    )
    after = load_experiment(space).after
    assert after.steps == ["explore", "evaluate", "export", "predict"]
    assert after.evaluate == "default" and after.export is not None and not after.export.int8
    # Relative images are read under the space file's folder (no $RAYCLS_DATA here), made absolute once.
    assert after.predict is not None and after.predict.images == [str(tmp_path / "imgs")]
    off = load_experiment(space, {"after.evaluate": False, "after.export": False}).after
    assert off.steps == ["explore", "predict"]
    assert load_experiment(write_yaml(tmp_path / "none.yaml", DIGITS.replace("NAME", "n"))).after.steps == []


@pytest.mark.parametrize(
    ("after", "expected"),
    [
        ("{trials: 'top:0'}", "after.trials: expected best or top:K with K >= 1"),
        ("{trials: worst}", "after.trials: expected best or top:K"),
        ("{evaluate: fancy}", "after.evaluate"),
        ("{predict: {images: x.png, out: p.txt}}", "after.predict.out: 'p.txt': predictions are written as .parquet"),
        ("{predict: {images: []}}", "after.predict.images: expected at least one"),
        ("{predict: {out: p.csv}}", "after.predict.images: required key is missing"),
        ("{export: {int4: true}}", "after.export.int4: unknown key; allowed: format, int8"),
        ("{evalute: full}", "after.evalute: unknown key; allowed: trials, explore, evaluate, export, predict"),
    ],
)
def test_bad_after_sections_name_the_file_and_key(tmp_path: Path, after: str, expected: str) -> None:
    space = write_yaml(tmp_path / "bad.yaml", DIGITS.replace("NAME", "bad") + f"after: {after}\n")
    with pytest.raises(ConfigError) as info:
        load_experiment(space)
    assert expected in str(info.value) and str(space) in str(info.value)


def test_missing_prediction_images_are_refused_before_any_trial(tmp_path: Path) -> None:
    from raycls.prepare import prepare_experiment

    space = write_yaml(
        tmp_path / "s.yaml", DIGITS.replace("NAME", "s") + "after: {predict: {images: nowhere/test.csv}}\n"
    )
    with pytest.raises(ConfigError) as info:  # the check `raycls tune` runs before Ray starts
        prepare_experiment(space, [])
    assert "after.predict.images" in str(info.value) and "nowhere/test.csv" in str(info.value)
    assert str(space) in str(info.value)


def test_images_set_on_the_command_line_are_relative_to_the_working_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "spaces").mkdir()
    space = write_yaml(tmp_path / "spaces" / "s.yaml", DIGITS.replace("NAME", "s"))
    after = load_experiment(space, {"after.predict.images": "mine/test.csv"}).after
    assert after.predict is not None and after.predict.images == [str(tmp_path / "mine" / "test.csv")]


def test_tracking_names_known_trackers(tmp_path: Path) -> None:
    ok = write_yaml(tmp_path / "ok.yaml", DIGITS.replace("NAME", "ok").replace("concurrency: 2", "tracking: [mlflow]"))
    assert load_experiment(ok).experiment.tracking == ["mlflow"]
    assert load_experiment(write_yaml(tmp_path / "d.yaml", DIGITS.replace("NAME", "d"))).experiment.tracking == [
        "wandb"
    ]
    bad = write_yaml(
        tmp_path / "bad.yaml", DIGITS.replace("NAME", "b").replace("concurrency: 2", "tracking: [neptune]")
    )
    with pytest.raises(ConfigError, match=r"experiment\.tracking\.0: Input should be 'wandb' or 'mlflow'"):
        load_experiment(bad)


def test_after_and_mlflow_paths_live_under_the_storage(tmp_path: Path) -> None:
    paths = ExperimentPaths(str(tmp_path), "exp")
    assert paths.after_file() == tmp_path / "exp" / "after" / "after.json"
    assert paths.after_trial_dir("t1") == tmp_path / "exp" / "after" / "t1"
    assert paths.after_explore_dir() == tmp_path / "exp" / "after" / "explore"
    assert paths.local_export_dir("t1") == tmp_path / "exp" / "export" / "t1"
    assert paths.mlflow_uri() == f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    assert paths.mlflow_artifacts_uri() == (tmp_path / "mlruns" / "artifacts").as_uri()


# ---------------------------------------------------------------------------------- predict inputs
def test_a_csv_of_file_names_lists_its_images_relative_to_itself(tmp_path: Path) -> None:
    from raycls.deliver.predict import image_paths

    files, _ = digits_pngs(tmp_path / "set" / "imgs", 3)
    first_column = unlabelled_csv(tmp_path / "set" / "test.csv", files, column="filename")
    assert image_paths([str(first_column)]) == [*files, tmp_path / "set" / "gone0.png"]
    # A known image column wins over the first one (as `data.name: csv` reads them).
    named = tmp_path / "set" / "named.csv"
    named.write_text("id,image\n" + "\n".join(f"{i},imgs/{f.name}" for i, f in enumerate(files)) + "\n")
    assert image_paths([str(named)]) == files


def test_grey_inversion_makes_dark_on_light_light_on_dark(tmp_path: Path) -> None:
    from PIL import Image

    from raycls.deliver.predict import read_image

    paper = np.full((8, 8), 250, np.uint8)
    paper[2:6, 3] = 10  # a dark stroke on white paper
    Image.fromarray(paper).save(tmp_path / "paper.png")
    Image.fromarray(255 - paper).save(tmp_path / "mnist.png")
    as_is = read_image(tmp_path / "paper.png", 1, 8)
    assert as_is.mean() > 200 and (read_image(tmp_path / "paper.png", 1, 8, True) == 255 - as_is).all()
    assert read_image(tmp_path / "paper.png", 1, 8, "auto").mean() < 50  # inverted: it was light
    mnist = read_image(tmp_path / "mnist.png", 1, 8, "auto")
    assert (mnist == read_image(tmp_path / "mnist.png", 1, 8)).all()  # already light on dark: kept


# ------------------------------------------------------------------------------------ after, direct
@pytest.mark.slow  # an evaluation, an ONNX export with its parity check, predictions and a report
def test_after_runs_each_step_on_the_best_trial_and_the_report_shows_it(digits_run, tmp_path: Path) -> None:
    """A trained digits trial as an experiment's row; `after:` evaluates, exports and labels an unlabelled
    CSV with it; after.json, the files and the report's section say so."""
    from raycls.after import run_after
    from raycls.report.page import write_report

    storage, trial = write_digits_row(digits_run, tmp_path / "results", "direct")
    files, labels = digits_pngs(tmp_path / "new", 20)
    csv = unlabelled_csv(tmp_path / "new" / "test.csv", files)
    space = write_yaml(
        tmp_path / "direct.yaml",
        DIGITS.replace("NAME", "direct")
        + f"after: {{evaluate: default, export: true, predict: {{images: {csv}, out: preds.parquet}}}}\n",
    )
    said: list[str] = []
    outcome = run_after(load_experiment(space), storage, say=said.append)
    assert not outcome.failed and [r["step"] for r in outcome.records] == ["evaluate", "export", "predict"]
    assert all(r["trial_id"] == trial for r in outcome.records)
    paths = ExperimentPaths(storage, "direct")
    assert json.loads(Path(paths.eval_metrics(trial)).read_text())["metrics"]["test_acc"] > 0.5
    assert (paths.local_export_dir(trial) / "model.onnx").is_file()
    rows = pq.read_table(paths.after_trial_dir(trial) / "preds.parquet").to_pylist()
    assert [r["path"] for r in rows] == [str(f) for f in files] + [str(tmp_path / "new" / "gone0.png")]
    assert rows[-1]["error"] and rows[-1]["label"] is None  # the listed file that is not there: its own row
    predicted = np.array([int(r["label"]) for r in rows[:-1]])
    assert (predicted == labels).mean() >= 0.7 and all(0 < r["confidence"] <= 1 for r in rows[:-1])
    recorded = json.loads(paths.after_file().read_text())
    assert recorded["trials"] == "best" and len(recorded["records"]) == 3
    assert recorded["records"][2]["metrics"] == {
        "images": 21,
        "unreadable": 1,
        "mean_confidence": pytest.approx(np.mean([r["confidence"] for r in rows[:-1]])),
    }
    assert any("after predict t0001" in line for line in said)
    page = write_report(storage, "direct", png=False).html.read_text()
    assert '<section id="after">' in page and "preds.parquet" in page


def test_a_failing_step_is_recorded_and_the_others_still_run(digits_run, tmp_path: Path) -> None:
    from raycls.after import run_after

    storage, trial = write_digits_row(digits_run, tmp_path / "results", "failing")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    space = write_yaml(
        tmp_path / "failing.yaml",
        DIGITS.replace("NAME", "failing") + f"after: {{predict: {{images: {empty}}}, evaluate: default}}\n",
    )
    outcome = run_after(load_experiment(space), storage, say=lambda _: None)
    steps = {r["step"]: r for r in outcome.records}
    assert steps["evaluate"]["status"] == "ok" and steps["predict"]["status"] == "failed"
    assert "empty CSV" in steps["predict"]["error"] and outcome.failed == [steps["predict"]]


def test_after_with_no_completed_trial_is_skipped_not_failed(tmp_path: Path) -> None:
    from raycls.after import run_after
    from raycls.results.leaderboard import TrialRecord, write_trial

    write_trial(
        str(tmp_path),
        TrialRecord(
            experiment="none", trial_id="f1", status="failed", metric="val_acc", mode="max", params={},
            param_types={}, history=[], error="boom",
        ),
    )  # fmt: skip
    space = write_yaml(tmp_path / "none.yaml", DIGITS.replace("NAME", "none") + "after: {evaluate: full}\n")
    outcome = run_after(load_experiment(space), str(tmp_path), say=lambda _: None)
    assert [r["status"] for r in outcome.records] == ["skipped"] and not outcome.failed
    assert "no completed trial" in outcome.records[0]["error"]


# -------------------------------------------------------------------------------------------- MLflow
def test_mlflow_writer_logs_a_trial_that_mlflows_client_reads_back(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from raycls.config.experiment import MlflowSection
    from raycls.results.mlflow_log import MlflowWriter, log_after

    paths = ExperimentPaths(str(tmp_path), "exp")
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "model.pt").write_bytes(b"weights")
    evaluation = Path(paths.eval_dir("t1"))
    evaluation.mkdir(parents=True)
    (evaluation / "metrics.json").write_text('{"metrics": {"test_acc": 0.9}}')
    writer = MlflowWriter(MlflowSection(), paths)
    writer.start("t1", {"train.lr": 0.01, "model.name": "small_cnn", "wandb_api_key": "secret"})
    for epoch, acc in ((1, 0.5), (2, 0.75)):
        writer.log("t1", {"epoch": epoch, "val_acc": acc, "val_recall@1": acc, "stage": "x", "ok": True}, step=epoch)
    summary = {"status": "completed", "score": 0.75, "test_acc": 0.9, "val_acc": 0.75, "checkpoint": str(checkpoint)}
    writer.finish("t1", {**summary, "config_json": '{"seed": 0}'}, evaluation=evaluation)
    writer.close()

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    experiment = client.get_experiment_by_name("exp")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "t1" and run.info.status == "FINISHED"
    assert run.data.params == {"train.lr": "0.01", "model.name": "small_cnn", "wandb_api_key": "***"}
    assert [m.value for m in client.get_metric_history(run.info.run_id, "val_acc")] == [0.5, 0.75]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_recall_at_1")] == [1, 2]
    assert run.data.metrics["test_acc"] == 0.9 and run.data.metrics["score"] == 0.75
    assert "stage" not in run.data.metrics and "ok" not in run.data.metrics
    assert run.data.tags["raycls.status"] == "completed"
    artefacts = {
        a.path for folder in ("", "eval", "checkpoint") for a in client.list_artifacts(run.info.run_id, folder)
    }
    assert {"config.json", "eval/metrics.json", "checkpoint/model.pt"} <= artefacts
    local = Path(client.download_artifacts(run.info.run_id, "checkpoint/model.pt", str(tmp_path / "back")))
    assert local.read_bytes() == b"weights"

    # A resumed experiment logs to the same run; `after:` results land in it.
    again = MlflowWriter(MlflowSection(), paths)
    again.start("t1", {"train.lr": 0.01})
    again.close()
    assert len(client.search_runs([experiment.experiment_id])) == 1
    record = {
        "step": "evaluate",
        "trial_id": "t1",
        "status": "ok",
        "out": str(evaluation),
        "metrics": {"test_acc": 0.91},
    }
    assert log_after(MlflowSection(), paths, [record, {**record, "trial_id": "t9"}]) == 1
    assert client.get_run(run.info.run_id).data.metrics["after.evaluate.test_acc"] == 0.91
    assert "after/evaluate/metrics.json" in {a.path for a in client.list_artifacts(run.info.run_id, "after/evaluate")}


# ------------------------------------------------------------------------------------------- Docker
def dockerfile_instructions() -> list[dict]:
    from dockerfile_parse import DockerfileParser

    parser = DockerfileParser(path=str(REPO / "Dockerfile"))
    return parser.structure


def test_the_dockerfile_parses_and_serves_with_raycls() -> None:
    from dockerfile_parse import DockerfileParser

    known = {"FROM", "ARG", "ENV", "RUN", "WORKDIR", "COPY", "USER", "VOLUME", "EXPOSE", "HEALTHCHECK"}
    known |= {"ENTRYPOINT", "CMD", "LABEL"}
    steps = dockerfile_instructions()
    names = [s["instruction"] for s in steps if s["instruction"] != "COMMENT"]
    assert set(names) <= known, set(names) - known
    assert names[: names.index("FROM")] == ["ARG"]  # only the base's ARG comes before FROM
    parser = DockerfileParser(path=str(REPO / "Dockerfile"))
    assert parser.baseimage == "python:3.11-slim"  # ARG BASE's default: the CPU image
    assert any(s["instruction"] == "ARG" and s["value"].startswith("TORCH_INDEX=") for s in steps)
    for step in (s for s in steps if s["instruction"] == "COPY"):
        *sources, _ = step["value"].split()
        assert all((REPO / source).exists() for source in sources), step["value"]
    ignored = (REPO / ".dockerignore").read_text().split()
    assert "!raycls/" in ignored and "!pyproject.toml" in ignored
    entrypoint = json.loads(next(s["value"] for s in steps if s["instruction"] == "ENTRYPOINT"))
    assert entrypoint[:2] == ["raycls", "serve"] and "0.0.0.0" in entrypoint


def test_the_images_entrypoint_command_runs_outside_docker() -> None:
    steps = dockerfile_instructions()
    entrypoint = json.loads(next(s["value"] for s in steps if s["instruction"] == "ENTRYPOINT"))
    command = json.loads(next(s["value"] for s in steps if s["instruction"] == "CMD"))
    # `raycls` is the console script of pyproject.toml (raycls.cli:main); run through this checkout's code.
    argv = [sys.executable, "-m", "raycls.cli", *entrypoint[1:], *command]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Serve a trial's best model over HTTP" in done.stdout and "--trial" in done.stdout
    # Every option the entrypoint passes is one `raycls serve` takes (an unknown one would exit 2 above).
    assert all(opt in done.stdout for opt in entrypoint[2:] if opt.startswith("--"))


# --------------------------------------------------------------------------------------------- spaces
@pytest.mark.parametrize("name", sorted(p.name for p in SPACES.glob("*.yaml")))
def test_every_shipped_space_validates(name: str) -> None:
    from raycls.prepare import prepare_experiment

    experiment = prepare_experiment(SPACES / name, [], environment=False)
    assert experiment.name


def test_the_one_command_spaces_ask_for_their_pipelines_after_steps() -> None:
    finetune = load_experiment(SPACES / "finetune.yaml")
    assert finetune.after.steps == ["explore", "evaluate", "export", "predict"] and finetune.after.evaluate == "full"
    assert finetune.after.predict.images[0].endswith("test.csv") and finetune.experiment.tracking == ["wandb", "mlflow"]
    pipeline = load_experiment(SPACES / "pipeline.yaml")
    assert pipeline.after.steps == ["evaluate", "export"] and pipeline.after.export.int8
    for twin in ("finetune-imagenette.yaml", "pipeline-digits.yaml", "adaptive-deit-digits.yaml"):
        assert load_experiment(SPACES / twin).after.steps, twin


@pytest.mark.parametrize("name", ["adaptive-deit.yaml", "adaptive-deit-digits.yaml", "adaptive-deit-mnist.yaml"])
def test_adaptive_deit_spaces_have_the_vit_baseline_cutmix_and_swa(name: str) -> None:
    from raycls.config import resolve_trial

    experiment = load_experiment(SPACES / name)
    first = experiment.search.points_to_evaluate[0]
    assert first == {"phases.deit.phase.alpha": 0.0}  # the ViT without distillation runs first
    baseline = resolve_trial(experiment, {**first, "phases.deit.model.inference_head": "class"})
    deit = baseline.stages[1]
    assert deit.phase.alpha == 0.0 and deit.model.inference_head == "class"
    when = experiment.space.params["phases.deit.model.inference_head"].when
    assert when == {"phases.deit.phase.alpha": 0.0}
    if name != "adaptive-deit-mnist.yaml":
        assert deit.train.swa is not None and deit.phase.cutmix_alpha == 1.0
    if name == "adaptive-deit.yaml":  # the seed's CutMix in the CNN stage too (the twin's 2 epochs leave it out)
        assert baseline.stages[0].phase.cutmix_alpha == 1.0


def test_the_mnist_recipe_is_adamw_affine_without_flips() -> None:
    from raycls.config import resolve_trial

    config = resolve_trial(load_experiment(SPACES / "adaptive-deit-mnist.yaml"))
    assert config.data.name == "mnist" and [s.model.name for s in config.stages] == [
        "adaptive_cnn",
        "cifar_deit_distilled",
    ]
    for stage in config.stages:
        assert stage.train.optimizer == "adamw" and not stage.augment.hflip
        assert stage.augment.affine is not None and stage.augment.affine.degrees == 10.0
        assert stage.augment.affine.translate == 0.1


# ------------------------------------------------------------------------------------- whole searches
@pytest.mark.slow
def test_a_tiny_search_tracked_in_mlflow_reads_back_per_trial(ray_local, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    space = write_yaml(
        tmp_path / "tracked.yaml",
        DIGITS.replace("NAME", "tracked").replace("concurrency: 2", "concurrency: 2, tracking: [mlflow]")
        + "after: {trials: 'top:2', evaluate: default}\n",
    )
    main(["tune", str(space), "--storage", str(tmp_path / "results"), "--no-report"])
    board = pq.read_table(tmp_path / "results" / "tracked" / "leaderboard").to_pylist()
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/results/mlruns/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("tracked").experiment_id])
    assert sorted(r.info.run_name for r in runs) == sorted(r["trial_id"] for r in board)
    for run in runs:
        row = next(r for r in board if r["trial_id"] == run.info.run_name)
        assert run.info.status == "FINISHED" and float(run.data.params["train.lr"]) == pytest.approx(row["train.lr"])
        history = client.get_metric_history(run.info.run_id, "val_acc")
        assert [m.step for m in history] == [1, 2] and run.data.metrics["score"] == pytest.approx(row["score"])
        assert run.data.metrics["after.evaluate.test_acc"] == pytest.approx(row["test_acc"])
        top = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"config.json", "eval", "checkpoint", "after"} <= top
    assert not (tmp_path / "results" / "tracked" / "wandb").exists()  # tracking: [mlflow] leaves W&B out


# The shipped spaces' twins run once each, with these one-command checks, in tests/test_seed_spaces.py.
