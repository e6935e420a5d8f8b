"""Issue 29's search features: the hyperband, bohb and median schedulers, PBT and PB2 (lineage, replay, report),
constraints (feasible rows, never best), and the plateau stop. Pure parts first; whole digits searches are
`slow`."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import torch

from raycls import names
from raycls.config import load_experiment
from raycls.config.experiment import Constraint, ExperimentSection
from raycls.errors import ConfigError
from raycls.ranking import NoCompletedTrial, Ranking

from .conftest import write_yaml

BASE = """
base:
  data: {name: digits, val_fraction: 0.2}
  model: {name: small_cnn, width: 8}
  train: {epochs: 4, batch_size: 64, optimizer: adamw, lr: 3.0e-3, warmup_epochs: 0}
  eval: {on: none}
"""


def _experiment(tmp_path: Path, text: str, name: str = "space"):
    return load_experiment(write_yaml(tmp_path / f"{name}.yaml", text + BASE))


# ---------------------------------------------------------------------------------------- constraints
def test_constraints_parse_and_judge_as_optuna_expects() -> None:
    latency = Constraint.parse("latency_ms <= 5")
    assert (latency.metric, latency.op, latency.bound) == ("latency_ms", "<=", 5.0)
    assert latency.violation(4.0) == -1.0 and latency.holds(5.0) and not latency.holds(5.5)
    floor = Constraint.parse("test_acc>=.9")
    assert floor.violation(0.8) == pytest.approx(0.1) and floor.holds(0.95)
    strict = Constraint.parse("params < 2e6")
    assert strict.bound == 2e6 and not strict.holds(2e6) and strict.holds(1e6)


def test_config_refuses_bad_constraints_and_stop_rules_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"experiment\.constraints.*'latency_ms =< 5'.*METRIC OP NUMBER"):
        _experiment(tmp_path, 'experiment: {constraints: ["latency_ms =< 5"]}\n')
    with pytest.raises(ConfigError, match=r"stop\.plateau: expected \{patience: N, min_delta: x\}"):
        _experiment(tmp_path, "experiment: {stop: {plateau: 3}}\n")
    with pytest.raises(ConfigError, match=r"stop\.val_acc: expected a number"):
        _experiment(tmp_path, "experiment: {stop: {val_acc: high}}\n")
    with pytest.raises(ConfigError, match=r"patience"):
        _experiment(tmp_path, "experiment: {stop: {plateau: {min_delta: 0.1}}}\n")
    section = ExperimentSection(stop={"val_acc": 0.99, "plateau": {"patience": 4, "min_delta": 0.01}})
    assert section.targets == {"val_acc": 0.99} and section.plateau.patience == 4


def test_a_constraint_on_a_metric_no_trial_reports_is_refused_before_trials(tmp_path: Path) -> None:
    from raycls.prepare import prepare_experiment

    experiment = _experiment(tmp_path, 'experiment: {constraints: ["val_f1 <= 2", "params <= 1e5"]}\n')
    with pytest.raises(ConfigError, match=r"experiment\.constraints\.0: 'val_f1' is not a metric trials end with"):
        prepare_experiment(experiment, environment=False)


def test_feasible_is_false_true_or_unknown() -> None:
    from raycls.results.leaderboard import feasible

    rules = ["params <= 100", "val_acc >= 0.5"]
    assert feasible(rules, {"params": 50, "val_acc": 0.9}) is True
    assert feasible(rules, {"params": 500, "val_acc": 0.9}) is False
    assert feasible(rules, {"params": 500}) is False  # one broken is enough
    assert feasible(rules, {"val_acc": 0.9}) is None  # params never measured
    assert feasible([], {"params": 1}) is None


def test_best_and_top_k_skip_infeasible_trials() -> None:
    rows = [
        {"trial_id": "a", "status": "completed", "score": 0.99, "feasible": False},
        {"trial_id": "b", "status": "completed", "score": 0.95, "feasible": True},
        {"trial_id": "c", "status": "completed", "score": 0.90, "feasible": None},
        {"trial_id": "d", "status": "early_stopped", "score": 0.97, "feasible": True},
    ]
    ranking = Ranking.of("val_acc", "max")
    assert [r["trial_id"] for r in ranking.pick(rows, "best")] == ["b"]
    assert [r["trial_id"] for r in ranking.pick(rows, "top:3")] == ["b", "c"]
    assert ranking.pick(rows, "a")[0]["trial_id"] == "a"  # an id still names any trial
    with pytest.raises(NoCompletedTrial, match="breaks the experiment's constraints"):
        ranking.pick(rows[:1], "best")


def test_constraint_values_read_epoch_metrics_at_the_best_epoch_and_costs_at_the_last() -> None:
    from raycls.tune.searcher import constraint_values

    parsed = [Constraint.parse("params <= 100"), Constraint.parse("val_loss <= 0.5"), Constraint.parse("flops <= 1")]
    values = constraint_values(parsed, best={"val_loss": 0.4}, last={"val_loss": 0.9, "params": 150})
    assert values == [50.0, pytest.approx(-0.1), 0.0]  # flops never reported: not judged


def test_a_row_says_whether_its_trial_is_feasible() -> None:
    from raycls.results.leaderboard import TrialRecord

    history = [{"epoch": 1, "val_acc": 0.8}, {"epoch": 2, "val_acc": 0.9, "params": 300.0}]
    record = TrialRecord("e", "t1", "completed", "val_acc", "max", {}, {}, history=history)
    record.constraints = ["params <= 200"]
    assert record.to_table().to_pylist()[0]["feasible"] is False
    record.constraints = ["params <= 400", "val_acc >= 0.85"]
    assert record.to_table().to_pylist()[0]["feasible"] is True


# ------------------------------------------------------------------------------------------- plateau
def test_plateau_watch_counts_epochs_without_a_big_enough_improvement() -> None:
    from raycls.tune.stop import PlateauWatch

    watch = PlateauWatch(patience=3, min_delta=0.01, metric="val_acc", mode="max")
    assert not watch.update({"val_acc": 0.5})
    assert not watch.update({"val_acc": 0.6})  # +0.1: the new best
    assert not watch.update({"val_acc": 0.605})  # +0.005 <= min_delta: waits 1
    assert not watch.update({names.STAGE_INDEX: 0, names.STAGE_COUNT: 2, "val_acc": 0.1})  # a teacher: not judged
    assert not watch.update({"val_acc": 0.55})  # waits 2
    assert watch.update({"val_acc": 0.6})  # waits 3: plateau
    assert "3 epochs in a row" in watch.detail() and "0.6" in watch.detail()
    losses = PlateauWatch(patience=1, min_delta=0.0, metric="val_loss", mode="min")
    assert not losses.update({"val_loss": 1.0}) and not losses.update({"val_loss": 0.9})
    assert losses.update({"val_loss": 0.95})


# ----------------------------------------------------------------------------------------- schedulers
@pytest.mark.parametrize(
    ("name", "ray_class", "extra"),
    [
        ("hyperband", "AsyncHyperBandScheduler", ""),
        ("bohb", "HyperBandForBOHB", ""),
        ("median", "MedianStoppingRule", ", min_samples: 2"),
        ("asha", "AsyncHyperBandScheduler", ", brackets: 3"),
    ],
)
def test_stopping_schedulers_are_rays_judging_the_last_stage(tmp_path: Path, name, ray_class, extra) -> None:
    import ray.tune.schedulers as schedulers

    from raycls.search import TRIAL_SCHEDULERS, population_based

    experiment = _experiment(tmp_path, f"scheduler: {{name: {name}{extra}}}\n")
    scheduler = TRIAL_SCHEDULERS.create(name, experiment)
    assert isinstance(scheduler, getattr(schedulers, ray_class)) and type(scheduler).__name__.startswith("LastStage")
    assert not population_based(name)
    # A chain's earlier stage is never judged: the scheduler says continue without looking at it.
    assert scheduler.on_trial_result(None, None, {names.STAGE_INDEX: 0, names.STAGE_COUNT: 2}) == "CONTINUE"
    if name in ("asha", "hyperband"):
        assert len(scheduler._brackets) == 3
    if name == "median":
        assert scheduler._min_samples_required == 2


def test_pbt_and_pb2_are_population_based_and_perturb_their_mutations(tmp_path: Path) -> None:
    from ray.tune.schedulers import PopulationBasedTraining
    from ray.tune.schedulers.pb2 import PB2

    from raycls.search import TRIAL_SCHEDULERS, population_based

    text = """
