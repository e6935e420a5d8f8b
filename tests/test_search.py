"""Searches that decide more (issue 16): several objectives with ASHA, a time budget, a target, a warm start
from a changed space, and the errors a user gets for asking what cannot be done.

The searches run on the session's local Ray (`ray_local`) with real Optuna studies read back from their
journals; the front is checked by brute force over the leaderboard rows.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import optuna
import pyarrow as pa
import pytest
import torch
from optuna.trial import TrialState
from torch import nn

from raycls import names
from raycls.cli import main
from raycls.config import load_experiment
from raycls.evaluate.cost import measure_cost
from raycls.prepare import prepare_experiment
from raycls.report.data import load_report_data
from raycls.report.figures import pareto as pareto_section
from raycls.results import read_leaderboard
from raycls.results.pareto import mark_pareto, non_dominated_ranks
from raycls.storage import journal_file
from raycls.tune.driver import TuneOptions, run_tune
from raycls.tune.searcher import create_searcher, open_study_storage

from .conftest import write_yaml

BASE = """
base:
  data: {name: digits, val_fraction: 0.2}
  model: {name: small_cnn, width: 8}
  train: {epochs: 3, batch_size: 64, optimizer: adamw, lr: 1.0e-2, warmup_epochs: 0}
"""
NO_EVAL = BASE + "  eval: {on: none}\n"


def study_of(storage: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=open_study_storage(journal_file(Path(storage) / name)))


def dominates(a: list[float], b: list[float]) -> bool:
    """a dominates b, every objective a loss (smaller is better)."""
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


# ------------------------------------------------------------------------------------- without Ray
def test_non_dominated_ranks_peel_fronts() -> None:
    # (loss, loss): the front is the lower-left staircase; then the next staircase; a duplicate ties.
    points = np.array([[1, 5], [2, 2], [5, 1], [3, 3], [2, 2], [6, 6], [4, 4.5]])
    assert non_dominated_ranks(points).tolist() == [0, 0, 0, 1, 0, 3, 2]


def test_pareto_columns_per_experiment_completed_rows_only() -> None:
    table = pa.Table.from_pylist(
        [
            {
                "experiment": "a",
                "status": "completed",
                "objectives": "test_acc:max,params:min",
                "test_acc": 0.9,
                "params": 100.0,
            },
            {
                "experiment": "a",
                "status": "completed",
                "objectives": "test_acc:max,params:min",
                "test_acc": 0.8,
                "params": 50.0,
            },
            {
                "experiment": "a",
                "status": "completed",
                "objectives": "test_acc:max,params:min",
                "test_acc": 0.7,
                "params": 60.0,
            },
            {
                "experiment": "a",
                "status": "early_stopped",
                "objectives": "test_acc:max,params:min",
                "test_acc": None,
                "params": None,
            },
            {
                "experiment": "b",
                "status": "completed",
                "objectives": "test_acc:max,params:min",
                "test_acc": 0.5,
                "params": 10.0,
            },
            {"experiment": "c", "status": "completed", "objectives": None, "test_acc": 0.99, "params": 1.0},
        ]
    )
    marked = mark_pareto(table).to_pylist()
    assert [r["pareto"] for r in marked] == [True, True, False, None, True, None]
    assert [r["pareto_rank"] for r in marked] == [0, 0, 1, None, 0, None]
    single = pa.Table.from_pylist([{"experiment": "c", "status": "completed", "objectives": None}])
    assert "pareto" not in mark_pareto(single).column_names  # single-objective boards are left as they are


class Distilled(nn.Module):
    """A student that predicts and a frozen teacher that does not take part in the prediction."""

    def __init__(self) -> None:
        super().__init__()
        self.student = nn.Sequential(nn.Flatten(), nn.Linear(3 * 2 * 2, 5))
        self.teacher = nn.Linear(1000, 1000).requires_grad_(False)


def test_cost_counts_what_the_prediction_uses() -> None:
    model = Distilled()
    cost = measure_cost(
        model, lambda x: model.student(x), channels=3, image_size=2, batch_size=4, device=torch.device("cpu")
    )
    assert cost[names.PARAMS] == 12 * 5 + 5  # the student's weight and bias; not the teacher's million
    assert cost[names.FLOPS] == 2 * 12 * 5  # one image: a multiply and an add per weight
    assert cost[names.LATENCY_MS] > 0 and cost[names.LATENCY_MS_BATCH] > 0 and cost[names.LATENCY_BATCH] == 4
    # The model is left as it was: frozen teacher still frozen, no gradients kept, training mode back.
    assert not any(p.requires_grad for p in model.teacher.parameters())
    assert all(p.grad is None for p in model.parameters()) and model.training


def test_warm_start_keeps_the_parameters_that_still_fit(tmp_path: Path) -> None:
    """The old search had train.momentum (now gone) and lr in [1e-4, 1e-1] (now [1e-3, 1e-1]) and widths
    8/16 (now 16/32): each old trial keeps what fits, and one with nothing left is dropped."""
    old_dir = tmp_path / "results" / "old"
    old = optuna.create_study(study_name="old", storage=open_study_storage(journal_file(old_dir)), direction="maximize")
    distributions = {
        "train.lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True),
        "model.width": optuna.distributions.CategoricalDistribution([8, 16]),
        "train.momentum": optuna.distributions.FloatDistribution(0.8, 0.99),
    }
    for lr, width, value in [(1e-2, 16, 0.9), (1e-4, 8, 0.5), (5e-2, 8, 0.8)]:
        params = {"train.lr": lr, "model.width": width, "train.momentum": 0.9}
        old.add_trial(optuna.trial.create_trial(params=params, distributions=distributions, value=value))
    experiment = load_experiment(
        write_yaml(
            tmp_path / "new.yaml",
            """
