"""Claim: for the same budget of training epochs, raycls's default search selects a model whose held-out test
accuracy is at least every peer's (median over seeds, at B and at B/3), and it reaches random search's final
accuracy with at most a third of its epochs (issue 29). Reported as measured, whatever it is.

Every method searches the same space, trains with the same code (`train_epoch(config, state, data)`: a
one-hidden-layer MLP on 14x14 Fashion-MNIST, tensors in memory) and spends the same budget of B epochs. A
method selects on validation accuracy (the best epoch so far of any trial, ties to the later one, as raycls's
leaderboard and checkpoints do: `raycls.ranking`) and is scored by the held-out *test* accuracy of the epoch
it selected. Validation: 5,000 images (one image = 0.02 points); test: Fashion-MNIST's 10,000.

    random_fifo       Optuna's RandomSampler, every trial trained to max_t (in-process, one trial at a time)
    optuna_alone      Optuna in-process: TPESampler + HyperbandPruner, the pair Optuna's docs recommend
                      (defaults: 10 startup trials; pruner min_resource 1, max_resource max_t, reduction 3)
    raytune_alone     Ray Tune: OptunaSearch + ASHAScheduler as Ray's docs show them (ASHA's defaults:
                      grace 1, reduction factor 4), trials 4 at a time
    raycls_default    what `raycls tune` builds: raycls.tune.searcher.create_searcher (TPE multivariate,
                      grouped, constant liar; ASHA-stopped trials told PRUNED) and raycls.search's `asha`
                      scheduler, from an experiment YAML loaded by raycls.config.load_experiment with the
                      defaults left unset (grace 1, reduction factor 2, Optuna's 10 startup trials)
    raycls_*          the same objects with candidate defaults (grace period, reduction factor, startup
                      trials, ASHA brackets)

Ray methods run in one local Ray (num_cpus=4), 2 trials at a time (--concurrency); each epoch runs the same
`train_epoch` in one of 2 long-lived Trainer actors (trial actors only relay: see Trainer). The budget is counted in epochs as the driver receives them (a Tune Stopper ends the search
once B arrived; epochs in flight past B are trained but not counted); ASHA-style methods run as many trials
as fit. The anytime curve (selected test accuracy after each counted epoch) is recorded once, at the largest
budget, and read at every budget asked for (B/3 = 60 and B = 180 by default); wall seconds are reported
beside (Ray methods pay Tune's scheduling, the in-process ones do not).

    nice -n 10 python benchmarks/search_efficiency.py                    # 10 seeds, B = 180 (~30 min, shared 2 cores)
    python benchmarks/search_efficiency.py --seeds 0 1 --budget 30 --methods random_fifo optuna_alone
    python benchmarks/search_efficiency.py --from-result results/search_efficiency_runs.json  # summary + plot again
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "token")
# No per-trial CSV/JSON/TensorBoard files: this benchmark records its own epochs.
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import RESULTS, SHARED_DATA, write_result  # noqa: E402

from raycls import names  # noqa: E402
from raycls.ranking import Ranking  # noqa: E402

METRIC, MODE = names.VAL_ACC, "max"
RANKING = Ranking.of(METRIC, MODE)
RESULT_NAME = "search_efficiency"
BASELINE = "random_fifo"
DEFAULT = "raycls_default"
PEERS = ("random_fifo", "optuna_alone", "raytune_alone")

# The space, in raycls's YAML form (the other methods' spaces are made from it). Too-low learning rates
# barely train in a few epochs, too-high ones diverge; adamw and sgd want learning rates decades apart.
SPACE: dict[str, dict[str, Any]] = {
    "train.optimizer": {"type": "choice", "values": ["adamw", "sgd"]},
    "train.lr": {"type": "loguniform", "low": 1.0e-5, "high": 1.0},
    "train.weight_decay": {"type": "loguniform", "low": 1.0e-6, "high": 1.0e-1},
    "model.width": {"type": "choice", "values": [16, 32, 64, 128, 256]},
    "train.batch_size": {"type": "choice", "values": [64, 128, 256]},
}


# ------------------------------------------------------------------------------------------ data + training
@dataclass(frozen=True)
class Data:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.y_train), "val": len(self.y_val), "test": len(self.y_test)}


def load_data(root: Path, *, train: int, val: int, split_seed: int = 0) -> Data:
    """Fashion-MNIST at 14x14 (2x2 average pooling), flattened and standardised: train and validation drawn
    from the training file (disjoint, the same for every method and seed), test = the 10,000 test images."""
    from raycls.data.datasets import read_idx

    folder = root / "fashion-mnist"
    x_all = read_idx(folder / "train-images-idx3-ubyte.gz")
    y_all = read_idx(folder / "train-labels-idx1-ubyte.gz")
    x_test = read_idx(folder / "t10k-images-idx3-ubyte.gz")
    y_test = read_idx(folder / "t10k-labels-idx1-ubyte.gz")
    order = np.random.default_rng(split_seed).permutation(len(y_all))
    picked = {"train": order[:train], "val": order[train : train + val]}

    def images(x: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(x.astype(np.float32) / 255.0)[:, None]
        return torch.nn.functional.avg_pool2d(t, 2).flatten(1)

    x_train = images(x_all[picked["train"]])
    mean, std = x_train.mean(), x_train.std()

    def labels(y: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(y.astype(np.int64))

    return Data(
        (x_train - mean) / std,
        labels(y_all[picked["train"]]),
        (images(x_all[picked["val"]]) - mean) / std,
        labels(y_all[picked["val"]]),
        (images(x_test) - mean) / std,
        labels(y_test),
    )


@dataclass
class TrialState:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    max_t: int
    epoch: int = 0
    best_val: float | None = None


def trial_seed(config: dict[str, Any], seed: int) -> int:
    """The same configuration starts from the same weights and batch order in every method."""
    key = json.dumps({k: config[k] for k in SPACE}, sort_keys=True, default=str)
    return (zlib.crc32(key.encode()) + 1_000_003 * seed) % (2**31)


def init_state(config: dict[str, Any], seed: int, max_t: int, inputs: int) -> TrialState:
    generator = torch.Generator().manual_seed(trial_seed(config, seed))
    torch.manual_seed(trial_seed(config, seed))
    width = int(config["model.width"])
    model = torch.nn.Sequential(torch.nn.Linear(inputs, width), torch.nn.ReLU(), torch.nn.Linear(width, 10))
    lr, wd = float(config["train.lr"]), float(config["train.weight_decay"])
    if config["train.optimizer"] == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=wd)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    return TrialState(model, optimizer, generator, max_t)


def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def train_epoch(config: dict[str, Any], state: TrialState, data: Data) -> dict[str, Any]:
    """One epoch, the same for every method: shuffled mini-batches, then validation accuracy. Test accuracy
    is computed only when this epoch is the trial's best so far (only such an epoch can ever be selected),
    and no search ever sees it."""
    started = time.perf_counter()
    model, batch = state.model, int(config["train.batch_size"])
    model.train()
    order = torch.randperm(len(data.y_train), generator=state.generator)
    total = 0.0
    for i in range(0, len(order), batch):
        idx = order[i : i + batch]
        state.optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
        loss.backward()
        state.optimizer.step()
        total += loss.item() * len(idx)
    model.eval()
    state.epoch += 1
    val = _accuracy(model, data.x_val, data.y_val)
    test = None
    if RANKING.as_good(val, state.best_val):
        state.best_val = val
        test = _accuracy(model, data.x_test, data.y_test)
    return {
        names.EPOCH: state.epoch,
        names.MAX_EPOCHS: state.max_t,
        METRIC: val,
        names.TEST_ACC: test,
        names.TRAIN_LOSS: total / len(order) if math.isfinite(total) else None,
        names.EPOCH_S: time.perf_counter() - started,
    }


# ---------------------------------------------------------------------------------------- the budget ledger
@dataclass
class Ledger:
    """Epochs in the order the search spent them; `full` once the budget is spent (later ones not counted)."""

    budget: int
    started: float = field(default_factory=time.perf_counter)
    epochs: list[dict[str, Any]] = field(default_factory=list)
    uncounted: int = 0
    trials: set[str] = field(default_factory=set)
    seen: set[tuple[str, int]] = field(default_factory=set)

    @property
    def full(self) -> bool:
        return len(self.epochs) >= self.budget

    def add(self, trial: str, result: dict[str, Any]) -> None:
        # Tune hands the Stopper a trial's last result again when its function returns by itself (its
        # RESULT_DUPLICATE, as raycls's ASHA lets trials at max_t finish): the same epoch, not a new one.
        if (trial, int(result[names.EPOCH])) in self.seen:
            return
        self.seen.add((trial, int(result[names.EPOCH])))
        if self.full:
            self.uncounted += 1
            return
        self.trials.add(trial)
        self.epochs.append(
            {
                "trial": trial,
                "epoch": int(result[names.EPOCH]),
                METRIC: _round(result.get(METRIC)),
                names.TEST_ACC: _round(result.get(names.TEST_ACC)),
                "wall_s": round(time.perf_counter() - self.started, 2),
            }
        )


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 5)


def anytime(epochs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """After each counted epoch: the epoch the method would select (best validation accuracy so far, ties to
    the later one), its validation and test accuracy."""
    best: dict[str, Any] | None = None
    curve = []
    for record in epochs:
        value = RANKING.value(record)
        if value is not None and RANKING.as_good(value, None if best is None else best[METRIC]):
            best = record
        curve.append(best)
    return curve


# ------------------------------------------------------------------------------------ in-process methods
def optuna_params(trial: Any) -> dict[str, Any]:
    """SPACE through Optuna's own suggest API (the peers do not go through raycls)."""
    params = {}
    for path, spec in SPACE.items():
        if spec["type"] == "choice":
            params[path] = trial.suggest_categorical(path, spec["values"])
        else:
            params[path] = trial.suggest_float(path, spec["low"], spec["high"], log=spec["type"] == "loguniform")
    return params