experiment: {keep_checkpoints: 2}
scheduler:
  name: NAME
  perturbation_interval: 3
  mutations:
    train.lr: {type: loguniform, low: 1.0e-4, high: 0.1}
    train.weight_decay: {type: uniform, low: 0.0, high: 0.1}
"""
    pbt = TRIAL_SCHEDULERS.create("pbt", _experiment(tmp_path, text.replace("NAME", "pbt")))
    assert isinstance(pbt, PopulationBasedTraining) and population_based("pbt")
    assert pbt._perturbation_interval == 3 and set(pbt._hyperparam_mutations) == {"train.lr", "train.weight_decay"}
    pb2 = TRIAL_SCHEDULERS.create("pb2", _experiment(tmp_path, text.replace("NAME", "pb2")))
    assert isinstance(pb2, PB2) and population_based("pb2")
    assert pb2._hyperparam_bounds["train.lr"] == [1.0e-4, 0.1]


def test_schedule_checks_name_what_is_wrong(tmp_path: Path) -> None:
    from raycls.search import check_schedule

    def problems(text: str) -> str:
        with pytest.raises(ConfigError) as caught:
            check_schedule(_experiment(tmp_path, text))
        return str(caught.value)

    assert "pbt needs the parameters it perturbs" in problems(
        "scheduler: {name: pbt}\nexperiment: {keep_checkpoints: 2}\n"
    )
    assert "only pbt and pb2 perturb parameters, not 'asha'" in problems(
        "scheduler: {name: asha, mutations: {train.lr: {type: uniform, low: 0.1, high: 0.2}}}\n"
    )
    assert "pb2 perturbs ranges of floats, not 'choice'" in problems(
        "experiment: {keep_checkpoints: 2}\n"
        "scheduler: {name: pb2, mutations: {train.optimizer: {type: choice, values: [sgd, adamw]}}}\n"
    )
    assert "scheduler.mutations.train.nonsense" in problems(
        "experiment: {keep_checkpoints: 2}\n"
        "scheduler: {name: pbt, mutations: {train.nonsense: {type: uniform, low: 0.1, high: 0.2}}}\n"
    )
    check_schedule(
        _experiment(
            tmp_path,
            "experiment: {keep_checkpoints: 2}\n"
            "scheduler: {name: pbt, mutations: {phase.mixup_alpha: {type: choice, values: [0.0, 0.2]}}}\n",
        )
    )


def test_a_resumed_checkpoint_takes_the_configs_lr_and_weight_decay() -> None:
    """A PBT exploit resumes another trial's checkpoint under perturbed values; a plain resume changes nothing."""
    from raycls.train.state import configured_hyperparameters, keep_configured

    def parts(lr: float, decay: float):
        model = torch.nn.Linear(3, 2)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
        return optimizer, schedule

    old_optimizer, old_schedule = parts(0.1, 0.05)
    for _ in range(3):
        old_optimizer.step()
        old_schedule.step()
    optimizer, schedule = parts(0.01, 0.2)
    configured = configured_hyperparameters(optimizer)
    optimizer.load_state_dict(old_optimizer.state_dict())
    schedule.load_state_dict(old_schedule.state_dict())
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 / 4)  # the checkpoint's
    keep_configured(optimizer, schedule, configured)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01 / 4)  # the config's, at the schedule's step
    assert optimizer.param_groups[0]["weight_decay"] == 0.2 and schedule.base_lrs == [0.01]
    schedule.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01 / 5)  # and the schedule goes on from there
    same_optimizer, same_schedule = parts(0.1, 0.05)
    same = configured_hyperparameters(same_optimizer)
    same_optimizer.load_state_dict(old_optimizer.state_dict())
    same_schedule.load_state_dict(old_schedule.state_dict())
    keep_configured(same_optimizer, same_schedule, same)
    assert same_optimizer.state_dict()["param_groups"] == old_optimizer.state_dict()["param_groups"]


