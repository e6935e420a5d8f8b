"""One rule ranks epochs and trials (raycls.ranking): the row, the live table, the progress lines, the target
stopper, ASHA, the searcher's values, `--trial best` and the report agree, and a chain is judged by its
last stage only (a CNN teacher's val_acc is never the trial's)."""

from __future__ import annotations

import ast
import contextlib
import io
from pathlib import Path

import pyarrow as pa
import pytest
from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler

import raycls
from raycls import names
from raycls.evaluate.summary import summarize
from raycls.ranking import PickError, Ranking
from raycls.results.leaderboard import TrialRecord
from raycls.tune.live import LiveTable

# A two-stage chain (CNN teacher -> DeiT student): the teacher reaches 0.94, the student only 0.23 / 0.25.
CHAIN = [
    {
        "epoch": 1,
        "val_acc": 0.90,
        "val_loss": 0.3,
        "trainable_params": 17e6,
        "stage": "cnn",
        "stage_index": 0,
        "stage_count": 2,
    },
    {
        "epoch": 2,
        "val_acc": 0.94,
        "val_loss": 0.2,
        "trainable_params": 17e6,
        "stage": "cnn",
        "stage_index": 0,
        "stage_count": 2,
    },
    {
        "epoch": 3,
        "val_acc": 0.23,
        "val_loss": 2.1,
        "trainable_params": 3e6,
        "stage": "deit",
        "stage_index": 1,
        "stage_count": 2,
    },
    {
        "epoch": 4,
        "val_acc": 0.25,
        "val_loss": 2.0,
        "trainable_params": 3e6,
        "stage": "deit",
        "stage_index": 1,
        "stage_count": 2,
    },
    {
        "epoch": 5,
        "val_acc": 0.24,
        "val_loss": 2.2,
        "trainable_params": 3e6,
        "stage": "deit",
        "stage_index": 1,
        "stage_count": 2,
    },
]


def test_a_chain_is_judged_by_its_last_stage() -> None:
    ranking = Ranking.of("val_acc")
    assert [ranking.value(e) for e in CHAIN] == [None, None, 0.23, 0.25, 0.24]
    assert ranking.best_epoch(CHAIN)["epoch"] == 4
    summary = summarize(CHAIN, "val_acc")
    assert summary.best_epoch == 4 and summary.at_best["val_acc"] == 0.25
    # "best" is the counted epochs' best of each ranked metric; counters such as trainable_params have none.
    assert summary.best == {"val_acc": 0.25, "val_loss": 2.0}


def test_ties_go_to_the_later_epoch_and_the_earlier_trial() -> None:
    ranking = Ranking.of("val_loss")
    history = [{"epoch": 1, "val_loss": 0.5}, {"epoch": 2, "val_loss": 0.4}, {"epoch": 3, "val_loss": 0.4}]
    assert ranking.best_epoch(history)["epoch"] == 3  # as Ray's checkpoint manager keeps the later
    rows = [
        {"trial_id": "a", "score": 0.4},
        {"trial_id": "b", "score": None},
        {"trial_id": "c", "score": 0.4},
        {"trial_id": "d", "score": 0.1},
    ]
    assert [r["trial_id"] for r in ranking.sort(rows)] == ["d", "a", "c", "b"]
    assert [r["trial_id"] for r in Ranking.of("val_acc").sort(rows)] == ["a", "c", "d", "b"]


def test_pick_best_top_and_id() -> None:
    rows = [
        {"trial_id": "a", "status": "completed", "score": 0.7},
        {"trial_id": "b", "status": "early_stopped", "score": 0.9},
        {"trial_id": "c", "status": "completed", "score": 0.8},
        {"trial_id": "d", "status": "failed", "score": None},
    ]
    ranking = Ranking.of("val_acc", "max")
    assert [r["trial_id"] for r in ranking.pick(rows, "best")] == ["c"]  # early-stopped trials are never "best"
    assert [r["trial_id"] for r in ranking.pick(rows, "top:5")] == ["c", "a"]
    assert ranking.pick(rows, "d")[0]["status"] == "failed"
    for bad in ("top:0", "top:x", "zzz"):
        with pytest.raises(PickError):
            ranking.pick(rows, bad)


def test_a_trial_cut_before_its_last_stage_has_no_score() -> None:
    record = TrialRecord(
        experiment="e",
        trial_id="t",
        status="early_stopped",
        metric="val_acc",
        mode="max",
        params={},
        param_types={},
        history=CHAIN[:2],
    )
    row = record.to_table().to_pylist()[0]
    assert row["score"] is None and row["best_epoch"] is None and row["val_loss"] == 0.2


