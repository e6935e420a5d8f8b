"""`raycls tune` end to end on a real local Ray: Tune + Optuna + ASHA, Ray Train DDP, Parquet, W&B offline.

One Ray instance is shared by the session (`ray_local`, conftest: starting one costs seconds); the resume
test runs `raycls tune` in its own process group (with its own Ray) so that it can be SIGKILLed. Whole
searches are `slow`; `-m "not slow"` keeps the smoke search (two one-epoch trials) and the pure tests.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pyarrow as pa
import pytest
import torch

from raycls.config import TrialConfig, load_experiment
from raycls.results import read_leaderboard
from raycls.tune.driver import TuneOptions, run_tune
from raycls.tune.searcher import create_searcher

from .conftest import REPO, assert_resumed_whole, kill_driver_after_rows, rows_written, tune_reports, write_yaml
from .wandb_reader import read_run

BASE = """
base:
  data: {name: digits, val_fraction: 0.2}
  model: {name: small_cnn, width: 8}
  train: {epochs: 4, batch_size: 64, optimizer: adamw, lr: 3.0e-3, warmup_epochs: 0}
"""

E2E = (
    """
experiment: {name: e2e, trials: 8, concurrency: 1}  # one at a time: ASHA sees results in one order, every run
search:
  seed: 0
  n_startup_trials: 8
  points_to_evaluate:
    - {train.optimizer: sgd, train.lr: 1.0e+30, model.width: 8}   # diverges (outside the range on purpose)
    - {train.optimizer: adamw, train.lr: 0.01, model.width: 16}   # a good trial
    - {train.optimizer: adamw, train.lr: 0.0001, model.width: 8}  # a weak one for ASHA to stop
scheduler: {name: asha, max_t: 4, grace_period: 1, reduction_factor: 2}
wandb: {mode: offline}
space:
  train.optimizer: {type: choice, values: [adamw, sgd]}
  train.lr: {type: loguniform, low: 1.0e-4, high: 0.1}
  train.momentum: {type: uniform, low: 0.8, high: 0.95, when: {train.optimizer: sgd}}
  model.width: {type: choice, values: [8, 16]}
"""
    + BASE
)


def without_eval(base: str) -> str:
    """BASE for a search whose test is not about the held-out evaluation: no evaluation (seconds per trial)."""
    return base.replace("warmup_epochs: 0}", "warmup_epochs: 0}\n  eval: {on: none}")


FAKE_KEY = "0123456789abcdef0123456789abcdef01234567"  # the shape of a W&B key, but fake
# Cloud credentials a cluster user has in their environment: fake values of the real shapes.
FAKE_SECRETS = {
    "WANDB_API_KEY": FAKE_KEY,
    "AWS_ACCESS_KEY_ID": "AKIAFAKEFAKEFAKEFAKE",
    "AWS_SECRET_ACCESS_KEY": "fakeSecretKeyfakeSecretKeyfakeSecretKey0",
}


@pytest.fixture(scope="module")
def e2e(ray_local, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("tune")
    experiment = load_experiment(write_yaml(root / "e2e.yaml", E2E))
    storage = str(root / "results")
    planted = {name: os.environ.get(name) for name in FAKE_SECRETS}
    os.environ.update(FAKE_SECRETS)  # must never land in any file the run writes
    try:
        outcome = run_tune(experiment, TuneOptions(storage=storage, live=False))
    finally:
        for name, value in planted.items():
            os.environ.pop(name) if value is None else os.environ.__setitem__(name, value)
    return experiment, storage, outcome


@pytest.mark.slow
def test_every_trial_lands_in_the_leaderboard_with_its_status(e2e) -> None:
    experiment, storage, outcome = e2e
    table = read_leaderboard(storage, "e2e").table
    rows = table.to_pylist()
    assert len(rows) == 8 == outcome.trials and len({r["trial_id"] for r in rows}) == 8
    statuses = [r["status"] for r in rows]
    assert set(statuses) <= {"completed", "early_stopped", "failed"}
    assert "completed" in statuses and "early_stopped" in statuses  # ASHA stopped some
    failed = [r for r in rows if r["status"] == "failed"]
    assert any(r["train.lr"] == 1e30 and "diverged" in r["error"] for r in failed)
    for r in rows:
        if r["status"] == "completed":
            assert r["epochs"] == 4 and r["val_acc"] is not None and r["error"] is None
        if r["status"] == "early_stopped":
            assert r["epochs"] < 4
    assert max(r["score"] or 0 for r in rows) > 0.8


@pytest.mark.slow
def test_parameter_columns_are_typed(e2e) -> None:
    table = read_leaderboard(e2e[1], "e2e").table
    assert table.schema.field("train.lr").type == pa.float64()
    assert table.schema.field("model.width").type == pa.int64()
    assert table.schema.field("train.optimizer").type == pa.string()
    for row in table.to_pylist():  # conditional parameter: only sampled for SGD
        assert (row["train.momentum"] is not None) == (row["train.optimizer"] == "sgd")


@pytest.mark.slow
def test_rows_replay_their_config_and_checkpoint(e2e) -> None:
    rows = read_leaderboard(e2e[1], "e2e").table.to_pylist()
    best = max((r for r in rows if r["status"] == "completed"), key=lambda r: r["score"])
    config = TrialConfig.from_json(best["config_json"])
    assert config.train.lr == best["train.lr"] and config.model.width == best["model.width"]
    weights = torch.load(Path(best["checkpoint"]) / "model.pt", weights_only=True)
    metrics = json.loads((Path(best["checkpoint"]) / "metrics.json").read_text())
    assert metrics["val_acc"] == best["val_acc"] and metrics["epoch"] == best["best_epoch"]
    assert all(torch.isfinite(w.float()).all() for w in weights.values())


@pytest.mark.slow
def test_every_trial_folder_holds_its_resolved_config(e2e) -> None:
    """Written once, by the trial, where its checkpoints are; the row's config_json is read from it."""
    rows = read_leaderboard(e2e[1], "e2e").table.to_pylist()
    folders = {p.parent for p in (Path(e2e[1]) / "e2e").glob("tune_trainable_*/config.json")}
    assert len(folders) == len(rows)
    for folder in folders:
        written = TrialConfig.model_validate(json.loads((folder / "config.json").read_text()))
        row = next(r for r in rows if r["trial_id"] in folder.name)
        assert written == TrialConfig.from_json(row["config_json"])
        assert written.train.lr == row["train.lr"]