def test_paused_trials_free_their_slot_and_are_told_when_they_end(tmp_path: Path) -> None:
    from raycls.tune.searcher import PausingLimiter, create_searcher

    experiment = _experiment(
        tmp_path, "experiment: {trials: 4}\nspace:\n  train.lr: {type: loguniform, low: 1.0e-4, high: 0.1}\n"
    )
    limiter = PausingLimiter(create_searcher(experiment, tmp_path / "state", None), max_concurrent=1)
    assert limiter.suggest("t1") is not None and limiter.suggest("t2") is None  # one at a time
    limiter.on_pause("t1")
    assert limiter.suggest("t2") is not None  # the paused trial holds no slot
    done = {names.EPOCH: 4, names.MAX_EPOCHS: 4, "val_acc": 0.9, "training_iteration": 4}
    limiter.on_trial_result("t2", done)
    limiter.on_trial_complete("t2", done)
    cut = {names.EPOCH: 1, names.MAX_EPOCHS: 4, "val_acc": 0.5, "training_iteration": 1}
    limiter.on_trial_result("t1", cut)
    limiter.on_trial_complete("t1", cut)  # stopped while paused
    states = {t.user_attrs["trial_id"]: t.state for t in limiter.searcher._ot_study.trials}
    assert states == {"t1": optuna.trial.TrialState.PRUNED, "t2": optuna.trial.TrialState.COMPLETE}
    assert limiter.live_trials == set() and limiter.paused == set()


