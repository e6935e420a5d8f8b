"""Claim: raycls costs no more per trial than Ray's own floor, measured beside it in the same run.

Overhead per trial = (wall x concurrency - work) / trials. Work is what the trial itself measures: the loop
(setup_s + epoch_s of every epoch: data, model, training, validation) plus, for raycls, the held-out
evaluation (test_eval_s) and the cost measurement (cost_s: params, FLOPs, latency), which a user asked for
and which are reported apart below. Everything else is the platform.

Every method runs the same objective (digits, small_cnn, 2 epochs) through the same `raycls.train.fit`
loop, writing a checkpoint each epoch:
  1 worker (rounds in a rotating order, medians compared):
             (a) raycls tune (the loop in the Tune trial's actor), W&B offline, and W&B disabled
             (b) the floor: a raw Ray Tune function trainable, `reuse_actors=True`, `ray.tune.report` with
                 a checkpoint per epoch, Tune's default search (no raycls ledger, rows, searcher, stopper)
                 and Tune's default loggers (CSV, JSON, TensorBoard); beside it the same floor with JSON
                 only, as raycls runs Tune, to show what that choice alone is worth
             (c) plain Optuna in-process (study.optimize calling the loop): what Ray itself costs
  2 workers (rounds the same way):
             (d) raycls tune (a Ray Train TorchTrainer per trial, DDP over gloo)
             (e) the floor: a bare `TorchTrainer.fit` of the same loop from the driver, one per trial, with
                 Ray's defaults; beside it the same floor with raycls's controller poll interval
                 (`raycls.train.ray_train.POLL_INTERVAL_S`), to show what that choice alone is worth

    python benchmarks/trial_overhead.py [--trials 12] [--rounds 3] [--trials-2w 3] [--rounds-2w 2] [--concurrency 2]
        [--skip-1w | --skip-2w]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "token")

import optuna  # noqa: E402
from common import write_result  # noqa: E402

from raycls import names  # noqa: E402
from raycls.config import load_experiment, resolve_trial  # noqa: E402
from raycls.config.experiment import Experiment  # noqa: E402
from raycls.config.space import suggest  # noqa: E402
from raycls.results import read_leaderboard  # noqa: E402
from raycls.train import RunContext, fit  # noqa: E402

SPACE = """
experiment: {{name: {name}, trials: {trials}, concurrency: {concurrency}, resources: {{workers: {workers}}}}}
search: {{seed: 0}}
scheduler: {{name: fifo}}
wandb: {{mode: {wandb}}}
base:
  data: {{name: digits, val_fraction: 0.2}}
  model: {{name: small_cnn, width: 16}}
  train: {{epochs: 2, batch_size: 64, optimizer: adamw, lr: 3.0e-3}}
space:
  train.lr: {{type: loguniform, low: 1.0e-3, high: 1.0e-2}}