@dataclass(frozen=True)
class Setup:
    seed: int
    budget: int
    max_t: int
    data: Data
    folder: Path
    trainers: list = field(default_factory=list)  # Trainer actors (Ray methods only)
    concurrency: int = 2  # Ray methods: trials at a time


def run_random_fifo(setup: Setup, spec: dict[str, Any]) -> Ledger:
    import optuna

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=setup.seed))
    ledger = Ledger(setup.budget)
    while not ledger.full:
        trial = study.ask()
        config = optuna_params(trial)
        state = init_state(config, setup.seed, setup.max_t, setup.data.x_train.shape[1])
        result: dict[str, Any] = {}
        while state.epoch < setup.max_t and not ledger.full:
            result = train_epoch(config, state, setup.data)
            ledger.add(f"t{trial.number}", result)
        study.tell(trial, result.get(METRIC))
    return ledger


def run_optuna_alone(setup: Setup, spec: dict[str, Any]) -> Ledger:
    import optuna

    study = optuna.create_study(
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=setup.seed),
        pruner=optuna.pruners.HyperbandPruner(min_resource=1, max_resource=setup.max_t, reduction_factor=3),
    )
    ledger = Ledger(setup.budget)

    def objective(trial: optuna.Trial) -> float:
        config = optuna_params(trial)
        state = init_state(config, setup.seed, setup.max_t, setup.data.x_train.shape[1])
        result: dict[str, Any] = {}
        while state.epoch < setup.max_t:
            if ledger.full:
                study.stop()
                raise optuna.TrialPruned()  # the budget ran out mid-trial
            result = train_epoch(config, state, setup.data)
            ledger.add(f"t{trial.number}", result)
            trial.report(result[METRIC], state.epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
        if ledger.full:
            study.stop()
        return result[METRIC]  # the last epoch's value, as Optuna's examples return

    study.optimize(objective, n_trials=setup.budget)
    return ledger


# ----------------------------------------------------------------------------------------- Ray Tune methods
class Trainer:
    """A long-lived Ray actor that trains the Ray methods' epochs with `train_epoch`: it loads the tensors and
    imports torch once for the whole benchmark. Tune's trial actors (a fresh process per actor, per search)
    only relay epochs, so a search does not pay torch's import in every trial actor: on a shared 2-core
    machine that start-up, not training, would dominate the Ray methods' wall time."""

    def __init__(self, data_file: str):
        torch.set_num_threads(1)
        self.data = Data(**torch.load(data_file))
        self.states: dict[str, TrialState] = {}

    def epoch(self, key: str, config: dict[str, Any], seed: int, max_t: int) -> dict[str, Any]:
        if key not in self.states:
            self.states[key] = init_state(config, seed, max_t, self.data.x_train.shape[1])
        result = train_epoch(config, self.states[key], self.data)
        if self.states[key].epoch >= max_t:
            del self.states[key]
        return result

    def drop(self, key: str) -> None:
        self.states.pop(key, None)


def tune_trainable(config: dict[str, Any], *, trainers: list, seed: int, max_t: int) -> None:
    """Runs in a Tune trial actor: each epoch is `train_epoch` in a Trainer actor (this process needs no torch)."""
    import ray
    from ray import tune

    key = tune.get_context().get_trial_id()
    trainer = trainers[zlib.crc32(key.encode()) % len(trainers)]
    try:
        for _ in range(max_t):
            tune.report(ray.get(trainer.epoch.remote(key, config, seed, max_t)))
    finally:  # stopped by the scheduler or the budget: the trainer forgets the trial
        trainer.drop.remote(key)


def _budget_stopper(ledger: Ledger) -> Any:
    from ray.tune import Stopper

    class EpochBudget(Stopper):
        """Counts every epoch result the driver receives; ends the whole search once the budget is spent."""

        def __call__(self, trial_id: str, result: dict) -> bool:
            ledger.add(trial_id, result)
            return False

        def stop_all(self) -> bool:
            return ledger.full

    return EpochBudget()


def tune_space() -> dict[str, Any]:
    from ray import tune

    return {
        path: tune.choice(spec["values"])
        if spec["type"] == "choice"
        else (tune.loguniform if spec["type"] == "loguniform" else tune.uniform)(spec["low"], spec["high"])
        for path, spec in SPACE.items()
    }


def ray_alone_parts(setup: Setup, spec: dict[str, Any]) -> tuple[Any, Any, dict[str, Any]]:
    """Ray's documented pair: OptunaSearch over a Tune space, ASHAScheduler with its defaults."""
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    optuna_logging_quiet()
    searcher = OptunaSearch(metric=METRIC, mode=MODE, seed=setup.seed)
    scheduler = ASHAScheduler(time_attr="training_iteration", max_t=setup.max_t)
    return searcher, scheduler, tune_space()


RAYCLS_YAML = """
experiment: {{name: {name}, trials: {trials}, concurrency: 4, metric: {metric}, mode: {mode}}}
search: {search}
scheduler: {scheduler}
wandb: {{mode: disabled}}
base:
  seed: {seed}
  data: {{name: fashion_mnist, root: {root}, download: false}}
  model: {{name: small_cnn, width: 32}}
  train: {{epochs: {max_t}, batch_size: 64, optimizer: adamw, lr: 1.0e-3, weight_decay: 1.0e-4}}
space: {space}
"""


def raycls_experiment(setup: Setup, spec: dict[str, Any], name: str) -> Any:
    """The experiment `raycls tune` would load: SPACE in raycls's YAML, only the settings a candidate
    changes written (the rest left to raycls's defaults)."""
    from raycls.config import load_experiment

    search = {"algorithm": "tpe", "seed": setup.seed, **spec.get("search", {})}
    scheduler = {"name": "asha", "max_t": setup.max_t, **spec.get("scheduler", {})}
    path = setup.folder / f"{name}.yaml"
    path.write_text(
        RAYCLS_YAML.format(
            name=name,
            trials=setup.budget,
            metric=METRIC,
            mode=MODE,
            search=json.dumps(search),
            scheduler=json.dumps(scheduler),
            seed=setup.seed,
            root=SHARED_DATA,
            max_t=setup.max_t,
            space=json.dumps(SPACE),
        )
    )
    return load_experiment(path)


def raycls_parts(setup: Setup, spec: dict[str, Any]) -> tuple[Any, Any, None]:
    """raycls's own searcher and scheduler objects, as raycls.tune.driver builds them. `brackets` (not a
    raycls setting yet) builds the same scheduler class with Tune's `brackets`."""
    from raycls.search import TRIAL_SCHEDULERS, last_stage
    from raycls.tune.searcher import create_searcher

    name = f"{spec['method']}-s{setup.seed}"
    experiment = raycls_experiment(setup, spec, name)
    searcher = create_searcher(experiment, setup.folder / name / "state", None)
    if "brackets" in spec:
        from ray.tune.schedulers import ASHAScheduler

        section = experiment.scheduler
        scheduler = last_stage(ASHAScheduler)(
            time_attr=names.EPOCH,
            max_t=experiment.max_t,
            grace_period=section.grace_period,
            reduction_factor=section.reduction_factor,
            brackets=spec["brackets"],
            stop_last_trials=False,
        )
    else:
        scheduler = TRIAL_SCHEDULERS.create(experiment.scheduler.name, experiment)
    return searcher, scheduler, None


def optuna_logging_quiet() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)