def test_a_population_is_drawn_up_front_with_points_first(tmp_path: Path) -> None:
    from raycls.tune.searcher import PopulationGenerator, initial_population

    experiment = _experiment(
        tmp_path,
        """
experiment: {trials: 5}
search: {seed: 3, points_to_evaluate: [{train.optimizer: sgd, train.momentum: 0.9}]}
space:
  train.optimizer: {type: choice, values: [adamw, sgd]}
  train.momentum: {type: uniform, low: 0.8, high: 0.95, when: {train.optimizer: sgd}}
""",
    )
    points = initial_population(experiment)
    assert len(points) == 5 and points[0] == {"train.optimizer": "sgd", "train.momentum": 0.9}
    assert all(("train.momentum" in p) == (p["train.optimizer"] == "sgd") for p in points)
    assert initial_population(experiment) == points  # seeded
    generator = PopulationGenerator(points)
    filled = generator._points_to_evaluate
    assert all(set(p) == {"train.optimizer", "train.momentum"} for p in filled)
    adamw = next(p for p in filled if p["train.optimizer"] == "adamw")
    assert names.sampled_values({**adamw, names.LINEAGE: [], names.SCHEDULE: []}) == {"train.optimizer": "adamw"}


def test_schedule_segments_drop_segments_that_never_train() -> None:
    from raycls.train.local import schedule_segments

    schedule = [
        {"epoch": 4, "values": {"train.lr": 0.2}},
        {"epoch": 0, "values": {"train.lr": 0.1}},
        {"epoch": 4, "values": {"train.lr": 0.3}},
        {"epoch": 6, "values": {"train.lr": 0.4}},
    ]
    assert schedule_segments(schedule, lambda values: values["train.lr"]) == [(0, 0.1), (4, 0.3), (6, 0.4)]


# ------------------------------------------------------------------------------------ whole searches
def _search(tmp_path: Path, text: str, name: str, *, epochs: int = 4):
    from raycls.results import read_leaderboard
    from raycls.tune.driver import TuneOptions, run_tune

    experiment = load_experiment(
        write_yaml(tmp_path / f"{name}.yaml", text + BASE.replace("epochs: 4", f"epochs: {epochs}"))
    )
    storage = str(tmp_path / "results")
    outcome = run_tune(experiment, TuneOptions(storage=storage, live=False))
    return experiment, storage, outcome, read_leaderboard(storage, name).table.to_pylist()


def _study(storage: str, name: str) -> optuna.Study:
    from raycls.storage import journal_file
    from raycls.tune.searcher import open_study_storage

    return optuna.load_study(study_name=name, storage=open_study_storage(journal_file(Path(storage) / name)))


def _states_match_rows(storage: str, name: str, rows: list[dict]) -> None:
    from raycls.tune.resume import ROW_STATES, TRIAL_ID_ATTR

    by_id = {t.user_attrs.get(TRIAL_ID_ATTR): t for t in _study(storage, name).trials}
    for row in rows:
        assert by_id[row["trial_id"]].state == ROW_STATES[row["status"]], row