experiment: {name: new, trials: 2}
search: {warm_start: old}
space:
  train.lr: {type: loguniform, low: 1.0e-3, high: 1.0e-1}
  model.width: {type: choice, values: [16, 32]}
"""
            + NO_EVAL,
        )
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        searcher = create_searcher(experiment, tmp_path / "results" / "new", old_dir)
    message = " ".join(str(w.message) for w in caught)
    assert "kept 2 of 3 trials" in message and "train.momentum: not a parameter of this space" in message
    assert "model.width: 2 value(s) outside" in message and "train.lr: 1 value(s) outside" in message
    seeded = {t.value: t.params for t in searcher._ot_study.trials if t.state == TrialState.COMPLETE}
    assert seeded == {0.9: {"train.lr": 1e-2, "model.width": 16}, 0.8: {"train.lr": 5e-2}}


BAD = {
    "unknown objective": (
        "experiment: {objectives: [{metric: val_acc, mode: max}, {metric: speed, mode: min}]}\n" + BASE,
        "experiment.objectives.1.metric: 'speed' is not reported",
    ),
    "held-out objective without evaluation": (
        "experiment: {objectives: [{metric: test_acc, mode: max}, {metric: params, mode: min}]}\n" + NO_EVAL,
        "experiment.objectives.0.metric: 'test_acc' is a held-out metric, and eval.on is 'none'",
    ),
    "one objective": ("experiment: {objectives: [{metric: val_acc, mode: max}]}\n" + BASE, "experiment.objectives"),
    "stop on an unreported metric": (
        "experiment: {stop: {test_acc: 0.9}}\n" + BASE,
        "experiment.stop.test_acc: not reported every epoch",
    ),
    "zero budget": ("experiment: {time_budget_s: 0}\n" + BASE, "experiment.time_budget_s"),
    "grid over a range": (
        "search: {algorithm: grid}\nspace:\n  train.lr: {type: loguniform, low: 1.0e-3, high: 1.0e-1}\n" + BASE,
        "grid enumerates choices without `when`; not these: train.lr (loguniform)",
    ),
    "grid smaller than trials": (
        "experiment: {trials: 3}\nsearch: {algorithm: grid}\nspace:\n  model.width: {type: choice, values: [8, 16]}\n"
        + BASE,
        "experiment.trials=3 > the grid's 2 combinations",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_search_settings_exit_2_naming_the_key(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text, expected = BAD[case]
    space = write_yaml(tmp_path / "bad.yaml", text)
    with pytest.raises(SystemExit) as exited:  # refused before Ray starts: no cluster in this test
        main(["tune", str(space), "--storage", str(tmp_path / "results"), "--wandb", "disabled"])
    out = capsys.readouterr()
    message = " ".join((out.out + out.err).split())
    assert exited.value.code == 2 and expected in message and str(space) in message and "Traceback" not in message
    assert not (tmp_path / "results").exists()


def test_bad_limits_on_the_command_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    space = write_yaml(tmp_path / "ok.yaml", BASE)
    for flag, value, expected in (
        ("--time-budget", "0", "--time-budget (experiment.time_budget_s): Input should be greater than 0"),
        ("--trials", "0", "--trials (experiment.trials): Input should be greater than or equal to 1"),
    ):
        with pytest.raises(SystemExit) as exited:
            main(["tune", str(space), flag, value, "--storage", str(tmp_path / "results")])
        message = " ".join(capsys.readouterr().out.split())
        assert exited.value.code == 2 and expected in message, message


# ---------------------------------------------------------------------------------------- with Ray
MULTI = (
    """