def run_tune_method(setup: Setup, spec: dict[str, Any]) -> Ledger:
    import logging

    from ray import tune

    # Tune's result grid warns for every trial that it has no result files (this benchmark disables them).
    logging.getLogger("ray.tune").setLevel(logging.ERROR)

    searcher, scheduler, param_space = spec["parts"](setup, spec)
    ledger = Ledger(setup.budget)
    trainable = tune.with_resources(
        tune.with_parameters(tune_trainable, trainers=setup.trainers, seed=setup.seed, max_t=setup.max_t),
        {"CPU": 1},
    )
    tuner = tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode=MODE,
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=setup.budget,  # an upper bound: every trial trains at least one epoch
            max_concurrent_trials=setup.concurrency,
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=f"{spec['method']}-s{setup.seed}",
            storage_path=str(setup.folder / "tune"),
            stop=_budget_stopper(ledger),
            verbose=0,
            checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=False),
        ),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tuner.fit()
    return ledger


# ------------------------------------------------------------------------------------------------ methods
METHODS: dict[str, dict[str, Any]] = {
    "random_fifo": {"run": run_random_fifo, "ray": False, "what": "Optuna RandomSampler, FIFO (every trial to max_t)"},
    "optuna_alone": {
        "run": run_optuna_alone,
        "ray": False,
        "what": "Optuna in-process: TPESampler() + HyperbandPruner(min 1, max max_t, reduction 3)",
    },
    "raytune_alone": {
        "run": run_tune_method,
        "parts": ray_alone_parts,
        "ray": True,
        "what": "Ray Tune: OptunaSearch(seed) + ASHAScheduler(max_t) with Ray's defaults (grace 1, reduction 4)",
    },
    "raycls_default": {
        "run": run_tune_method,
        "parts": raycls_parts,
        "ray": True,
        "what": "raycls's create_searcher + TRIAL_SCHEDULERS['asha'] with raycls's defaults "
        "(grace 1, reduction 2, n_startup_trials None = Optuna's 10)",
    },
    "raycls_rf3": {
        "run": run_tune_method,
        "parts": raycls_parts,
        "ray": True,
        "scheduler": {"reduction_factor": 3},
        "what": "raycls, reduction factor 3",
    },
    "raycls_rf4": {
        "run": run_tune_method,
        "parts": raycls_parts,
        "ray": True,
        "scheduler": {"reduction_factor": 4},
        "what": "raycls, reduction factor 4 (Ray's ASHA default)",
    },
    "raycls_startup5": {
        "run": run_tune_method,
        "parts": raycls_parts,
        "ray": True,
        "search": {"n_startup_trials": 5},
        "what": "raycls, 5 startup trials (reduction factor 2)",
    },
    "raycls_rf3_grace2": {
        "run": run_tune_method,
        "parts": raycls_parts,
        "ray": True,
        "scheduler": {"reduction_factor": 3, "grace_period": 2},
        "what": "raycls, reduction factor 3, grace period 2",
    },
    "raycls_rf3_brackets2": {
        "run": run_tune_method,
        "parts": raycls_parts,
        "ray": True,
        "scheduler": {"reduction_factor": 3},
        "brackets": 2,
        "what": "raycls, reduction factor 3, 2 ASHA brackets",
    },
}