"""


def _seconds(row: dict, key: str) -> float:
    value = row.get(key)
    return 0.0 if value is None or math.isnan(value) else float(value)  # Tune's frames hold NaN where unreported


def loop_seconds(history_rows: list[dict]) -> float:
    return sum(_seconds(r, names.EPOCH_S) + _seconds(r, names.SETUP_S) for r in history_rows)


def extra_work_seconds(history_rows: list[dict]) -> tuple[float, float]:
    """(evaluation, cost) seconds: work the trial was asked for, measured in the trial."""
    evaluation = sum(_seconds(r, names.EVAL_S) for r in history_rows)
    cost = sum(_seconds(r, names.COST_S) for r in history_rows)
    return evaluation, cost


def write_space(folder: Path, *, name: str, trials: int, concurrency: int, workers: int, wandb: str) -> Experiment:
    path = folder / f"{name}.yaml"
    path.write_text(SPACE.format(name=name, trials=trials, concurrency=concurrency, workers=workers, wandb=wandb))
    return load_experiment(path)


def summary(wall: float, concurrency: int, trials: int, loop: float, evaluation: float = 0.0, cost: float = 0.0):
    work = loop + evaluation + cost
    return {
        "trials": trials,
        "concurrency": concurrency,
        "wall_s": wall,
        "loop_s": loop,
        "evaluation_s": evaluation,
        "cost_s": cost,
        "overhead_per_trial_s": (wall * concurrency - work) / trials,
        "evaluation_per_trial_s": evaluation / trials,
        "cost_per_trial_s": cost / trials,
    }


def run_raycls(folder: Path, *, name: str, trials: int, concurrency: int, workers: int, wandb: str) -> dict:
    from raycls.tune.driver import TuneOptions, run_tune

    experiment = write_space(folder, name=name, trials=trials, concurrency=concurrency, workers=workers, wandb=wandb)
    storage = str(folder / "results")
    started_at = time.time()  # the rows' start times are the driver's wall clock
    started = time.perf_counter()
    run_tune(experiment, TuneOptions(storage=storage, live=False))
    wall = time.perf_counter() - started
    history = read_leaderboard(storage, name, kind="history").table.to_pylist()
    rows = read_leaderboard(storage, name).table.to_pylist()
    evaluation, cost = extra_work_seconds(history)
    loop = loop_seconds(history)
    return {
        **summary(wall, concurrency, trials, loop, evaluation, cost),
        **search_split(rows, started_at, wall, concurrency, work=loop + evaluation + cost),
        "workers": workers,
        "wandb": wandb,
        "statuses": sorted(r["status"] for r in rows),
        "trial_wall_s_median": statistics.median(r["wall_s"] for r in rows),
        "setup_s_median": statistics.median(r[names.SETUP_S] for r in history if r.get(names.SETUP_S) is not None),
        "epoch_s_median": statistics.median(r[names.EPOCH_S] for r in history),
    }


def search_split(rows: list[dict], started_at: float, wall: float, concurrency: int, *, work: float) -> dict:
    """Where a search's seconds went, from its rows' start and end times (the driver's, as Tune starts and
    completes each trial): until its first trial started (Ray Tune's start and its first trial actor's,
    paid once per search), and the overhead per trial from each trial's start to its end. Only for
    one trial at a time (concurrency 1): trials that overlap share seconds."""
    if concurrency != 1 or not rows or any(r.get("started_at") is None or r.get("wall_s") is None for r in rows):
        return {}
    first = min(r["started_at"].timestamp() for r in rows)
    in_trials = sum(r["wall_s"] for r in rows)
    return {
        "search_start_s": first - started_at,
        "between_and_after_trials_s": wall - (first - started_at) - in_trials,
        "in_trial_overhead_per_trial_s": (in_trials - work) / len(rows),
    }


def _raw_trainable(params: dict, *, experiment_json: str) -> None:
    """The floor's trial: the same loop, reporting to Tune with a checkpoint per epoch, nothing else."""
    import ray.tune

    config = resolve_trial(Experiment.model_validate_json(experiment_json), params)

    def report(metrics: dict, checkpoint: Path | None) -> None:
        saved = ray.tune.Checkpoint.from_directory(str(checkpoint)) if checkpoint else None
        ray.tune.report(metrics, checkpoint=saved)

    fit(config, report, RunContext())