STOPPING = """
experiment: {name: NAME, trials: 6, concurrency: 2}
search:
  seed: 0
  n_startup_trials: 6
  points_to_evaluate: POINTS
scheduler: {name: NAME, max_t: 4, grace_period: 1, reduction_factor: 2, min_samples: 2}
wandb: {mode: disabled}
space:
  train.lr: {type: loguniform, low: 1.0e-4, high: 0.05}
"""


# Strong trials first, then weak ones (lr ~1e-4). Async Hyperband puts each trial in a random bracket (numpy's
# global generator, seeded by the test): the weak ones in its least aggressive bracket run out. BOHB fills its
# most aggressive bracket first (4 trials, halved at epoch 1 and 2). The median rule judges all.
STRONG_THEN_WEAK = {
    "hyperband": "[{train.lr: 0.01}, {train.lr: 0.003}, {train.lr: 0.0001}, {train.lr: 0.00011}, {train.lr: 0.00012}]",
    "bohb": "[{train.lr: 0.01}, {train.lr: 0.003}, {train.lr: 0.0001}, {train.lr: 0.00011}]",
    "median": "[{train.lr: 0.01}, {train.lr: 0.003}, {train.lr: 0.0001}, {train.lr: 0.00011}]",
}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["hyperband", "bohb", "median"])
def test_stopping_schedulers_stop_weak_trials_told_as_pruned(ray_local, tmp_path: Path, name: str) -> None:
    """Each scheduler on digits stops weak trials (lr ~1e-4) before their last epoch (Hyperband: the weakest of
    the bracket that halves them; BOHB and the median rule: every one), their rows say early_stopped by the
    scheduler, and Optuna has them PRUNED (completed ones COMPLETE with the row's score)."""
    import numpy as np

    np.random.seed(0)  # async Hyperband's bracket draws (on this driver)
    text = STOPPING.replace("NAME", name).replace("POINTS", STRONG_THEN_WEAK[name])
    if name == "median":
        # One at a time: the rule judges a trial only against others that reached its epoch (min_samples 2).
        # Two at a time, a loaded run let a weak trial run ahead of the strong one beside it and finish,
        # never judged (seen once in a full suite).
        text = text.replace("concurrency: 2", "concurrency: 1")
    _, storage, outcome, rows = _search(tmp_path, text, name)
    assert outcome.errors == 0 and len(rows) == 6
    stopped = [r for r in rows if r["status"] == "early_stopped"]
    assert stopped and all(r["epochs"] < 4 and r["stopped_by"] == "scheduler" for r in stopped)
    assert any(r["status"] == "completed" and r["epochs"] == 4 for r in rows)
    weak = [r for r in rows if r["train.lr"] < 0.0002]
    seen = [(r["train.lr"], r["status"], r["epochs"]) for r in rows]
    if name == "hyperband":
        assert any(r["status"] == "early_stopped" for r in weak), seen
    else:
        assert weak and all(r["status"] == "early_stopped" for r in weak), seen
    _states_match_rows(storage, name, rows)


# A perturbation at every epoch: whichever order a loaded machine runs the 4 trials in, a trial in the bottom
# half meets one in the top half at some epoch (at every 2nd epoch, loaded runs of PBT and PB2 saw none).
PBT = """
experiment: {name: NAME, trials: 4}
search: {seed: 0}
scheduler:
  name: NAME
  perturbation_interval: 1
  quantile_fraction: 0.5
  mutations:
    train.lr: {type: loguniform, low: 1.0e-4, high: 0.05}
    train.weight_decay: {type: uniform, low: 0.0, high: 0.1}
MIXUP
wandb: {mode: disabled}
space:
  train.lr: {type: loguniform, low: 1.0e-4, high: 0.05}
"""