experiment:
  name: front
  trials: 4
  concurrency: 1
  objectives: [{metric: test_acc, mode: max}, {metric: params, mode: min}]
search:
  seed: 0
  # In order: a wide model (runs out: the first at its rung), a learning rate too low to learn (ASHA stops
  # it against the first), a narrow model (above the rung's median of the two before it: runs out).
  points_to_evaluate:
    - {model.width: 16, train.lr: 0.01}
    - {model.width: 8, train.lr: 0.00001}
    - {model.width: 4, train.lr: 0.01}
scheduler: {name: asha, max_t: 3, grace_period: 2, reduction_factor: 2}
wandb: {mode: disabled}
space:
  model.width: {type: choice, values: [4, 8, 16]}
  train.lr: {type: loguniform, low: 1.0e-5, high: 3.0e-2}
"""
    + BASE
)


@pytest.mark.slow
def test_two_objective_search_front_and_pruned_trials(
    ray_local, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    storage = str(tmp_path / "results")
    experiment = prepare_experiment(load_experiment(write_yaml(tmp_path / "front.yaml", MULTI)))
    assert experiment.experiment.metric == "val_acc"  # ASHA ranks by the first objective an epoch reports
    run_tune(experiment, TuneOptions(storage=storage, live=False))
    rows = read_leaderboard(storage, "front").table.to_pylist()
    completed = [r for r in rows if r["status"] == "completed"]
    stopped = [r for r in rows if r["status"] == "early_stopped"]
    assert len(rows) == 4 and len(completed) >= 2 and stopped, [
        (r["status"], r["model.width"], r["train.lr"]) for r in rows
    ]
    # Every completed trial measured its own cost; the front is exactly the non-dominated completed rows.
    for row in completed:
        assert row[names.PARAMS] > 0 and row[names.FLOPS] > 0 and row[names.LATENCY_MS] > 0
        assert row["objectives"] == "test_acc:max,params:min"
    assert len({r[names.PARAMS] for r in completed}) >= 2  # different widths, different sizes
    losses = {r["trial_id"]: [-r["test_acc"], r[names.PARAMS]] for r in completed}
    for row in completed:
        dominated = any(dominates(other, losses[row["trial_id"]]) for other in losses.values())
        assert row["pareto"] is (not dominated) and (row["pareto_rank"] == 0) is (not dominated)
    assert all(r["pareto"] is None for r in stopped)
    # Optuna: a two-objective study; completed trials told both objectives as their rows have them, trials
    # ASHA stopped told PRUNED (Ray's bridge leaves them RUNNING: it tells COMPLETE with a missing value).
    study = study_of(storage, "front")
    assert len(study.directions) == 2
    told = {t.user_attrs["trial_id"]: t for t in study.trials}
    for row in completed:
        assert told[row["trial_id"]].state == TrialState.COMPLETE
        assert told[row["trial_id"]].values == pytest.approx([row["test_acc"], row[names.PARAMS]])
    for row in stopped:
        assert told[row["trial_id"]].state == TrialState.PRUNED
    assert {t.number for t in study.best_trials} == {told[r["trial_id"]].number for r in completed if r["pareto"]}
    # The report's figure: the front's trials as the line, the other completed trials as grey dots.
    section = pareto_section(load_report_data(storage, "front"))
    assert section is not None and section.figure is not None
    drawn = {trace.name: sorted(zip(trace.x, trace.y)) for trace in section.figure.data}
    assert drawn["Pareto front"] == sorted((r["test_acc"], r[names.PARAMS]) for r in completed if r["pareto"])
    assert drawn["dominated"] == sorted((r["test_acc"], r[names.PARAMS]) for r in completed if not r["pareto"])
    # `raycls leaderboard --pareto`: the front only, objectives shown.
    capsys.readouterr()  # what Tune printed during the search
    try:
        main(["leaderboard", storage, "--pareto", "--format", "csv"])
    except SystemExit as exited:
        assert exited.code in (0, None)
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("experiment,trial_id,test_acc,params,pareto_rank")
    assert sorted(line.split(",")[1] for line in out.splitlines()[1:]) == sorted(
        r["trial_id"] for r in completed if r["pareto"]
    )


@pytest.mark.slow
def test_pareto_query_on_a_single_objective_experiment_exits_2(
    ray_local, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    storage = str(tmp_path / "results")
    single = load_experiment(
        write_yaml(
            tmp_path / "single.yaml",
            "experiment: {name: single, trials: 1}\nwandb: {mode: disabled}\n"
            + NO_EVAL.replace("epochs: 3", "epochs: 1"),
        )
    )
    run_tune(single, TuneOptions(storage=storage, live=False))
    with pytest.raises(SystemExit) as exited:
        main(["leaderboard", storage, "--pareto"])
    message = " ".join(capsys.readouterr().out.split())
    assert exited.value.code == 2 and "--pareto:" in message and "no multi-objective experiment" in message


BUDGET = (
    """