def run_raw_tune(folder: Path, *, trials: int, concurrency: int, json_only: bool = False) -> dict:
    """`json_only`: Tune's CSV and TensorBoard loggers off, as raycls runs Tune (what that alone is worth)."""
    import ray.tune

    experiment = write_space(folder, name="raw", trials=trials, concurrency=concurrency, workers=1, wandb="disabled")
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(_raw_trainable, experiment_json=experiment.model_dump_json()), {"cpu": 1}
    )
    tuner = ray.tune.Tuner(
        trainable,
        param_space={"train.lr": ray.tune.loguniform(1e-3, 1e-2)},
        tune_config=ray.tune.TuneConfig(
            metric=names.VAL_ACC,
            mode="max",
            num_samples=trials,
            max_concurrent_trials=concurrency,
            reuse_actors=True,
        ),
        run_config=ray.tune.RunConfig(
            name="raw",
            storage_path=str(folder / "raw"),
            verbose=0,
            callbacks=[ray.tune.logger.JsonLoggerCallback()] if json_only else None,
        ),
    )
    # The floor is Tune as a user gets it: its default loggers (CSV, JSON, TensorBoard) on, whatever
    # raycls's own searches in this process set (raycls keeps JSON only: raycls.tune.driver).
    saved = os.environ.pop("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", None)
    if json_only:
        os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    try:
        started = time.perf_counter()
        grid = tuner.fit()
        wall = time.perf_counter() - started
    finally:
        os.environ.pop("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", None)
        if saved is not None:
            os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = saved
    history = [row for result in grid for row in result.metrics_dataframe.to_dict("records")]
    return {**summary(wall, concurrency, trials, loop_seconds(history)), "errors": grid.num_errors}


def run_optuna(folder: Path, trials: int) -> dict:
    experiment = write_space(folder, name="plain", trials=trials, concurrency=1, workers=1, wandb="disabled")
    loops: list[float] = []

    def objective(trial: optuna.Trial) -> float:
        config = resolve_trial(experiment, suggest(trial, experiment.space))
        history: list[dict] = []
        fit(config, lambda metrics, checkpoint: history.append(metrics), RunContext())
        loops.append(loop_seconds(history))
        return max(h[names.VAL_ACC] for h in history)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
    started = time.perf_counter()
    study.optimize(objective, n_trials=trials)
    return summary(time.perf_counter() - started, 1, trials, sum(loops))


def _bare_worker(loop_config: dict) -> None:
    """The floor's Train worker: the same loop under DDP, reporting to Ray Train, rank 0 keeping a history."""
    import ray.train
    import ray.train.torch

    from raycls.config.schema import TrialConfig

    context = ray.train.get_context()
    ctx = RunContext(
        device=ray.train.torch.get_device(), rank=context.get_world_rank(), world_size=context.get_world_size()
    )

    def report(metrics: dict, checkpoint: Path | None) -> None:
        if ctx.rank == 0:
            with open(loop_config["history_file"], "a") as handle:
                handle.write(json.dumps(metrics) + "\n")
        saved = ray.train.Checkpoint.from_directory(str(checkpoint)) if checkpoint else None
        ray.train.report(metrics, checkpoint=saved)

    fit(TrialConfig.from_json(loop_config["config_json"]), report, ctx)