@pytest.mark.slow
def test_optuna_study_states_match_leaderboard(e2e) -> None:
    experiment, storage, _ = e2e
    from raycls.storage import journal_file
    from raycls.tune.searcher import open_study_storage

    study = optuna.load_study(study_name="e2e", storage=open_study_storage(journal_file(Path(storage) / "e2e")))
    by_state = {s: sum(t.state == s for t in study.trials) for s in optuna.trial.TrialState}
    rows = read_leaderboard(storage, "e2e").table.to_pylist()
    assert by_state[optuna.trial.TrialState.COMPLETE] == sum(r["status"] == "completed" for r in rows)
    assert by_state[optuna.trial.TrialState.PRUNED] == sum(r["status"] == "early_stopped" for r in rows)
    assert by_state[optuna.trial.TrialState.FAIL] == sum(r["status"] == "failed" for r in rows)
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert all(t.intermediate_values for t in pruned)  # TPE sees their per-epoch values


@pytest.mark.slow
def test_wandb_offline_runs_hold_the_logged_metrics(e2e) -> None:
    _, storage, _ = e2e
    rows = {r["trial_id"]: r for r in read_leaderboard(storage, "e2e").table.to_pylist()}
    runs = sorted((Path(storage) / "e2e" / "wandb").glob("offline-run-*"))
    assert len(runs) == 8
    for run_dir in runs:
        run = read_run(run_dir)
        row = rows[run["name"]]
        assert run["group"] == "e2e" and run["config"]["train.lr"] == row["train.lr"]
        logged = [h for h in run["history"] if "val_acc" in h]
        assert len(logged) == (0 if row["status"] == "failed" else row["epochs"])
        assert run["summary"]["status"] == row["status"]
        if row["score"] is not None:
            assert run["summary"]["score"] == pytest.approx(row["score"])
        if row["status"] == "completed":  # the held-out evaluation: its summary, and its tables as W&B charts
            assert run["summary"]["test_acc"] == pytest.approx(row["test_acc"])
            media = {key.removesuffix("/_type"): h[key] for h in run["history"] for key in h if key.endswith("/_type")}
            assert media["eval/confusion_matrix_table"] == media["eval/reliability_table"] == "table-file"
            table = next(run_dir.glob("files/media/table/eval/confusion_matrix_table_*.table.json"))
            cells = json.loads(table.read_text())["data"]  # [actual, predicted, count]: every test image once
            assert sum(n for _, _, n in cells) == row["test_images"]
            assert sum(n for a, p, n in cells if a == p) / row["test_images"] == pytest.approx(row["test_acc"])


@pytest.mark.slow
def test_completed_trials_are_evaluated_on_held_out_data(e2e) -> None:
    """Each completed trial's best weights go through the default suite on its own worker at its end; trials
    ASHA stopped (and failed ones) are not evaluated (`eval.on: completed`)."""
    _, storage, _ = e2e
    rows = read_leaderboard(storage, "e2e").table.to_pylist()
    for row in rows:
        folder = Path(storage) / "e2e" / "eval" / row["trial_id"]
        if row["status"] == "completed":
            summary = json.loads((folder / "metrics.json").read_text())
            assert row["eval_split"] == summary["eval_split"] == "test"  # digits' carved test split
            assert row["eval_suite"] == "default" and row["test_acc"] == pytest.approx(summary["metrics"]["test_acc"])
            assert 0 <= row["test_ece"] <= 1 and row["test_auroc"] > 0.5 and row["test_macro_f1"] is not None
            written = {p.name for p in folder.iterdir()}  # a search's trials write the pictures' tables only
            assert {"confusion_matrix.csv", "reliability.csv", "classification_report.csv"} <= written
            assert not any(name.endswith(".png") for name in written)
        else:
            assert not folder.exists() and row["test_acc"] is None and row["eval_split"] is None


