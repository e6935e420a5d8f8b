"""After the search, in the same command: what a space's `after:` section asks for the winner.

    search ends -> pick the trials (after.trials: best | top:K, raycls.ranking) -> explore the data
    -> evaluate (raycls eval) -> export (raycls export) -> predict (raycls predict) -> after/after.json
    -> the report (drawn next by `raycls tune`) shows them

Each step is the function its own command calls, registered in AFTER_STEPS; a step that fails is recorded
with its error and the others still run (the search's rows are safe in the leaderboard either way).
Everything lands under the experiment folder (storage.ExperimentPaths: eval/, export/, after/).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raycls.config.experiment import Experiment
from raycls.errors import RayclsError, last_error_line
from raycls.registry import Registry
from raycls.storage import ExperimentPaths

# What one step did for one trial (or for the experiment: explore), as after.json records it.
Record = dict[str, Any]
Say = Callable[[str], None]


@dataclass(frozen=True)
class AfterContext:
    experiment: Experiment
    storage: str
    paths: ExperimentPaths
    rows: list[dict[str, Any]]  # the picked trials' leaderboard rows, best first


# A step runs once and returns one record per trial it handled (explore: one for the experiment).
AFTER_STEPS: Registry[Callable[[AfterContext], list[Record]]] = Registry("after step")

# Metrics an evaluation record keeps (all of them stay in eval/<trial_id>/metrics.json).
SHOWN_EVAL = ("test_acc", "test_macro_f1", "test_auroc", "test_ece", "test_acc_tta", "test_shift_mca")


@dataclass
class AfterOutcome:
    file: Path | None  # after.json; None when the space asks for nothing
    records: list[Record] = field(default_factory=list)

    @property
    def failed(self) -> list[Record]:
        return [r for r in self.records if r["status"] == "failed"]


def run_after(experiment: Experiment, storage: str, *, say: Say = print) -> AfterOutcome:
    """Run the space's `after:` steps for its picked trials; write and return what each did."""
    from raycls.files import write_json_atomic
    from raycls.ranking import NoCompletedTrial
    from raycls.train.evaluation import pick_rows, trial_rows

    section = experiment.after
    if not section.steps:
        return AfterOutcome(None)
    paths = ExperimentPaths(storage, experiment.name)
    outcome = AfterOutcome(paths.after_file())
    started = time.perf_counter()
    try:
        rows = pick_rows(trial_rows(storage, experiment.name), section.trials, experiment.name)
    except (RayclsError, NoCompletedTrial) as err:
        # Nothing completed with a checkpoint: the steps have no model; the search's own message says why.
        outcome.records = [_record(name, None, "skipped", 0.0, error=str(err)) for name in section.steps]
        say(f"after: skipped ({err})")
    else:
        context = AfterContext(experiment, storage, paths, rows)
        for name in section.steps:
            outcome.records += _run_step(name, context, say)
        if "mlflow" in experiment.experiment.tracking:
            _to_mlflow(experiment, paths, outcome.records, say)
    write_json_atomic(
        outcome.file,
        {
            "experiment": experiment.name,
            "trials": section.trials,
            "steps": section.steps,
            "seconds": round(time.perf_counter() - started, 3),
            "records": outcome.records,
        },
    )
    say(f"after: {len(outcome.records)} record(s), {len(outcome.failed)} failed -> {outcome.file}")
    return outcome


def _run_step(name: str, context: AfterContext, say: Say) -> list[Record]:
    started = time.perf_counter()
    try:
        records = AFTER_STEPS.get(name)(context)
    except Exception as err:  # noqa: BLE001 - one step's failure is recorded; the next steps still run
        message = last_error_line(f"{type(err).__name__}: {err}")
        say(f"after {name}: failed ({message})")
        return [_record(name, None, "failed", time.perf_counter() - started, error=message)]
    for record in records:
        say(f"after {name}{' ' + record['trial_id'] if record['trial_id'] else ''}: {_describe(record)}")
    return records


def _to_mlflow(experiment: Experiment, paths: ExperimentPaths, records: list[Record], say: Say) -> None:
    """The steps' metrics and files into each trial's MLflow run; MLflow mirrors, so a failure is said only."""
    from raycls.results.mlflow_log import log_after

    try:
        say(f"after: {log_after(experiment.mlflow, paths, records)} record(s) logged to MLflow")
    except Exception as err:  # noqa: BLE001 - the files are written; the mirror is best effort
        say(f"after: MLflow logging failed ({type(err).__name__}: {err})")


def _record(step: str, trial_id: str | None, status: str, seconds: float, **details: Any) -> Record:
    return {"step": step, "trial_id": trial_id, "status": status, "seconds": round(seconds, 3), **details}


def _describe(record: Record) -> str:
    shown = {k: v for k, v in record.get("metrics", {}).items()}
    text = "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())
    return f"{text}  -> {record.get('out', '')}".strip()


def _timed(step: str, trial_id: str | None, run: Callable[[], dict[str, Any]]) -> Record:
    started = time.perf_counter()
    details = run()
    return _record(step, trial_id, "ok", time.perf_counter() - started, **details)