def run_bare_torch_trainer(folder: Path, *, trials: int, raycls_poll: bool = False) -> dict:
    """`raycls_poll`: Ray Train's controller polls at raycls's interval, not Ray's default."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from raycls.train.ray_train import POLL_INTERVAL_ENV, fit_trainer

    experiment = write_space(folder, name="bare2w", trials=trials, concurrency=1, workers=2, wandb="disabled")
    rng = optuna.samplers.RandomSampler(seed=0)
    study = optuna.create_study(sampler=rng)
    history: list[dict] = []
    # Ray's default unless asked for raycls's, whatever this process's environment says.
    saved = os.environ.pop(POLL_INTERVAL_ENV, None)
    started = time.perf_counter()
    try:
        for index in range(trials):
            config = resolve_trial(experiment, suggest(study.ask(), experiment.space))
            history_file = folder / f"bare-{index}.jsonl"
            trainer = TorchTrainer(
                _bare_worker,
                train_loop_config={"config_json": config.to_json(), "history_file": str(history_file)},
                scaling_config=ray.train.ScalingConfig(num_workers=2, use_gpu=False),
                run_config=ray.train.RunConfig(name=f"bare-{index}", storage_path=str(folder / "bare")),
            )
            fit_trainer(trainer) if raycls_poll else trainer.fit()
            history += [json.loads(line) for line in history_file.read_text().splitlines()]
        wall = time.perf_counter() - started
    finally:  # the caller's environment back, also when a fit fails
        if saved is not None:
            os.environ[POLL_INTERVAL_ENV] = saved
    return summary(wall, 1, trials, loop_seconds(history))


# Each compared method: how it runs one round in `folder`, given the command line.
METHODS = {
    "raw_tune_reuse": lambda folder, args: run_raw_tune(folder, trials=args.trials, concurrency=args.concurrency),
    "raw_tune_reuse_json_only": lambda folder, args: run_raw_tune(
        folder, trials=args.trials, concurrency=args.concurrency, json_only=True
    ),
    "raycls_1worker": lambda folder, args: run_raycls(
        folder, name="raycls_1worker", trials=args.trials, concurrency=args.concurrency, workers=1, wandb="offline"
    ),
    "raycls_1worker_nowandb": lambda folder, args: run_raycls(
        folder,
        name="raycls_1worker_nowandb",
        trials=args.trials,
        concurrency=args.concurrency,
        workers=1,
        wandb="disabled",
    ),
    "bare_torch_trainer_2worker": lambda folder, args: run_bare_torch_trainer(folder, trials=args.trials_2w),
    "bare_torch_trainer_2worker_raycls_poll": lambda folder, args: run_bare_torch_trainer(
        folder, trials=args.trials_2w, raycls_poll=True
    ),
    "raycls_2worker": lambda folder, args: run_raycls(
        folder, name="raycls_2worker", trials=args.trials_2w, concurrency=1, workers=2, wandb="offline"
    ),
}
ONE_WORKER = ["raw_tune_reuse", "raycls_1worker", "raycls_1worker_nowandb", "raw_tune_reuse_json_only"]
TWO_WORKERS = ["bare_torch_trainer_2worker", "raycls_2worker", "bare_torch_trainer_2worker_raycls_poll"]


def run_method(key: str, folder: Path, args: argparse.Namespace) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    return METHODS[key](folder, args)


def rotated_rounds(methods: list[str], rounds: int, folder: Path, args: argparse.Namespace) -> dict[str, dict]:
    """Each method `rounds` times, the order rotating every round: whichever runs first in the process also
    pays the process's first-search costs (Tune's and the trainable's lazy imports in the driver), so no
    method always carries them. Each method's median round is compared; every round is kept in the JSON."""
    runs: dict[str, list[dict]] = {key: [] for key in methods}
    for index in range(rounds):
        shift = index % len(methods)
        for key in methods[shift:] + methods[:shift]:
            runs[key].append(run_method(key, folder / f"r{index}", args))
            print(f"round {index} {key}: overhead {runs[key][-1]['overhead_per_trial_s']:.2f} s/trial", flush=True)
    return {key: median_run(done) for key, done in runs.items()}