def _assert_lineage(rows: list[dict]) -> list[dict]:
    """At least one exploit, and every row's lineage is consistent with itself, its config and the others."""
    ids = {r["trial_id"] for r in rows}
    cloned = [r for r in rows if r["cloned_from"]]
    assert cloned, "no trial exploited another"
    for row in rows:
        schedule = json.loads(row["schedule"])
        assert schedule[0]["epoch"] == 0 and schedule == sorted(schedule, key=lambda s: s["epoch"])
        config = json.loads(row["config_json"])
        assert config["train"]["lr"] == pytest.approx(schedule[-1]["values"]["train.lr"])  # trained on with these
        assert row["train.lr"] == pytest.approx(schedule[-1]["values"]["train.lr"])
    for row in cloned:
        events = json.loads(row["lineage"])
        last = events[-1]
        assert row["cloned_from"] == last["cloned"] and row["cloned_from"] in ids - {row["trial_id"]}
        # Asynchronous: a lagging trial may clone one that is epochs ahead of it (from_epoch > epoch), and resumes there.
        assert row["cloned_at"] == last["epoch"] and 1 <= last["from_epoch"] <= row["epochs"]
        assert json.loads(row["schedule"])[-1] == {"epoch": last["from_epoch"], "values": last["values"]}
    return cloned


@pytest.mark.slow
def test_pbt_clones_and_perturbs_rows_record_lineage_and_train_replays_it(ray_local, tmp_path: Path) -> None:
    from raycls.config.load import config_of_row
    from raycls.report.data import load_report_data
    from raycls.report.figures import lineage
    from raycls.results import read_leaderboard
    from raycls.train.local import run_schedule, schedule_segments

    text = PBT.replace("NAME", "pbt").replace("MIXUP", "    phase.mixup_alpha: {type: choice, values: [0.0, 0.2, 0.4]}")
    _, storage, outcome, rows = _search(tmp_path, text, "pbt", epochs=6)
    assert outcome.errors == 0 and len(rows) == 4 and all(r["status"] == "completed" for r in rows)
    cloned = _assert_lineage(rows)
    # The exploited trial went on under its new values: the lr it reported after the clone is the new lr on
    # the schedule's curve, and a replay of its schedule trains the same lr epoch for epoch.
    row = cloned[0]
    segments = schedule_segments(json.loads(row["schedule"]), lambda values: config_of_row(row, values))
    replay = run_schedule(segments, tmp_path / "replay", metric="val_acc", mode="max")
    replayed = {
        int(h[names.EPOCH]): h[names.LR]
        for h in json.loads((tmp_path / "replay" / "metrics.json").read_text())["history"]
    }
    assert sorted(replayed) == list(range(1, 7)) and replay.best_epoch is not None
    history = read_leaderboard(storage, "pbt", kind="history").table.to_pylist()
    after = {int(h[names.EPOCH]): h[names.LR] for h in history if h["trial_id"] == row["trial_id"]}
    start = json.loads(row["lineage"])[-1]["from_epoch"]
    for epoch in range(start + 1, 7):
        assert replayed[epoch] == pytest.approx(after[epoch], rel=1e-6), epoch
    section = lineage(load_report_data(storage, "pbt"))
    assert section is not None and section.note is None
    assert row["trial_id"] in section.figure.data[1].y and row["cloned_from"] in section.figure.data[1].y


@pytest.mark.slow
def test_pb2_explores_within_its_bounds(ray_local, tmp_path: Path) -> None:
    _, _, outcome, rows = _search(tmp_path, PBT.replace("NAME", "pb2").replace("MIXUP", ""), "pb2", epochs=6)
    assert outcome.errors == 0 and len(rows) == 4
    for row in _assert_lineage(rows):
        for event in json.loads(row["lineage"]):
            # PB2 works in float32: its values lie within the bounds up to float32 rounding.
            assert 1.0e-4 * (1 - 1e-6) <= event["values"]["train.lr"] <= 0.05 * (1 + 1e-6)
            assert -1e-7 <= event["values"]["train.weight_decay"] <= 0.1 * (1 + 1e-6)


CONSTRAINED = """
experiment: {name: constrained, trials: 5, concurrency: 2, constraints: ["params <= 30000"], keep_checkpoints: 2}
search:
  seed: 0
  n_startup_trials: 2
  points_to_evaluate: [{model.width: 32, train.lr: 0.01}, {model.width: 8, train.lr: 0.01}]
scheduler: {name: fifo}
wandb: {mode: disabled}
space:
  model.width: {type: choice, values: [8, 32]}
  train.lr: {type: loguniform, low: 1.0e-3, high: 0.02}
"""