# The default run (the others by --methods): the peers, raycls's default and the candidates that fit the
# 25-minute budget of a shared 2-core machine (a Ray search pays ~15-30 s of trial-actor start-up there).
DEFAULT_METHODS = ["random_fifo", "optuna_alone", "raytune_alone", "raycls_default", "raycls_rf3", "raycls_startup5"]


def spec_of(method: str) -> dict[str, Any]:
    return {"method": method, **METHODS[method]}


# ------------------------------------------------------------------------------------------------ summary
def read_at(curve: list[dict[str, Any] | None], epochs: int) -> dict[str, Any] | None:
    """The selection after `epochs` counted epochs (the last one when the method spent fewer)."""
    if not curve:
        return None
    return curve[min(epochs, len(curve)) - 1]


def spread(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"median": None, "q25": None, "q75": None, "min": None, "max": None, "n": 0}
    q = np.quantile(values, [0.25, 0.75])
    return {
        "median": round(statistics.median(values), 4),
        "q25": round(float(q[0]), 4),
        "q75": round(float(q[1]), 4),
        "min": round(min(values), 4),
        "max": round(max(values), 4),
        "n": len(values),
    }


def epochs_to_reach(curve: list[dict[str, Any] | None], target: float) -> int | None:
    for count, selected in enumerate(curve, start=1):
        if selected is not None and selected[names.TEST_ACC] is not None and selected[names.TEST_ACC] >= target:
            return count
    return None


