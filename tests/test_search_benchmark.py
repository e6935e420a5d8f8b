"""benchmarks/search_efficiency.py in a tiny mode: the equal-budget machinery (budget ledger, selection on
validation, anytime curves, summary, goals, plot) on real Fashion-MNIST, 2 seeds, a 12-epoch budget."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUDGET, MAX_T, SEEDS = 12, 3, [0, 1]


def load_benchmark():
    if "search_efficiency" in sys.modules:
        return sys.modules["search_efficiency"]
    spec = importlib.util.spec_from_file_location("search_efficiency", REPO / "benchmarks" / "search_efficiency.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["search_efficiency"] = module  # Ray pickles the trainable by value from this module
    spec.loader.exec_module(module)
    return module


def run_tiny(shared_data: Path, methods: list[str]) -> dict:
    bench = load_benchmark()
    options = bench.Options(
        seeds=SEEDS, budgets=[BUDGET], max_t=MAX_T, methods=methods, train=300, val=1100, data_root=shared_data
    )
    return bench.finish(bench.run_benchmark(options), write=False)


def check_payload(payload: dict, methods: list[str]) -> None:
    bench = load_benchmark()
    json.loads(json.dumps(payload))  # the result file is plain JSON
    assert payload["config"]["budgets"] == [BUDGET // 3, BUDGET]
    assert payload["config"]["splits"] == {"train": 300, "val": 1100, "test": 10_000}
    assert set(payload["runs"]) == set(methods)
    for method in methods:
        assert set(payload["runs"][method]) == {str(s) for s in SEEDS}
        for seed, run in payload["runs"][method].items():
            epochs = run["epochs"]
            # The budget: exactly B epochs counted (every method can spend it), never more.
            assert len(epochs) == BUDGET, (method, seed, len(epochs))
            per_trial: dict[str, list[int]] = {}
            for e in epochs:
                per_trial.setdefault(e["trial"], []).append(e["epoch"])
            assert run["trials"] == len(per_trial) >= BUDGET // MAX_T
            for trial, numbers in per_trial.items():  # a trial's epochs are 1, 2, ... up to max_t
                assert numbers == list(range(1, len(numbers) + 1)) and len(numbers) <= MAX_T, (trial, numbers)
            assert all(0.0 <= e["val_acc"] <= 1.0 for e in epochs)
            # Selection on validation: the selected epoch has the best val_acc of those counted (ties: later),
            # and the curve's score is that epoch's test accuracy.
            best = max(range(len(epochs)), key=lambda i: (epochs[i]["val_acc"], i))
            curve = payload["anytime"][method]["per_seed"][seed]
            assert len(curve) == BUDGET
            assert curve[-1] == epochs[best]["test_acc"] is not None
            assert 0.0 <= curve[-1] <= 1.0
        for budget in (str(BUDGET // 3), str(BUDGET)):
            row = payload["summary"]["per_budget"][budget][method]
            assert row["epochs_counted"]["max"] == int(budget)
            assert row["test_acc"]["n"] == len(SEEDS)
            assert row["test_acc"]["q25"] <= row["test_acc"]["median"] <= row["test_acc"]["q75"]
        assert len(payload["anytime"][method]["median"]) == BUDGET
        # Some seed's search trains an MLP well above chance (0.1): a few bad draws of a tiny search may not.
        assert max(payload["anytime"][method]["per_seed"][s][-1] for s in payload["anytime"][method]["per_seed"]) > 0.5
    reach = payload["summary"]["reach_random_fifo_final"]["methods"]
    # random+FIFO reaches its own final accuracy, at the latest with its last epoch.
    assert reach[bench.BASELINE]["seeds_reached"] == len(SEEDS)


def test_equal_budget_in_process(shared_data: Path, tmp_path: Path) -> None:
    methods = ["random_fifo", "optuna_alone"]
    payload = run_tiny(shared_data, methods)
    check_payload(payload, methods)
    # Pruning lets Optuna try more configurations than FIFO in the same budget.
    runs = payload["runs"]
    assert sum(runs["optuna_alone"][s]["trials"] for s in runs["optuna_alone"]) >= sum(
        runs["random_fifo"][s]["trials"] for s in runs["random_fifo"]
    )
    png = load_benchmark().plot(payload["anytime"], payload["config"]["budgets"], tmp_path / "curves.png", "tiny")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_equal_budget_through_ray_tune(shared_data: Path, ray_local: None) -> None:
    methods = ["random_fifo", "raytune_alone", "raycls_default"]
    payload = run_tiny(shared_data, methods)
    check_payload(payload, methods)
    goals = payload["summary"]["goals"]
    assert {"default_median_ge_every_peer_at_4", "default_median_ge_every_peer_at_12"} <= set(goals)
    assert isinstance(goals["default_reaches_random_fifo_final_within_third"]["met"], bool)


def test_ledger_counts_each_epoch_once_and_never_past_the_budget() -> None:
    bench = load_benchmark()
    ledger = bench.Ledger(budget=3)
    for epoch in (1, 2, 2):  # Tune repeats a trial's last result when its function returns: not a new epoch
        ledger.add("a", {"epoch": epoch, "val_acc": 0.5, "test_acc": 0.4})
    assert [e["epoch"] for e in ledger.epochs] == [1, 2] and not ledger.full
    ledger.add("b", {"epoch": 1, "val_acc": 0.7, "test_acc": 0.6})
    ledger.add("b", {"epoch": 2, "val_acc": 0.9, "test_acc": 0.8})  # past the budget: trained, not counted
    assert ledger.full and len(ledger.epochs) == 3 and ledger.uncounted == 1
    curve = bench.anytime(ledger.epochs)
    assert [c["test_acc"] for c in curve] == [0.4, 0.4, 0.6]  # ties go to the later epoch; b's 0.8 never counted