@pytest.fixture(scope="module")
def constrained(ray_local, tmp_path_factory: pytest.TempPathFactory):
    """A digits search of two widths, the wider one breaking `params <= 30000` (shared by the constraint and
    the ensemble tests)."""
    tmp_path = tmp_path_factory.mktemp("constrained")
    return _search(tmp_path, CONSTRAINED, "constrained", epochs=2)


@pytest.mark.slow
def test_constraints_mark_rows_reach_optuna_and_best_is_feasible(constrained) -> None:
    from raycls.tune.resume import TRIAL_ID_ATTR

    _, storage, outcome, rows = constrained
    assert outcome.errors == 0 and len(rows) == 5
    for row in rows:
        assert row["feasible"] is (row["params"] <= 30000), row
    assert {r["feasible"] for r in rows} == {True, False}  # both widths ran
    best = Ranking.of("val_acc", "max").pick(rows, "best")[0]
    assert best["feasible"] is True
    told = {t.user_attrs[TRIAL_ID_ATTR]: t for t in _study(storage, "constrained").trials}
    for row in rows:
        constraints = told[row["trial_id"]].constraints  # what TPE reads (Optuna's Trial.set_constraint)
        assert list(constraints) == ["params <= 30000"]
        violation = constraints["params <= 30000"]
        assert (violation <= 0) is row["feasible"] and violation == pytest.approx(row["params"] - 30000)


@pytest.mark.slow
def test_top_k_ensemble_averages_the_best_feasible_trials_and_exports_one_graph(constrained, tmp_path: Path) -> None:
    import onnx

    from raycls.deliver.ensemble import evaluate_ensemble, export_ensemble, load_ensemble, probabilities, read_ensembles
    from raycls.deliver.export import _resized
    from raycls.deliver.model import Classifier
    from raycls.results import read_leaderboard

    _, storage, _, rows = constrained
    ensemble = load_ensemble(storage, "constrained", "top:2")
    expected = [r["trial_id"] for r in Ranking.of("val_acc", "max").pick(rows, "top:2")]
    assert [m.trial_id for m in ensemble.members] == expected
    assert all(r["feasible"] is not False for r in ensemble.rows)  # an infeasible trial is never a member
    row = evaluate_ensemble(storage, ensemble)
    first = ensemble.first
    images, labels = _resized(first, first.data.splits.test.images), first.data.splits.test.labels
    members = [probabilities(Classifier(m).eval(), images) for m in ensemble.members]
    mean = torch.stack(members).mean(0)
    assert torch.allclose(probabilities(ensemble.module, images), mean, atol=1e-5)
    assert row["test_acc"] == pytest.approx(float((mean.argmax(1) == labels).float().mean()))
    assert json.loads(row["members"]) == expected and row["kind"] == "ensemble"
    assert row["params"] == pytest.approx(sum(r["params"] for r in ensemble.rows))  # cost: every member runs
    assert row["latency_ms"] > 0 and row["test_images"] == len(labels)
    assert [r["trial_id"] for r in read_ensembles(storage, "constrained")] == ["ensemble-top2"]
    assert len(read_leaderboard(storage, "constrained").table) == 5  # not a trial: the leaderboard is untouched
    report = export_ensemble(ensemble, tmp_path / "export")
    assert report["parity"]["max_abs_logit_diff"] < 1e-3 and report["parity"]["top1_agreement"] == 1.0
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "export" / "model.onnx")).metadata_props}
    assert json.loads(props["ensemble"]) == expected
    with pytest.raises(ConfigError, match="expected top:K"):
        load_ensemble(storage, "constrained", "best")