@pytest.mark.slow
def test_eval_on_all_evaluates_early_stopped_trials_too(ray_local, tmp_path: Path) -> None:
    """`eval.on: all`: the driver evaluates, after the search, the trials ASHA stopped (they never reach
    their own evaluation); the good first trial is evaluated by itself, the weak second one is stopped."""
    space = write_yaml(
        tmp_path / "all.yaml",
        """
experiment: {name: evalall, trials: 2, concurrency: 1}
search:
  points_to_evaluate:
    - {train.lr: 0.01}
    - {train.lr: 0.00001}
scheduler: {name: asha, max_t: 3, grace_period: 1, reduction_factor: 2}
wandb: {mode: disabled}
space:
  train.lr: {type: loguniform, low: 1.0e-5, high: 0.1}
"""
        + BASE.replace("epochs: 4", "epochs: 3").replace("warmup_epochs: 0}", "warmup_epochs: 0}\n  eval: {on: all}"),
    )
    storage = str(tmp_path / "results")
    run_tune(load_experiment(space), TuneOptions(storage=storage, live=False))
    rows = {r["train.lr"]: r for r in read_leaderboard(storage, "evalall").table.to_pylist()}
    assert rows[0.01]["status"] == "completed" and rows[0.00001]["status"] == "early_stopped"
    for row in rows.values():
        assert row["test_acc"] is not None and row["eval_split"] == "test"
        assert (Path(storage) / "evalall" / "eval" / row["trial_id"] / "metrics.json").is_file()


@pytest.mark.slow
def test_raycls_eval_twice_leaves_one_set_of_columns(e2e, tmp_path: Path, capsys) -> None:
    """`raycls eval` after the search: the full suite, then the default one again on the best two trials;
    one row per trial, and only the last evaluation's columns."""
    from raycls.cli import main

    storage = tmp_path / "results"
    shutil.copytree(Path(e2e[1]) / "e2e", storage / "e2e")
    before = read_leaderboard(str(storage), "e2e").table
    best_two = [
        r["trial_id"]
        for r in sorted(
            (r for r in before.to_pylist() if r["status"] == "completed"), key=lambda r: r["score"], reverse=True
        )[:2]
    ]
    main(["eval", "e2e", "--trial", "top:2", "--suite", "full", "--storage", str(storage)])
    full = read_leaderboard(str(storage), "e2e").table
    assert full.num_rows == 8 and len(full.column_names) == len(set(full.column_names))
    evaluated = {r["trial_id"]: r for r in full.to_pylist() if r["eval_suite"] == "full"}
    assert sorted(evaluated) == sorted(best_two) and all(r["test_acc_tta"] is not None for r in evaluated.values())
    assert "test_ood_textures_energy_auroc" in full.column_names and "test_shift_mca" in full.column_names
    main(["eval", "e2e", "--trial", best_two[0], "--storage", str(storage)])  # the trial's own suite: default
    again = read_leaderboard(str(storage), "e2e").table
    rows = {r["trial_id"]: r for r in again.to_pylist()}
    assert (
        again.num_rows == 8
        and rows[best_two[0]]["eval_suite"] == "default"
        and rows[best_two[0]]["test_acc_tta"] is None
    )
    assert rows[best_two[1]]["eval_suite"] == "full"
    assert rows[best_two[0]]["test_acc"] == pytest.approx(
        evaluated[best_two[0]]["test_acc"]
    )  # same weights, same split
    assert not (storage / "e2e" / "eval" / best_two[0] / "ood_scores.png").exists()  # the folder was replaced
    out = capsys.readouterr().out
    assert "evaluated 2 trial(s)" in out and "evaluated 1 trial(s)" in out


# ------------------------------------------------------------------------------------------- report
REPORT_SECTIONS = (
    "leaderboard",
    "status",
    "best_so_far",
    "learning_curves",
    "train_val_curves",
    "parallel_coordinates",
    "choices",
    "importance",
    "slices",
    "evaluation",
)