experiment: {name: budget, trials: 40, concurrency: 1, time_budget_s: 15}
search: {seed: 0}
scheduler: {name: fifo}
wandb: {mode: disabled}
space:
  train.lr: {type: loguniform, low: 1.0e-3, high: 3.0e-2}
"""
    + NO_EVAL
)


@pytest.mark.slow
def test_time_budget_ends_the_search_and_resume_continues_it(ray_local, tmp_path: Path) -> None:
    storage = str(tmp_path / "results")
    experiment = load_experiment(write_yaml(tmp_path / "budget.yaml", BUDGET))
    outcome = run_tune(experiment, TuneOptions(storage=storage, live=False))
    rows = read_leaderboard(storage, "budget").table.to_pylist()
    assert outcome.ended is not None and outcome.ended.reason == "time_budget", outcome.ended
    assert 1 <= len(rows) < 40
    longest = max(r["wall_s"] for r in rows)
    # Noticed within one trial's length of the budget, and every row written by then (cut trials included).
    assert 15 <= outcome.ended.elapsed_s <= 15 + longest
    span = (max(r["ended_at"] for r in rows) - min(r["started_at"] for r in rows)).total_seconds()
    assert span <= 15 + 2 * longest, (span, longest)
    cut = [r for r in rows if r["status"] == "early_stopped"]
    assert all(r["stopped_by"] == "time_budget" for r in cut)
    assert not [r for r in rows if r["status"] == "failed"]
    # --resume --trials N: the trials without a row run (with the budget counted afresh), the study goes on.
    more = experiment.with_limits(trials=len(rows) + 2, time_budget_s=600)
    resumed = run_tune(more, TuneOptions(storage=storage, live=False, resume=True))
    after = read_leaderboard(storage, "budget").table.to_pylist()
    assert resumed.ended is None and len(after) == len(rows) + 2
    assert {r["trial_id"] for r in rows} < {r["trial_id"] for r in after}
    assert len(study_of(storage, "budget").trials) == len(after)


@pytest.mark.slow
def test_target_stops_the_search_once_reached(ray_local, tmp_path: Path) -> None:
    storage = str(tmp_path / "results")
    experiment = load_experiment(
        write_yaml(
            tmp_path / "target.yaml",
            BUDGET.replace("name: budget", "name: target")
            .replace("time_budget_s: 15", "stop: {val_acc: 0.5}")
            .replace("epochs: 3", "epochs: 6"),
        )
    )
    outcome = run_tune(experiment, TuneOptions(storage=storage, live=False))
    rows = read_leaderboard(storage, "target").table.to_pylist()
    assert outcome.ended is not None and outcome.ended.reason == "target" and "val_acc" in outcome.ended.detail
    reached = [r for r in rows if r["val_acc"] is not None and r["val_acc"] >= 0.5]
    assert reached and len(rows) < 40
    # The trial that reached it is the last to start: nothing new starts once it is reached (concurrency 1).
    assert max(rows, key=lambda r: r["started_at"])["trial_id"] in {r["trial_id"] for r in reached}
    assert all(r["stopped_by"] in ("target", None) for r in rows if r["status"] != "failed")