@pytest.mark.slow
def test_snapshot_ensemble_averages_one_trials_kept_checkpoints(constrained, tmp_path: Path) -> None:
    """Seed 000's snapshot ensembling: the best trial's kept checkpoints (keep_checkpoints: 2 of its 2 epochs)."""
    from raycls.deliver.ensemble import evaluate_ensemble, export_ensemble, load_ensemble, probabilities
    from raycls.deliver.export import _resized
    from raycls.deliver.model import Classifier
    from raycls.storage import sibling_checkpoints

    _, storage, _, rows = constrained
    best = Ranking.of("val_acc", "max").pick(rows, "best")[0]
    kept = sibling_checkpoints(best["checkpoint"])
    assert len(kept) == 2 and best["checkpoint"] in kept
    ensemble = load_ensemble(storage, "constrained", "snapshots:best")
    assert ensemble.name == f"ensemble-snapshots-{best['trial_id']}"
    assert ensemble.member_ids == [f"{best['trial_id']}/{Path(k).name}" for k in kept]
    first, second = (Classifier(m).eval() for m in ensemble.members)
    images = _resized(ensemble.first, ensemble.first.data.splits.test.images)
    one, two = probabilities(first, images), probabilities(second, images)
    assert not torch.allclose(one, two)  # two epochs' weights, not one model twice
    assert torch.allclose(probabilities(ensemble.module, images), (one + two) / 2, atol=1e-5)
    row = evaluate_ensemble(storage, ensemble)
    assert json.loads(row["members"]) == ensemble.member_ids and set(json.loads(row["member_test_acc"])) == set(
        ensemble.member_ids
    )
    assert export_ensemble(ensemble, tmp_path / "export")["parity"]["top1_agreement"] == 1.0
    with pytest.raises(ConfigError, match="expected top:K"):
        load_ensemble(storage, "constrained", "snapshots:")


@pytest.mark.slow
def test_an_ensemble_under_the_full_suite_is_scored_on_the_shifted_sets(constrained) -> None:
    from raycls.deliver.ensemble import evaluate_ensemble, load_ensemble, probabilities
    from raycls.deliver.export import _resized
    from raycls.evaluate.shift import corrupt

    _, storage, _, _ = constrained
    ensemble = load_ensemble(storage, "constrained", "top:2")
    first = ensemble.first
    small = {"shift": ("corruptions",), "corruptions": ("gaussian_noise", "contrast"), "severities": (3,)}
    first.config = first.config.model_copy(update={"eval": first.config.eval.model_copy(update=small)})
    assert names.TEST_SHIFT_MCA not in evaluate_ensemble(storage, ensemble)  # the default suite: no shift step
    row = evaluate_ensemble(storage, ensemble, suite="full")
    members = json.loads(row["member_test_shift_mca"])
    assert list(members) == ensemble.member_ids
    # Recomputed by hand for one corruption: the same sample and seed as the suite's own shift step.
    from raycls.data.sampling import stratified_sample

    sample = stratified_sample(first.data.splits.test, first.config.eval.shift_images, first.config.seed)
    noisy = corrupt(sample.images, "gaussian_noise", 3, seed=first.config.seed + 3)
    probs = probabilities(ensemble.module, _resized(first, noisy))
    expected = float((probs.argmax(1) == sample.labels.long()).float().mean())
    assert row[names.test_shift("gaussian_noise")] == pytest.approx(expected)
    assert row[names.TEST_SHIFT_MCA] == pytest.approx(
        (row[names.test_shift("gaussian_noise")] + row[names.test_shift("contrast")]) / 2
    )


@pytest.mark.slow
def test_a_plateau_ends_the_search_and_says_so(ray_local, tmp_path: Path) -> None:
    from raycls.storage import END_FILE, RAYCLS_DIR

    text = """
experiment:
  name: plateau
  trials: 6
  concurrency: 1
  stop: {plateau: {patience: 3, min_delta: 1.0}}
search: {seed: 0}
scheduler: {name: fifo}
wandb: {mode: disabled}
space:
  train.lr: {type: loguniform, low: 1.0e-3, high: 0.02}
"""
    _, storage, outcome, rows = _search(tmp_path, text, "plateau")
    # The first epoch sets the best; no later one can beat it by 1.0: three epochs later the search ends.
    assert outcome.ended is not None and outcome.ended.reason == "plateau"
    assert "plateau patience 3" in outcome.ended.detail
    recorded = json.loads((Path(storage) / "plateau" / RAYCLS_DIR / END_FILE).read_text())
    assert recorded["reason"] == "plateau"
    assert len(rows) == 1 and rows[0]["epochs"] == 4 and rows[0]["status"] == "completed"