@pytest.fixture(scope="module")
def e2e_report(e2e, chromium):
    """`raycls report` of the e2e digits search (its own process, as a user runs it), W&B offline."""
    _, storage, _ = e2e
    done = subprocess.run(
        [sys.executable, "-m", "raycls.cli", "report", "e2e", "--storage", storage, "--wandb", "offline"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return Path(storage) / "e2e" / "report" / "report.html", done.stdout


@pytest.mark.slow
def test_report_of_a_digits_search_has_every_section(e2e, e2e_report) -> None:
    html, printed = e2e_report
    page = html.read_text()
    assert f"Report: {html}" in printed
    rows = read_leaderboard(e2e[1], "e2e").table.to_pylist()
    for section in REPORT_SECTIONS:
        assert f'<section id="{section}">' in page, section
    for section in set(REPORT_SECTIONS) - {"evaluation"}:  # every figure was drawn, none replaced by a note
        assert f'id="figure-{section}"' in page, section
    assert page.count("<script") >= len(REPORT_SECTIONS) and "<script src=" not in page  # plotly.js inlined
    assert "rung 1" in page and "rung 2" in page and "stopped here" in page  # ASHA: max_t 4, grace 1, rf 2
    assert all(r["trial_id"] in page for r in rows)
    # The top trials were evaluated: their confusion matrix and reliability diagram are inlined images.
    assert page.count("data:image/png;base64,") >= 2 and "confusion matrix" in page and "reliability" in page


@pytest.mark.slow
def test_report_pngs_are_images_and_wandb_has_the_figures(e2e, e2e_report, chromium) -> None:
    from PIL import Image

    html, _ = e2e_report
    if chromium is None:
        pytest.skip("no Chromium here and none could be installed: kaleido cannot draw PNGs")
    pngs = sorted(html.parent.glob("*.png"))
    assert {p.stem for p in pngs} == set(REPORT_SECTIONS) - {"evaluation"}
    for png in pngs:
        with Image.open(png) as image:
            image.verify()
        with Image.open(png) as image:
            assert image.size == (1200, 700) and len(image.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 20, png
    (run_dir,) = (Path(e2e[1]) / "e2e" / "wandb").glob("offline-run-*-e2e-report")
    run = read_run(run_dir)
    assert run["group"] == "e2e" and run["summary"]["report/trials"] == 8
    assert (run_dir / "files" / "requirements.txt").is_file()  # the experiment's installed packages (not per trial)
    logged = {
        key.split("/")[1] for h in run["history"] for key in h if key.startswith("report/") and key.endswith("/_type")
    }
    assert set(REPORT_SECTIONS) - {"evaluation"} <= logged
    for figure in (run_dir / "files" / "media" / "plotly" / "report").glob("*.plotly.json"):
        assert json.loads(figure.read_text())["data"], figure


@pytest.mark.slow
def test_report_renders_in_headless_chromium(e2e_report, chromium, tmp_path: Path) -> None:
    """Opened from a file, offline, in headless Chromium (driven by Playwright): no page error, no console
    error, every figure drawn, and a screenshot with content. (WebGL's performance warnings are warnings.)"""
    from PIL import Image
    from playwright.sync_api import sync_playwright

    if chromium is None:
        pytest.skip("no Chromium here and none could be installed (Debian's chromium package)")
    html, _ = e2e_report
    figures = html.read_text().count('<div id="figure-')
    shot, errors = tmp_path / "report.png", []
    flags = [
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-sync",
        "--enable-unsafe-swiftshader",
        "--disable-background-networking",
        "--disable-component-update",
    ]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=flags)
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 900})
            page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(html.as_uri())
            page.wait_for_function(
                f"document.querySelectorAll('.js-plotly-plot .main-svg').length >= {figures}", timeout=60_000
            )
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert figures == len(REPORT_SECTIONS) - 1 and not errors, errors
    with Image.open(shot) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20) or []
        assert image.height > 3000 and len(colours) > 100, "the screenshot is blank or cut short"