def test_the_history_keeps_metrics_that_appear_late() -> None:
    history = [
        {"epoch": 1, "val_knn_acc": 0.5},
        {"epoch": 2, "val_knn_acc": 0.6},
        {"epoch": 3, "val_acc": 0.7, "val_loss": 1.0, "val_acc_swa": 0.72},
    ]
    record = TrialRecord(
        experiment="e",
        trial_id="t",
        status="completed",
        metric="val_knn_acc",
        mode="max",
        params={},
        param_types={},
        history=history,
    )
    table = record.history_table()
    assert {"val_knn_acc", "val_acc", "val_loss", "val_acc_swa"} <= set(table.column_names)
    assert table.column("val_acc").to_pylist() == [None, None, 0.7]
    assert table.schema.field("val_acc").type == pa.float64()


def lines_of(table: LiveTable, history: list[dict]) -> list[str]:
    out = io.StringIO()
    trial = Trial("__fake", config={"train.lr": 0.1}, trial_id="chain0", stub=True)
    table.LINE_EVERY_S = 0.0
    with contextlib.redirect_stdout(out):
        table.on_trial_start(0, [], trial)
        for result in history:
            table.on_trial_result(0, [], trial, {**result, "max_epochs": 5})
        table.on_trial_complete(0, [], trial)
    return out.getvalue().splitlines()


def test_progress_lines_and_the_live_table_rank_like_the_row() -> None:
    table = LiveTable("chain", "val_acc", "max", 1)
    lines = lines_of(table, CHAIN)
    assert "best=" not in lines[1] and "(cnn)" in lines[1]  # the teacher's epochs show, but are not "best"
    assert lines[-1].split("best=")[1].startswith("0.2500")  # the row's score, not the teacher's 0.94
    assert table._best[0][1]["best"] == 0.25


def test_a_target_is_not_reached_by_a_teacher_stage(tmp_path: Path) -> None:
    from raycls.config import load_experiment
    from raycls.tune.stop import SearchStopper, read_end

    experiment = load_experiment(Path(raycls.__file__).parents[1] / "search_spaces/quickstart.yaml", {})
    experiment = experiment.model_copy(
        update={"experiment": experiment.experiment.model_copy(update={"stop": {"val_acc": 0.9}})}
    )
    stopper = SearchStopper(experiment, tmp_path)
    for result in CHAIN[:2]:
        stopper("t", result)
    assert not stopper.stop_all() and read_end(tmp_path) is None
    stopper("t", {**CHAIN[2], "val_acc": 0.95})  # the student reaches it
    assert stopper.stop_all() and read_end(tmp_path).reason == "target"


def test_asha_judges_only_the_last_stage() -> None:
    from ray.tune.schedulers import ASHAScheduler

    from raycls.search import last_stage

    asha = last_stage(ASHAScheduler)(
        time_attr="epoch", metric="val_acc", mode="max", max_t=5, grace_period=1, reduction_factor=2
    )
    trials = [Trial("__fake", config={}, trial_id=f"t{i}", stub=True) for i in range(3)]
    for trial in trials:
        asha.on_trial_add(None, trial)
    # The teacher of trial 0 is far better, its student far worse: ASHA must not compare teachers.
    teacher = [{**CHAIN[1], "epoch": 1, "val_acc": 0.99}, {**CHAIN[1], "epoch": 1, "val_acc": 0.10}]
    for trial, result in zip(trials, teacher):
        # (Ray's own ASHA stops t1 here: its teacher's 0.10 is below t0's teacher at the first rung.)
        assert asha.on_trial_result(None, trial, result) == TrialScheduler.CONTINUE
    student = [{**CHAIN[3], "epoch": 3, "val_acc": 0.2}, {**CHAIN[3], "epoch": 3, "val_acc": 0.8}]
    actions = [asha.on_trial_result(None, trial, result) for trial, result in zip(trials, student)]
    assert actions == [TrialScheduler.CONTINUE, TrialScheduler.CONTINUE]
    # Students are compared with students: a third trial's poor student is stopped at the rungs it passed.
    assert asha.on_trial_result(None, trials[2], {**CHAIN[3], "epoch": 3, "val_acc": 0.1}) == TrialScheduler.STOP


MODE_WORDS = {"max", "min"}


def test_no_module_but_ranking_compares_modes() -> None:
    """A comparison with "max" / "min" (`mode == "max"`) anywhere but raycls/ranking.py re-derives the rule."""
    root = Path(raycls.__file__).parent
    strays = []
    for path in sorted(root.rglob("*.py")):
        if path.name == "ranking.py" and path.parent == root:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) and any(
                isinstance(c, ast.Constant) and c.value in MODE_WORDS for c in [node.left, *node.comparators]
            ):
                strays.append(f"{path.relative_to(root)}:{node.lineno}")
    assert strays == [], f"compare modes through raycls.ranking, not here: {strays}"


def test_names_has_no_ranking_rules() -> None:
    assert not any(hasattr(names, f) for f in ("as_good", "better", "ranked_value", "mode_of"))