def median_run(runs: list[dict]) -> dict:
    """The median round's details, its overhead the median of every round's (the mean of the middle two)."""
    overheads = [r["overhead_per_trial_s"] for r in runs]
    middle = sorted(runs, key=lambda r: r["overhead_per_trial_s"])[(len(runs) - 1) // 2]
    return {**middle, "overhead_per_trial_s": statistics.median(overheads), "rounds_overhead_per_trial_s": overheads}


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """None where either side was not run (--skip-1w / --skip-2w) or the floor is not positive."""
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--trials-2w", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="1-worker rounds; medians are compared.")
    parser.add_argument("--rounds-2w", type=int, default=2, help="2-worker rounds; medians are compared.")
    parser.add_argument("--skip-2w", action="store_true", help="Only the 1-worker comparison.")
    parser.add_argument("--skip-1w", action="store_true", help="Only the 2-worker comparison.")
    args = parser.parse_args()

    import ray

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        ray_started = time.perf_counter()
        from raycls.tune.cluster import init_ray

        init_ray(None, num_cpus=8)
        ray_init_s = time.perf_counter() - ray_started
        if not args.skip_1w:
            results["optuna_inprocess"] = run_optuna(folder, args.trials)
            results.update(rotated_rounds(ONE_WORKER, args.rounds, folder / "w1", args))
        if not args.skip_2w:
            results.update(rotated_rounds(TWO_WORKERS, args.rounds_2w, folder / "w2", args))
        ray.shutdown()
    for key, value in results.items():
        print(f"{key}: overhead {value['overhead_per_trial_s']:.2f} s/trial  ({value})")

    def detail(key: str, field: str) -> float | None:
        return results.get(key, {}).get(field)

    def overhead(key: str) -> float | None:
        return detail(key, "overhead_per_trial_s")

    one_ratio = ratio(overhead("raycls_1worker"), overhead("raw_tune_reuse"))
    two_ratio = ratio(overhead("raycls_2worker"), overhead("bare_torch_trainer_2worker"))
    path = write_result(
        "trial_overhead",
        {
            "claim": "raycls's overhead per trial <= 1.0x Ray's floor measured beside it (raw Tune with actor "
            "reuse for 1-worker trials; a bare TorchTrainer.fit for 2-worker trials)",
            "raycls_1worker_overhead_s": overhead("raycls_1worker"),
            "raycls_1worker_nowandb_overhead_s": overhead("raycls_1worker_nowandb"),
            "raw_tune_reuse_overhead_s": overhead("raw_tune_reuse"),
            # Tune with raycls's logger choice (JSON only): the part of the ratio that choice explains.
            "raw_tune_reuse_json_only_overhead_s": overhead("raw_tune_reuse_json_only"),
            "ratio_1worker_vs_raw_tune_json_only": ratio(
                overhead("raycls_1worker"), overhead("raw_tune_reuse_json_only")
            ),
            "optuna_inprocess_overhead_s": overhead("optuna_inprocess"),
            "raycls_1worker_evaluation_per_trial_s": detail("raycls_1worker", "evaluation_per_trial_s"),
            "raycls_1worker_cost_per_trial_s": detail("raycls_1worker", "cost_per_trial_s"),
            "ratio_1worker_vs_raw_tune": one_ratio,
            "raycls_2worker_overhead_s": overhead("raycls_2worker"),
            "bare_torch_trainer_2worker_overhead_s": overhead("bare_torch_trainer_2worker"),
            "ratio_2worker_vs_bare_torch_trainer": two_ratio,
            # Where raycls's 2-worker seconds went: once per search until its first trial started (Tune's start
            # and its trial actor's), then per trial from its start to its end (its Ray Train run, reports,
            # evaluation and row), beside the floor's whole fit.
            "raycls_2worker_search_start_s": detail("raycls_2worker", "search_start_s"),
            "raycls_2worker_in_trial_overhead_s": detail("raycls_2worker", "in_trial_overhead_per_trial_s"),
            "ratio_2worker_in_trial_vs_bare_torch_trainer": ratio(
                detail("raycls_2worker", "in_trial_overhead_per_trial_s"), overhead("bare_torch_trainer_2worker")
            ),
            # The floor with raycls's Train poll interval: the part of the ratio that choice explains.
            "bare_torch_trainer_2worker_raycls_poll_overhead_s": overhead("bare_torch_trainer_2worker_raycls_poll"),
            "ratio_2worker_vs_bare_torch_trainer_raycls_poll": ratio(
                overhead("raycls_2worker"), overhead("bare_torch_trainer_2worker_raycls_poll")
            ),
            "ray_init_s": ray_init_s,
            "details": results,
            "goal_ratio": 1.0,
            "meets_goal_1worker": one_ratio is not None and one_ratio <= 1.0,
            "meets_goal_2worker": two_ratio is not None and two_ratio <= 1.0,
        },
    )
    print(f"1 worker: {one_ratio}; 2 workers: {two_ratio} -> {path}")


if __name__ == "__main__":
    main()