def paired_diffs(mine: dict[str, float | None], theirs: dict[str, float | None]) -> dict[str, Any]:
    """Seed by seed, mine minus theirs: the median, the counts each way, and the two-sided Wilcoxon
    signed-rank p-value (is the median difference zero?)."""
    from scipy.stats import wilcoxon

    diffs = [v - theirs[s] for s, v in mine.items() if v is not None and theirs.get(s) is not None]
    return {
        "median_diff": round(statistics.median(diffs), 4) if diffs else None,
        "default_better": sum(d > 0 for d in diffs),
        "ties": sum(d == 0 for d in diffs),
        "default_worse": sum(d < 0 for d in diffs),
        "wilcoxon_p": round(float(wilcoxon(diffs).pvalue), 3) if any(diffs) else None,
    }


def summarise(runs: dict[str, dict[str, dict[str, Any]]], budgets: list[int]) -> dict[str, Any]:
    """Per method and budget: the spread over seeds of the selected epoch's test (and validation) accuracy,
    trials run and wall seconds; then the issue's two goals."""
    methods = list(runs)
    seeds = sorted({s for m in methods for s in runs[m]}, key=int)
    curves = {m: {s: anytime(runs[m][s]["epochs"]) for s in runs[m]} for m in methods}
    per_budget: dict[str, dict[str, Any]] = {}
    for budget in budgets:
        rows = {}
        for m in methods:
            picked = {s: read_at(curves[m][s], budget) for s in runs[m]}
            rows[m] = {
                "test_acc": spread([p[names.TEST_ACC] for p in picked.values() if p]),
                "val_acc": spread([p[METRIC] for p in picked.values() if p]),
                "trials": spread([len({e["trial"] for e in runs[m][s]["epochs"][:budget]}) for s in runs[m]]),
                "wall_s": spread(
                    [runs[m][s]["epochs"][:budget][-1]["wall_s"] for s in runs[m] if runs[m][s]["epochs"]]
                ),
                "epochs_counted": spread([min(budget, len(runs[m][s]["epochs"])) for s in runs[m]]),
                "test_acc_per_seed": {s: p[names.TEST_ACC] if p else None for s, p in picked.items()},
                "val_acc_per_seed": {s: p[METRIC] if p else None for s, p in picked.items()},
            }
        per_budget[str(budget)] = rows
    summary: dict[str, Any] = {"per_budget": per_budget}
    big, third = max(budgets), max(1, max(budgets) // 3)
    if BASELINE in methods:
        # Epochs each method needs to select a model as good on test as random+FIFO's final one, per seed.
        reach = {}
        for m in methods:
            counts = {}
            for s in runs[m]:
                base = read_at(curves[BASELINE].get(s, []), big)
                counts[s] = epochs_to_reach(curves[m][s], base[names.TEST_ACC]) if base else None
            reach[m] = {
                "epochs_per_seed": counts,
                "seeds_within_third": sum(1 for c in counts.values() if c is not None and c <= third),
                "seeds_reached": sum(1 for c in counts.values() if c is not None),
                "seeds": len(counts),
            }
        summary["reach_random_fifo_final"] = {"budget": big, "third": third, "methods": reach}
    if DEFAULT in methods:
        # Paired by seed (the same seed gives every TPE and the random search the same first random draws):
        # raycls's default minus each other method at each budget, on the held-out test accuracy and on the
        # validation accuracy the searches select on, with a Wilcoxon signed-rank test of the differences.
        paired: dict[str, Any] = {}
        for key, rows in per_budget.items():
            paired[key] = {}
            for m in methods:
                if m == DEFAULT:
                    continue
                paired[key][m] = {
                    "test_acc": paired_diffs(rows[DEFAULT]["test_acc_per_seed"], rows[m]["test_acc_per_seed"]),
                    "val_acc": paired_diffs(rows[DEFAULT]["val_acc_per_seed"], rows[m]["val_acc_per_seed"]),
                }
        summary["default_paired"] = paired
        goals: dict[str, Any] = {}
        for budget in sorted({third, *budgets}):
            key = str(budget)
            if key not in per_budget:
                continue
            mine = per_budget[key][DEFAULT]["test_acc"]["median"]
            peers = {p: per_budget[key][p]["test_acc"]["median"] for p in PEERS if p in per_budget[key]}
            goals[f"default_median_ge_every_peer_at_{key}"] = {
                "met": all(mine is not None and v is not None and mine >= v for v in peers.values()),
                "default": mine,
                "peers": peers,
            }
        if "reach_random_fifo_final" in summary:
            mine = summary["reach_random_fifo_final"]["methods"][DEFAULT]
            goals["default_reaches_random_fifo_final_within_third"] = {
                "met": mine["seeds_within_third"] >= math.ceil(0.8 * mine["seeds"]),
                "seeds_within_third": mine["seeds_within_third"],
                "seeds": mine["seeds"],
                "needed": math.ceil(0.8 * mine["seeds"]),
            }
        summary["goals"] = goals
        summary["seeds"] = seeds
    return summary


def curve_table(runs: dict[str, dict[str, dict[str, Any]]], budget: int) -> dict[str, Any]:
    """The anytime curves for the JSON: per method, per seed, the selected test accuracy after each epoch,
    plus the median over seeds."""
    out = {}
    for m, per_seed in runs.items():
        seeds = {}
        for s, run in per_seed.items():
            curve = anytime(run["epochs"])
            seeds[s] = [None if c is None else c[names.TEST_ACC] for c in curve[:budget]]
        length = max((len(c) for c in seeds.values()), default=0)
        columns: dict[str, list[float | None]] = {"median": [], "q25": [], "q75": []}
        for i in range(length):
            # A seed that spent fewer epochs keeps its last selection.
            values = [c[min(i, len(c) - 1)] for c in seeds.values() if c and c[min(i, len(c) - 1)] is not None]
            q = np.quantile(values, [0.5, 0.25, 0.75]) if values else [None] * 3
            for key, v in zip(columns, q, strict=True):
                columns[key].append(None if v is None else round(float(v), 4))
        out[m] = {"epochs": list(range(1, length + 1)), **columns, "per_seed": seeds}
    return out


def plot(curves: dict[str, Any], budgets: list[int], path: Path, title: str) -> Path:
    from raycls.plots import plt, save  # pyplot under the Agg backend (no display)

    # Left: the whole curve; right: the same curves from epoch max_budget/6 on, where methods differ by tenths.
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    zoom_from = max(1, max(budgets) // 6)
    for m, table in curves.items():
        per_seed = [c for c in table["per_seed"].values() if c]
        length = max(len(c) for c in per_seed)
        grid = np.full((len(per_seed), length), np.nan)
        for i, c in enumerate(per_seed):
            values = [np.nan if v is None else v for v in c]
            grid[i, : len(values)] = values
            grid[i, len(values) :] = values[-1]  # a method that spent fewer epochs keeps its last selection
        x = np.arange(1, length + 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns before the first epoch
            med = np.nanmedian(grid, axis=0)
            lo, hi = np.nanquantile(grid, 0.25, axis=0), np.nanquantile(grid, 0.75, axis=0)
        style = {"linewidth": 2.4} if m == DEFAULT else {"linewidth": 1.3, "linestyle": "--" if m in PEERS else "-"}
        for ax, start in zip(axes, (0, zoom_from - 1), strict=True):
            (line,) = ax.plot(x[start:], med[start:], label=m, **style)
            ax.fill_between(x[start:], lo[start:], hi[start:], alpha=0.10, color=line.get_color())
    for ax in axes:
        for b in sorted({max(budgets) // 3, *budgets}):
            ax.axvline(b, color="grey", linewidth=0.8, linestyle=":")
        ax.set_xlabel("epochs spent (budget)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy of the selected epoch (median over seeds, IQR band)")
    axes[0].set_ylim(bottom=max(0.5, axes[0].get_ylim()[0]))
    axes[0].legend(fontsize=8, loc="lower right")
    axes[1].set_title(f"from epoch {zoom_from}", fontsize=9)
    fig.suptitle(title, fontsize=10)
    return save(fig, path, dpi=110)


# --------------------------------------------------------------------------------------------------- main
@dataclass(frozen=True)
class Options:
    seeds: list[int]
    budgets: list[int]
    max_t: int = 9
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    train: int = 1000
    val: int = 2000
    data_root: Path = SHARED_DATA
    num_cpus: int = 4
    concurrency: int = 2
    trainers: int = 2
    # Called after each seed with the payload so far (the script writes it: a run cut short keeps its seeds).
    on_seed: Callable[[dict[str, Any]], None] | None = None
    log: Callable[[str], None] = print


def run_benchmark(options: Options) -> dict[str, Any]:
    """Every method on every seed; returns the result payload (without the machine facts)."""
    unknown = [m for m in options.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"--methods: unknown {unknown}; known: {list(METHODS)}")
    torch.set_num_threads(1)
    optuna_logging_quiet()
    budget = max(options.budgets)
    data = load_data(options.data_root, train=options.train, val=options.val)
    folder = Path(tempfile.mkdtemp(prefix="search_efficiency-"))
    data_file = folder / "data.pt"
    torch.save({k: getattr(data, k) for k in Data.__dataclass_fields__}, data_file)
    uses_ray = any(METHODS[m]["ray"] for m in options.methods)
    started_ray = False
    trainers: list = []
    runs: dict[str, dict[str, dict[str, Any]]] = {m: {} for m in options.methods}
    started = time.perf_counter()
    try:
        if uses_ray:
            import ray
            import ray.cloudpickle

            from raycls.tune.cluster import init_ray

            # Trial actors unpickle the trainable by value: this file is a script, not an installed module.
            ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
            started_ray = not ray.is_initialized()
            init_ray(None, num_cpus=options.num_cpus)
            # No logical CPU of their own: Tune's trial slots stay num_cpus (trials at a time).
            remote = ray.remote(num_cpus=0)(Trainer)
            trainers = [remote.remote(str(data_file)) for _ in range(options.trainers)]
        for seed in options.seeds:
            for method in options.methods:
                spec = spec_of(method)
                setup = Setup(seed, budget, options.max_t, data, folder, trainers, options.concurrency)
                t0 = time.perf_counter()
                ledger = spec["run"](setup, spec)
                wall = time.perf_counter() - t0
                runs[method][str(seed)] = {
                    "wall_s": round(wall, 2),
                    "trials": len(ledger.trials),
                    "epochs_uncounted": ledger.uncounted,
                    "epochs": ledger.epochs,
                }
                best = read_at(anytime(ledger.epochs), budget)
                options.log(
                    f"seed {seed} {method}: {len(ledger.epochs)} epochs (+{ledger.uncounted} past B), "
                    f"{len(ledger.trials)} trials, {wall:.1f} s, selected test_acc "
                    f"{best[names.TEST_ACC] if best else None}"
                )
            if options.on_seed is not None:
                options.on_seed(payload(options, data, runs, started, uses_ray))
    finally:
        if uses_ray:
            import ray

            for trainer in trainers:
                ray.kill(trainer)
            if started_ray:
                ray.shutdown()
        shutil.rmtree(folder, ignore_errors=True)
    return payload(options, data, runs, started, uses_ray)


def payload(
    options: Options, data: Data, runs: dict[str, dict[str, dict[str, Any]]], started: float, uses_ray: bool
) -> dict[str, Any]:
    budget = max(options.budgets)
    done = [s for s in options.seeds if all(str(s) in runs[m] for m in runs)]
    return {
        "config": {
            "dataset": "fashion_mnist (14x14, flattened)",
            "splits": data.sizes(),
            "model": "MLP 196 -> width -> 10",
            "space": SPACE,
            "max_t": options.max_t,
            "budgets": sorted({budget // 3, *options.budgets}),
            "seeds": done,
            "methods": {m: METHODS[m]["what"] for m in options.methods},
            "ray_num_cpus": options.num_cpus if uses_ray else None,
            "ray_trainer_actors": options.trainers if uses_ray else None,
            "ray_trials_at_a_time": options.concurrency if uses_ray else None,
            "selection": "best validation accuracy over every counted epoch (ties: later), raycls.ranking",
            "score": "test accuracy of the selected epoch",
        },
        "total_wall_s": round(time.perf_counter() - started, 1),
        # Only seeds every method finished (a run cut short is summarised over those).
        "runs": {m: {str(s): runs[m][str(s)] for s in done} for m in runs},
    }


def finish(payload: dict[str, Any], *, write: bool, name: str = RESULT_NAME) -> dict[str, Any]:
    """Summary, anytime curves and plot from the raw runs; written to results/ unless write is False."""
    budgets = payload["config"]["budgets"]
    payload = {**payload, "summary": summarise(payload["runs"], budgets)}
    payload["anytime"] = curve_table(payload["runs"], max(budgets))
    if write:
        from raycls.files import write_text_atomic

        # The raw epochs and per-seed curves go to a compact file beside (megabytes indented).
        raw = RESULTS / f"{name}_runs.json"
        kept = {k: payload[k] for k in ("config", "total_wall_s", "runs", "merged_from") if k in payload}
        kept["written_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        per_seed = {m: t["per_seed"] for m, t in payload["anytime"].items()}
        write_text_atomic(raw, json.dumps({**kept, "anytime_per_seed": per_seed}, separators=(",", ":")) + "\n")
        main = {k: v for k, v in payload.items() if k not in ("runs", "anytime")}
        main["anytime"] = {m: {k: v for k, v in t.items() if k != "per_seed"} for m, t in payload["anytime"].items()}
        main["raw_runs"] = raw.name
        path = write_result(name, main)
        png = plot(
            payload["anytime"],
            budgets,
            path.with_suffix(".png"),
            f"Fashion-MNIST MLP, {len(payload['config']['seeds'])} seeds, max_t {payload['config']['max_t']}: "
            "selected test accuracy vs epochs spent",
        )
        print(f"-> {path}\n-> {png}")
    return payload


def merge_results(paths: list[Path]) -> dict[str, Any]:
    """Raw runs of one or more earlier results, merged by method: on the same seeds a method rerun replaces
    its old runs; on other seeds (disjoint sets) each method's seeds are pooled, for more seeds per method."""
    merged: dict[str, Any] | None = None
    for path in paths:
        loaded = json.loads(path.read_text())
        if merged is None:
            merged = {k: loaded[k] for k in ("config", "total_wall_s", "runs")}
            merged["merged_from"] = {}
        else:
            same = ("splits", "budgets", "max_t", "space")
            differ = [k for k in same if loaded["config"][k] != merged["config"][k]]
            if differ:
                raise SystemExit(f"{path}: config differs from {paths[0]} in {differ}: not merged")
            if loaded["config"]["seeds"] == merged["config"]["seeds"]:
                merged["runs"].update(loaded["runs"])
            elif set(loaded["config"]["seeds"]) & set(merged["config"]["seeds"]):
                raise SystemExit(f"{path}: its seeds overlap the others' without being the same: not merged")
            else:
                for method, runs in loaded["runs"].items():
                    merged["runs"].setdefault(method, {}).update(runs)
                merged["config"]["seeds"] = sorted({*merged["config"]["seeds"], *loaded["config"]["seeds"]})
            merged["config"]["methods"].update(loaded["config"]["methods"])
            merged["total_wall_s"] = round(merged["total_wall_s"] + loaded["total_wall_s"], 1)
        for m in loaded["runs"]:
            merged["merged_from"][m] = {"file": path.name, "written_at": loaded.get("written_at")}
    assert merged is not None
    return merged


def print_table(payload: dict[str, Any]) -> None:
    for budget, rows in payload["summary"]["per_budget"].items():
        print(f"\nB = {budget}: test accuracy of the selected epoch (median [q25, q75]), trials, wall s")
        for m, r in rows.items():
            t = r["test_acc"]
            print(
                f"  {m:22s} {t['median']} [{t['q25']}, {t['q75']}]  trials {r['trials']['median']}  "
                f"wall {r['wall_s']['median']}"
            )
    reach = payload["summary"].get("reach_random_fifo_final")
    if reach:
        print(f"\nreaches random_fifo's final test accuracy within {reach['third']} epochs (seeds):")
        for m, r in reach["methods"].items():
            print(f"  {m:22s} {r['seeds_within_third']}/{r['seeds']} (at all: {r['seeds_reached']})")
    for budget, rows in payload["summary"].get("default_paired", {}).items():
        print(f"\nB = {budget}: {DEFAULT} minus each method, by seed (median; better/ties/worse; Wilcoxon p)")
        for m, r in rows.items():
            test, val = r["test_acc"], r["val_acc"]
            print(
                f"  {m:22s} test {test['median_diff']}  {test['default_better']}/{test['ties']}/"
                f"{test['default_worse']}  p {test['wilcoxon_p']}   validation {val['median_diff']}  "
                f"{val['default_better']}/{val['ties']}/{val['default_worse']}  p {val['wilcoxon_p']}"
            )
    for goal, verdict in payload["summary"].get("goals", {}).items():
        print(f"goal {goal}: {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--budget", type=int, nargs="+", default=[180], help="budgets in epochs (B/3 is added)")
    parser.add_argument("--max-t", type=int, default=9, help="epochs of a trial that is never stopped")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS))
    parser.add_argument("--train", type=int, default=1000, help="training images")
    parser.add_argument("--val", type=int, default=2000, help="validation images (selection)")
    parser.add_argument("--num-cpus", type=int, default=4, help="the local Ray's logical CPUs (trials at a time)")
    parser.add_argument("--concurrency", type=int, default=2, help="Ray methods: trials at a time")
    parser.add_argument("--trainers", type=int, default=2, help="actors that train the Ray methods' epochs")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument(
        "--from-result",
        type=Path,
        nargs="+",
        metavar="RUNS_JSON",
        help="summarise and plot earlier *_runs.json files again; several: merged by method (a later file's "
        "method replaces an earlier one's; same seeds, budgets, max_t and splits required)",
    )
    parser.add_argument("--name", default=RESULT_NAME, help="results/<name>.json, <name>_runs.json, <name>.png")
    args = parser.parse_args()
    if args.from_result:
        payload = finish(merge_results(args.from_result), write=not args.no_write, name=args.name)
    else:
        options = Options(
            seeds=args.seeds,
            budgets=args.budget,
            max_t=args.max_t,
            methods=args.methods,
            train=args.train,
            val=args.val,
            num_cpus=args.num_cpus,
            trainers=args.trainers,
            concurrency=args.concurrency,
            on_seed=None if args.no_write else lambda partial: finish(partial, write=True, name=args.name),
        )
        payload = finish(run_benchmark(options), write=not args.no_write, name=args.name)
    print_table(payload)


if __name__ == "__main__":
    main()