@pytest.mark.slow
def test_optuna_dashboard_serves_the_experiments_study(e2e, tmp_path: Path) -> None:
    """`optuna-dashboard <storage>/<experiment>/optuna.journal`, as the README says: its API lists the study."""
    import socket
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    journal = Path(e2e[1]) / "e2e" / "optuna.journal"
    dashboard = shutil.which("optuna-dashboard") or pytest.fail("optuna-dashboard is not installed (a dependency)")
    server = subprocess.Popen(
        [dashboard, str(journal), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )

    def get(path: str) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return json.loads(response.read())

    try:
        deadline, answer = time.monotonic() + 90, None
        while time.monotonic() < deadline and server.poll() is None and answer is None:
            try:
                answer = get("/api/studies")
            except OSError:
                time.sleep(0.5)
        assert answer is not None, (
            server.stderr.read().decode(errors="replace")[-2000:] if server.poll() is not None else "no answer"
        )
        (study,) = [s for s in answer["study_summaries"] if s["study_name"] == "e2e"]
        detail = get(f"/api/studies/{study['study_id']}")
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert study["directions"] == ["maximize"] and len(detail["trials"]) == 8


@pytest.mark.slow
def test_report_of_one_trial_and_of_only_failed_trials_says_so(ray_local, tmp_path: Path, capsys) -> None:
    """`raycls tune` ends with the report (here in-process, on the session's Ray); one trial, or only failed
    ones, still get a report that says so."""
    from raycls.cli import main
    from raycls.report.page import write_report

    storage = str(tmp_path / "results")
    one = write_yaml(
        tmp_path / "one.yaml",
        "experiment: {name: one, trials: 1}\nwandb: {mode: disabled}\n"
        + without_eval(BASE.replace("epochs: 4", "epochs: 1")),
    )
    main(["tune", str(one), "--storage", storage])
    report = Path(storage) / "one" / "report" / "report.html"
    assert f"Report: {report}" in capsys.readouterr().out.replace("\n", "")
    assert not list(report.parent.glob("*.png"))  # the PNGs only with --report-png (or `raycls report`)
    page = report.read_text()
    assert "1 trial (1 completed" in page and "One trial: there is no progress to show yet." in page
    assert "Needs at least two completed trials and a sampled parameter" in page  # importance, slices
    (tmp_path / "no-images").mkdir()  # exists (a missing data.path is refused before any trial), holds nothing
    failing = load_experiment(
        write_yaml(
            tmp_path / "failing.yaml",
            """
experiment: {name: failing, trials: 2, concurrency: 2}
wandb: {mode: disabled}
space:
  train.lr: {type: loguniform, low: 1.0e-3, high: 1.0e-2}
"""
            + BASE.replace("name: digits", f"name: folder, path: {tmp_path / 'no-images'}"),
        )
    )
    run_tune(failing, TuneOptions(storage=storage, live=False))
    page = write_report(storage, "failing", png=False).html.read_text()
    assert "2 trials (0 completed, 0 early_stopped, 2 failed)" in page and "Every trial failed" in page
    assert "No trial ended with a score" in page and "no-images" in page  # the errors, in the leaderboard


@pytest.mark.slow
def test_recipes_search_samples_the_toolkit_and_stops_on_plateaus(ray_local, tmp_path: Path) -> None:
    """search_spaces/recipes-digits.yaml (optimizers, SAM, Lookahead, gradient centralisation, lr multiplier,
    RandAugment, erasing, affine) end to end. Early stopping that no epoch can satisfy (min_delta 1.0) ends
    every trial at its second epoch: `completed` with `stopped_by: patience`, and Optuna is told COMPLETE
    with the trial's best value, the row's score."""
    from raycls.storage import journal_file
    from raycls.tune.searcher import open_study_storage

    overrides = {
        "experiment.trials": 2,
        "scheduler.name": "fifo",
        "train.epochs": 4,
        "model.width": 8,
        "eval.on": "none",
        "train.early_stopping.patience": 1,
        "train.early_stopping.min_delta": 1.0,  # an accuracy never gains a whole 1.0
    }
    experiment = load_experiment(REPO / "search_spaces" / "recipes-digits.yaml", overrides)
    storage = str(tmp_path / "results")
    run_tune(experiment, TuneOptions(storage=storage, live=False, wandb_mode="disabled"))
    rows = read_leaderboard(storage, "recipes-digits").table.to_pylist()
    assert len(rows) == 2 and all(r["status"] == "completed" and r["stopped_by"] == "patience" for r in rows), [
        (r["status"], r["stopped_by"], r["epochs"], r["error"]) for r in rows
    ]
    assert all(r["epochs"] == 2 and r["max_epochs"] == 4 and r["score"] > 0.15 for r in rows), [
        (r["epochs"], r["max_epochs"], r["score"]) for r in rows
    ]  # chance: 0.1
    for row in rows:
        config = TrialConfig.from_json(row["config_json"])
        assert config.augment.randaugment.magnitude == row["augment.randaugment.magnitude"]
        assert config.train.lookahead.k == row["train.lookahead.k"] and config.train.optimizer == row["train.optimizer"]
        assert (config.train.sam is not None) == (row["train.optimizer"] == "sgd")
    study = optuna.load_study(
        study_name="recipes-digits", storage=open_study_storage(journal_file(Path(storage) / "recipes-digits"))
    )
    told = {t.user_attrs["trial_id"]: t for t in study.trials}
    for row in rows:
        trial = told[row["trial_id"]]
        assert trial.state == optuna.trial.TrialState.COMPLETE and trial.value == pytest.approx(row["score"])


@pytest.mark.slow
def test_grid_search_runs_every_combination_once(ray_local, tmp_path: Path) -> None:
    """search.algorithm: grid (Optuna's GridSampler): a space of choices, each combination exactly once."""
    from raycls.errors import ConfigError
    from raycls.search import SAMPLERS

    experiment = load_experiment(
        write_yaml(
            tmp_path / "grid.yaml",
            """
experiment: {name: grid, trials: 4, concurrency: 2}
search: {algorithm: grid}
scheduler: {name: fifo}
wandb: {mode: disabled}
space:
  model.width: {type: choice, values: [8, 16]}
  train.optimizer: {type: choice, values: [adamw, sgd]}
"""
            + without_eval(BASE.replace("epochs: 4", "epochs: 1")),
        )
    )
    storage = str(tmp_path / "results")
    run_tune(experiment, TuneOptions(storage=storage, live=False))
    rows = read_leaderboard(storage, "grid").table.to_pylist()
    assert sorted((r["model.width"], r["train.optimizer"]) for r in rows) == [
        (8, "adamw"),
        (8, "sgd"),
        (16, "adamw"),
        (16, "sgd"),
    ]
    mixed = load_experiment(
        write_yaml(tmp_path / "mixed.yaml", "space:\n  train.lr: {type: loguniform, low: 1.0e-3, high: 1.0e-1}\n")
    )
    with pytest.raises(ConfigError, match="grid enumerates choices without `when`; not these: train.lr"):
        SAMPLERS.create("grid", mixed.search, mixed.space)


@pytest.mark.slow
def test_history_dataset_has_every_epoch(e2e) -> None:
    history = read_leaderboard(e2e[1], "e2e", kind="history").table
    rows = read_leaderboard(e2e[1], "e2e").table.to_pylist()
    for row in rows:
        epochs = [h["epoch"] for h in history.to_pylist() if h["trial_id"] == row["trial_id"]]
        assert len(epochs) == row["epochs"]


def test_conditional_space_through_the_searcher(tmp_path: Path) -> None:
    experiment = load_experiment(write_yaml(tmp_path / "e2e.yaml", E2E))
    searcher = create_searcher(experiment, tmp_path / "state", None)
    seen = []
    for i in range(12):
        params = searcher.suggest(f"t{i}")
        assert "." in next(iter(params))  # flat dotted keys, not nested dicts
        seen.append(params)
        assert ("train.momentum" in params) == (params["train.optimizer"] == "sgd")
    assert seen[0]["train.lr"] == 1e30  # points_to_evaluate come first


# A two-worker trial through Ray Train: test_stream's (each image once over the ranks, resources released
# after), test_evaluate's (its two workers' evaluation equals one process's), test_multihost's (spanning two
# hosts) and test_faults' (a node lost, a diverging trial retried).


@pytest.mark.slow
def test_resume_after_driver_sigkill(tmp_path: Path) -> None:
    space = write_yaml(
        tmp_path / "resume.yaml",
        """
experiment: {name: resume, trials: 4, concurrency: 1}
search: {seed: 1}
scheduler: {name: fifo}
wandb: {mode: disabled}
space:
  train.lr: {type: loguniform, low: 1.0e-3, high: 1.0e-2}
"""
        # The local Ray dies with its driver here: resume starts a new one (test_faults' kill points and
        # test_multihost's drill resume on a cluster that lives on). No evaluation: the property is the rows.
        + without_eval(BASE.replace("epochs: 4", "epochs: 2")),
    )
    storage = tmp_path / "results"
    command = [sys.executable, "-m", "raycls.cli", "tune", str(space), "--storage", str(storage), "--num-cpus", "4"]
    env = dict(os.environ)
    board = storage / "resume" / "leaderboard"
    before = kill_driver_after_rows(command, env, board, tmp_path / "driver.log", rows=1)  # and its Ray
    assert 1 <= len(before) < 4, f"kill came too late or too early: {len(before)} rows"

    resumed = subprocess.run(
        [*command, "--resume", "--no-report"], capture_output=True, text=True, timeout=400, env=env
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    rows = assert_resumed_whole(storage, "resume", 4, before)
    assert all(r["status"] == "completed" for r in rows)


@pytest.mark.slow
@pytest.mark.parametrize("snapshot", ["kept", "lost"])
def test_resume_writes_the_row_of_a_trial_optuna_closed_before_the_kill(
    ray_local, tmp_path: Path, snapshot: str
) -> None:
    """Tune tells Optuna a trial ended before its callbacks write the row: a kill in between left a COMPLETE
    Optuna trial without a row (seen in the fault tests, once in five). Removing a row makes that moment
    here. `--resume` writes the row from the trial's folder, with Tune's snapshot (`kept`: Tune restores the
    trial as ended) or without (`lost`: the search is rebuilt, and must not train a replacement)."""
    space = write_yaml(
        tmp_path / "told.yaml",
        """
experiment: {name: told, trials: 3, concurrency: 1}
search: {seed: 2}
scheduler: {name: fifo}
wandb: {mode: disabled}
space:
  train.lr: {type: loguniform, low: 1.0e-3, high: 1.0e-2}
"""
        + BASE.replace("epochs: 4", "epochs: 2"),
    )
    storage = tmp_path / "results"
    run_tune(load_experiment(space), TuneOptions(storage=str(storage), live=False))
    experiment_dir = storage / "told"
    original = {r["trial_id"]: r for r in read_leaderboard(str(storage), "told").table.to_pylist()}
    victim = sorted(original)[1]
    (experiment_dir / "leaderboard" / f"{victim}.parquet").unlink()
    (experiment_dir / "history" / f"{victim}.parquet").unlink()
    if snapshot == "lost":
        for path in [*experiment_dir.glob("experiment_state-*.json"), *experiment_dir.glob("searcher-state-*.pkl")]:
            path.write_bytes(b"")
        shutil.rmtree(experiment_dir / ".raycls")
    before = rows_written(experiment_dir / "leaderboard")

    outcome = run_tune(load_experiment(space), TuneOptions(storage=str(storage), live=False, resume=True))
    rows = {r["trial_id"]: r for r in assert_resumed_whole(storage, "told", 3, before)}
    assert outcome.trials == 3 and set(rows) == set(original)  # no replacement was trained
    again, first = rows[victim], original[victim]
    assert again["status"] == "completed" and again["epochs"] == first["epochs"] == 2
    for column in ("val_acc", "val_loss", "score", "checkpoint", "seed", "train.lr", "config_json"):
        assert again[column] == first[column], column
    history = read_leaderboard(str(storage), "told", kind="history").table.to_pylist()
    assert sorted(h["epoch"] for h in history if h["trial_id"] == victim) == [1, 2]


@pytest.mark.slow
def test_api_key_never_written(e2e) -> None:
    _, storage, _ = e2e
    files = [p for p in Path(storage).rglob("*") if p.is_file()]
    assert len(files) > 50
    leaked = [(p, name) for p in files for name, secret in FAKE_SECRETS.items() if secret.encode() in p.read_bytes()]
    assert not leaked, leaked


@pytest.mark.slow
def test_fractional_gpus_pack_four_trials_on_one_gpu(ray_local, tmp_path: Path) -> None:
    space = write_yaml(
        tmp_path / "frac.yaml",
        """
experiment: {name: frac, trials: 4, resources: {workers: 1, cpus_per_worker: 1, gpus_per_worker: 0.25}}
scheduler: {name: fifo}
wandb: {mode: disabled}
space:
  train.lr: {type: loguniform, low: 1.0e-3, high: 1.0e-2}
"""
        + without_eval(BASE.replace("epochs: 4", "epochs: 2")),
    )
    storage = str(tmp_path / "results")
    run_tune(load_experiment(space), TuneOptions(storage=storage, live=False))  # concurrency: 1 GPU / 0.25
    rows = read_leaderboard(storage, "frac").table.to_pylist()
    assert len(rows) == 4 and all(r["status"] == "completed" for r in rows)
    spans = sorted((r["started_at"], r["ended_at"]) for r in rows)
    # All four were scheduled together: each started before the first one ended.
    assert all(start < spans[0][1] for start, _ in spans)


def test_warm_start_seeds_the_study(tmp_path: Path) -> None:
    from raycls.storage import journal_file
    from raycls.tune.searcher import open_study_storage

    other = tmp_path / "other"
    study = optuna.create_study(
        study_name="other", storage=open_study_storage(journal_file(other)), direction="maximize"
    )
    for lr in (0.001, 0.01):
        study.enqueue_trial({"train.lr": lr})
        trial = study.ask()
        trial.suggest_float("train.lr", 1e-4, 0.1, log=True)
        study.tell(trial, 0.5)
    searcher = create_searcher(load_experiment(write_yaml(tmp_path / "e2e.yaml", E2E)), tmp_path / "mine", other)
    seeded = [t for t in searcher._ot_study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert [t.params["train.lr"] for t in seeded] == [0.001, 0.01]


@pytest.mark.slow
def test_raycls_train_through_ray_train(ray_local, tmp_path: Path) -> None:
    from raycls.config import Resources
    from raycls.train.ray_train import train_with_ray

    config = TrialConfig.model_validate(
        {
            "data": {"name": "digits"},
            "model": {"width": 8},
            "train": {"epochs": 2, "batch_size": 64, "optimizer": "adamw", "lr": 3e-3},
        }
    )
    summary = train_with_ray(
        config, tmp_path, resources=Resources(workers=1), metric="val_acc", mode="max", fast_dev_run=True
    )
    saved = json.loads((tmp_path / "metrics.json").read_text())
    # A fast dev run: one epoch, and the config written is the one that ran.
    assert [h["epoch"] for h in saved["history"]] == [1] and summary.final["epoch"] == 1
    assert TrialConfig.from_json((tmp_path / "config.json").read_text()) == config.fast_dev_run()
    assert (tmp_path / "checkpoints" / "best" / "model.pt").is_file()


@pytest.mark.slow
def test_two_worker_trials_in_a_row_on_one_trial_actor_each_report_their_own_epochs(ray_local, tmp_path: Path) -> None:
    """~35 s: two DDP trials one after the other. Tune reuses the trial actor, which hands the second trial
    the report queue the first one used (raycls.tune.trainable): each trial reports its own two epochs once,
    nothing left over from the trial before."""
    space = write_yaml(
        tmp_path / "two.yaml",
        """
experiment: {name: two, trials: 2, concurrency: 1, resources: {workers: 2, cpus_per_worker: 1}}
search: {points_to_evaluate: [{train.lr: 0.001}, {train.lr: 0.01}]}
scheduler: {name: fifo}
wandb: {mode: disabled}
space:
  train.lr: {type: loguniform, low: 1.0e-3, high: 1.0e-2}
"""
        + without_eval(
            BASE.replace("epochs: 4", "epochs: 2").replace(
                "val_fraction: 0.2}", "val_fraction: 0.2, train_subset: 300}"
            )
        ),
    )
    storage = tmp_path / "results"
    run_tune(load_experiment(space), TuneOptions(storage=str(storage), live=False))
    rows = read_leaderboard(str(storage), "two").table.to_pylist()
    assert sorted(r["train.lr"] for r in rows) == [0.001, 0.01]
    assert all(r["status"] == "completed" and r["epochs"] == 2 and r["workers"] == 2 for r in rows)
    history = read_leaderboard(str(storage), "two", kind="history").table.to_pylist()
    for row in rows:
        assert sorted(h["epoch"] for h in history if h["trial_id"] == row["trial_id"]) == [1, 2]
    # Both trials ran in one trial actor (Tune's reuse): the second took the first one's queue.
    pids = {r["pid"] for r in tune_reports(storage / "two")}
    assert len(pids) == 1


@pytest.mark.slow
def test_distilled_trial_records_its_teacher(ray_local, tmp_path: Path) -> None:
    space = write_yaml(
        tmp_path / "ema.yaml",
        """
experiment: {name: ema, trials: 1}
scheduler: {name: fifo}
wandb: {mode: disabled}
"""
        + without_eval(
            BASE.replace("epochs: 4", "epochs: 2").replace(
                "  model:", "  phase: {name: distill, ema_decay: 0.99}\n  model:"
            )
        ),
    )
    storage = str(tmp_path / "results")
    run_tune(load_experiment(space), TuneOptions(storage=storage, live=False))
    (row,) = read_leaderboard(storage, "ema").table.to_pylist()
    assert row["status"] == "completed" and row["phase"] == "distill" and row["teacher"] == "ema"


# ------------------------------------------------------------------------ smoke runs, logs, provenance
def _git(folder: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, check=True).stdout.strip()


def test_fast_dev_run_search_logs_lines_and_records_provenance(ray_local, tmp_path: Path, capsys) -> None:
    """`raycls tune --fast-dev-run` (two one-epoch trials) from a space in the user's git repository, with
    stdout not a terminal (as under `ray job submit` or nohup): one line per trial event; the rows carry the
    repository's commit, and the experiment folder the YAML as run."""
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    space = write_yaml(
        repo / "smoke.yaml",
        """
experiment: {name: smoke, trials: 6, concurrency: 2}
scheduler: {name: asha, grace_period: 1}
wandb: {mode: disabled}
space:
  train.lr: {type: loguniform, low: 1.0e-3, high: 1.0e-2}
"""
        + BASE,
    )
    _git(repo, "add", "smoke.yaml")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "space")
    storage = tmp_path / "results"
    experiment = load_experiment(space).as_fast_dev_run()
    capsys.readouterr()
    run_tune(experiment, TuneOptions(storage=str(storage), live=True))
    out = capsys.readouterr().out
    rows = read_leaderboard(str(storage), "smoke-fast-dev-run").table.to_pylist()
    assert len(rows) == 2 and all(r["status"] == "completed" and r["epochs"] == 1 == r["max_epochs"] for r in rows)
    assert all(r["train_images"] == 2 * 32 for r in rows)  # two batches of at most 32 images
    head = _git(repo, "rev-parse", "HEAD")
    assert all(r["git_commit"] == head and r["git_dirty"] is False and r["git_diff_sha"] is None for r in rows)
    for r in rows:
        assert f"trial {r['trial_id']} started" in out and f"trial {r['trial_id']} completed epoch 1" in out
    assert "[2/2 ended]" in out
    as_run = load_experiment(storage / "smoke-fast-dev-run" / "space.yaml")
    assert as_run.model_dump(exclude={"source"}) == experiment.model_dump(exclude={"source"})


def test_git_state_of_the_space_file(tmp_path: Path) -> None:
    from raycls.results.provenance import GitState, git_state

    assert git_state(tmp_path / "x.yaml") == GitState()  # outside any repository
    _git(tmp_path, "init", "-q")
    space = write_yaml(tmp_path / "x.yaml", "experiment: {trials: 2}\n")
    untracked = git_state(space)
    assert untracked.commit is None  # no commit yet: nothing to point at
    _git(tmp_path, "add", "x.yaml")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "x")
    clean = git_state(space)
    assert clean.commit == _git(tmp_path, "rev-parse", "HEAD") and clean.dirty is False and clean.diff_sha is None
    space.write_text("experiment: {trials: 3}\n")
    edited = git_state(space)
    assert edited.dirty is True and edited.diff_sha and edited.commit == clean.commit
    space.write_text("experiment: {trials: 4}\n")
    assert git_state(space).diff_sha != edited.diff_sha  # the hash tells two different edits apart
    other = write_yaml(tmp_path / "new.yaml", "experiment: {trials: 2}\n")  # not in git: its content counts
    assert git_state(other).dirty is True


@pytest.mark.slow
def test_replay_a_row_reproduces_its_losses(e2e, tmp_path: Path, capsys) -> None:
    """`raycls train --trial EXPERIMENT/TRIAL_ID --no-ray` retrains the row's config and seed: on CPU its
    per-epoch losses are the row's."""
    from raycls.cli import main

    _, storage, _ = e2e
    rows = read_leaderboard(storage, "e2e").table.to_pylist()
    row = next(r for r in rows if r["status"] == "completed")
    out = tmp_path / "replay"
    main(["train", "--trial", f"e2e/{row['trial_id']}", "--storage", storage, "--no-ray", "--out", str(out)])
    replayed = json.loads((out / "metrics.json").read_text())["history"]
    history = sorted(
        (
            h
            for h in read_leaderboard(storage, "e2e", kind="history").table.to_pylist()
            if h["trial_id"] == row["trial_id"]
        ),
        key=lambda h: h["epoch"],
    )
    assert [h["epoch"] for h in replayed] == [h["epoch"] for h in history] == list(range(1, 5))
    for mine, theirs in zip(replayed, history):
        assert mine["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-5)
        assert mine["val_loss"] == pytest.approx(theirs["val_loss"], rel=1e-5)
    assert json.loads((out / "config.json").read_text()) == json.loads(row["config_json"])


def test_run_tune_refuses_a_chain_metric_a_stage_does_not_report(tmp_path: Path) -> None:
    """Checked by run_tune itself (not only the CLI): a programmatic run fails before any trial or file."""
    from raycls.errors import ConfigError

    space = write_yaml(
        tmp_path / "chain.yaml",
        """
experiment: {name: chain, metric: val_acc, trials: 2}
base:
  data: {name: digits}
  model: {name: small_cnn, width: 8}
  phases:
    - phase: {name: supcon}
    - phase: {name: supervised}
""",
    )
    storage = tmp_path / "results"
    with pytest.raises(ConfigError, match="not reported by phase"):
        run_tune(load_experiment(space), TuneOptions(storage=str(storage), live=False))
    assert not (storage / "chain").exists()