# ------------------------------------------------------------------------------------------------ steps
@AFTER_STEPS.register("explore")
def explore_step(context: AfterContext) -> list[Record]:
    """`raycls data explore` of the space's base data (its splits as a trial carves them)."""
    from raycls.config import resolve_trial
    from raycls.data.explore import REPORT_FILE, explore

    out = context.paths.after_explore_dir()

    def run() -> dict[str, Any]:
        report = explore(resolve_trial(context.experiment), out)
        metrics: dict[str, Any] = {f"{n}_images": s["images"] for n, s in report["splits"].items()}
        metrics["train_imbalance"] = float(report["splits"]["train"]["imbalance_ratio"])
        if "train_test_leakage" in report:
            metrics["leaked_test_images"] = report["train_test_leakage"]["exact"]
        return {"out": str(out / REPORT_FILE), "metrics": metrics, "files": sorted(p.name for p in out.iterdir())}

    return [_timed("explore", None, run)]


@AFTER_STEPS.register("evaluate")
def evaluate_step(context: AfterContext) -> list[Record]:
    """`raycls eval --suite SUITE` of each picked trial: eval/<trial_id>/ and the row's test_* columns."""
    from raycls.train.evaluation import evaluate_rows

    suite = context.experiment.after.evaluate
    records = []
    for row in context.rows:  # one at a time: each trial's own record and timing

        def run(row: dict[str, Any] = row) -> dict[str, Any]:
            summary = evaluate_rows(context.storage, context.experiment.name, [row], suite=suite)[0]
            metrics = {k: float(v) for k, v in summary["metrics"].items() if k in SHOWN_EVAL}
            return {"out": context.paths.eval_dir(row["trial_id"]), "suite": summary["eval_suite"], "metrics": metrics}

        records.append(_timed("evaluate", row["trial_id"], run))
    return records


@AFTER_STEPS.register("export")
def export_step(context: AfterContext) -> list[Record]:
    """`raycls export` (ONNX, checked against PyTorch; int8 copies when asked) of each picked trial."""
    from raycls.deliver.export import REPORT_FILE, export
    from raycls.deliver.model import load_trial_model

    settings = context.experiment.after.export
    assert settings is not None  # the step runs only when asked for
    records = []
    for row in context.rows:

        def run(row: dict[str, Any] = row) -> dict[str, Any]:
            model = load_trial_model(context.storage, context.experiment.name, row["trial_id"])
            out = context.paths.local_export_dir(row["trial_id"])
            report = export(model, out, int8=settings.int8)
            parity = report["parity"]
            metrics = {"onnx_acc": float(parity["onnx_acc"]), "top1_agreement": float(parity["top1_agreement"])}
            if "int8" in report:
                metrics["int8"] = report["int8"]["shipped"] or "not shipped"
            return {"out": str(out / REPORT_FILE), "files": list(report["files"]), "metrics": metrics}

        records.append(_timed("export", row["trial_id"], run))
    return records


@AFTER_STEPS.register("predict")
def predict_step(context: AfterContext) -> list[Record]:
    """`raycls predict` of each picked trial on `after.predict.images` (files, folders, globs, CSVs of file
    names): one row per image with its top-k labels and confidences."""
    import torch

    from raycls.deliver.model import load_trial_model
    from raycls.deliver.predict import Predictor, image_paths, predict, write_predictions
    from raycls.train.steps import default_device

    settings = context.experiment.after.predict
    assert settings is not None
    images = image_paths(settings.images)
    device = default_device()
    records = []
    for row in context.rows:

        def run(row: dict[str, Any] = row) -> dict[str, Any]:
            model = load_trial_model(context.storage, context.experiment.name, row["trial_id"], device=str(device))
            predictor = Predictor.from_trial(model, torch.device(device))
            rows = predict(predictor, images, topk=settings.topk, tta=settings.tta, invert=settings.invert)
            out = predictions_file(context.paths, row["trial_id"], settings.out)
            write_predictions(rows, out)
            read = [r for r in rows if r["error"] is None]
            confidence = sum(r["confidence"] for r in read) / len(read) if read else float("nan")
            metrics = {"images": len(rows), "unreadable": len(rows) - len(read), "mean_confidence": confidence}
            return {"out": str(out), "metrics": metrics}

        records.append(_timed("predict", row["trial_id"], run))
    return records


def predictions_file(paths: ExperimentPaths, trial_id: str, out: str) -> Path:
    """`after.predict.out`: a file name goes under after/<trial_id>/ (one file per picked trial); an
    absolute path is used as given."""
    given = Path(out).expanduser()
    return given if given.is_absolute() else paths.after_trial_dir(trial_id) / given


def read_after(paths: ExperimentPaths) -> dict[str, Any] | None:
    """The experiment's after.json (None: its space asked for nothing, or it has not run)."""
    import json

    file = paths.after_file()
    return json.loads(file.read_text()) if file.is_file() else None
