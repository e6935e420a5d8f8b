"""`raycls tune`: assemble the Tuner (trainable, Optuna search, scheduler, storage, callbacks) and run it.

    Tuner(trainable, TuneConfig(OptunaSearch(define-by-run space), ASHA), RunConfig(storage, callbacks))

One Tune trial = one TrialConfig (the base config with the sampled values applied; `--set` wins over both).
Everything about a run lives under `<storage>/<experiment>/`: Tune's state (for `--resume`), the Optuna
journal, `leaderboard/`, `history/`, `wandb/` and, for multi-worker trials, `train_runs/`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import ray
import ray.tune

from raycls.config.experiment import Experiment
from raycls.errors import RayclsError
from raycls.results.leaderboard import ReadResult, filesystem, read_leaderboard
from raycls.results.references import resolve_references
from raycls.results.wandb_log import resolve_mode
from raycls.train.ray_train import tune_trainable
from raycls.tune.callbacks import LiveTable, TrialLedger
from raycls.tune.cluster import (
    cluster_nodes,
    init_ray,
    per_trial_request,
    preflight,
    shared_storage_from_env,
    trial_bundle,
)
from raycls.tune.schedulers import create_scheduler
from raycls.tune.searcher import create_searcher


@dataclass(frozen=True)
class TuneOptions:
    storage: str
    address: str | None = None
    resume: bool = False
    wandb_mode: str | None = None  # overrides the YAML's wandb.mode
    num_cpus: int | None = None  # logical CPUs of a local Ray (default: enough for the trials)
    verbose: bool = False
    live: bool = True
    # A plain --storage path that every node mounts at the same place (NFS, EFS); None: $RAYCLS_SHARED_STORAGE.
    shared_storage: bool | None = None


@dataclass(frozen=True)
class TuneOutcome:
    experiment_dir: str
    leaderboard: ReadResult
    trials: int
    errors: int


def experiment_dir(storage: str, name: str) -> str:
    return f"{storage.rstrip('/')}/{name}"


def local_state_dir(storage: str, name: str) -> Path:
    """Where files that need a local filesystem go (Optuna journal, offline W&B runs)."""
    if "://" in storage:
        return Path(os.environ.get("RAYCLS_CACHE", Path.home() / ".cache" / "raycls")) / "experiments" / name
    return Path(experiment_dir(storage, name))


def run_tune(experiment: Experiment, options: TuneOptions) -> TuneOutcome:
    # Tune warns whenever checkpoints force experiment snapshots (every epoch here, by design: a trial's
    # best-k checkpoints must stay consistent with the experiment state that --resume reads).
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    storage = options.storage if "://" in options.storage else str(Path(options.storage).expanduser().absolute())
    filesystem(storage)  # fail early, with a clear message, on a storage we cannot reach
    experiment = resolve_references(experiment, storage)  # teacher: {from: EXP, pick: best} -> a checkpoint path
    resources = experiment.experiment.resources
    concurrency_cpus = per_trial_request(resources)["CPU"] * (experiment.experiment.concurrency or 1) + 1
    init_ray(options.address, needed_cpus=concurrency_cpus, num_cpus=options.num_cpus, verbose=options.verbose)
    shared = shared_storage_from_env() if options.shared_storage is None else options.shared_storage
    # Refuse what Ray would only punish later (node-local storage on several nodes, workers no node holds).
    plan = preflight(resources, storage, cluster_nodes(), concurrency=experiment.experiment.concurrency,
                     shared_storage=shared)  # fmt: skip
    concurrency = min(plan.concurrency, experiment.experiment.trials)

    path = experiment_dir(storage, experiment.name)
    state = local_state_dir(storage, experiment.name)
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(tune_trainable, experiment_json=experiment.model_dump_json(), storage=storage),
        trial_bundle(resources, pin_on_demand=plan.pin_on_demand),
    )
    if options.resume and ray.tune.Tuner.can_restore(path):
        # Tune restores its callbacks, searcher and scheduler from the experiment folder; finished trials
        # are not rerun, and the ledger skips rows it has already written.
        tuner = ray.tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=False)
    else:
        if options.resume:
            print(f"nothing to resume at {path}: starting the experiment")
        tuner = _new_tuner(experiment, options, storage, state, trainable, concurrency)
    grid = tuner.fit()
    board = read_leaderboard(storage, experiment.name)
    return TuneOutcome(path, board, len(grid), sum(1 for r in grid if r.error is not None))


def _new_tuner(experiment: Experiment, options: TuneOptions, storage: str, state: Path, trainable, concurrency: int):
    section = experiment.experiment
    warm = experiment.search.warm_start
    warm_dir = local_state_dir(storage, warm) if warm else None
    if warm_dir is not None and not (warm_dir / "optuna.journal").is_file():
        raise RayclsError(f"search.warm_start: no Optuna study for experiment {warm!r} at {warm_dir}/optuna.journal")
    wandb_mode = resolve_mode(options.wandb_mode or experiment.wandb.mode)
    callbacks = [TrialLedger(experiment, storage, state, wandb_mode)]
    if options.live:
        callbacks.append(LiveTable(experiment.name, section.metric, section.mode, section.trials))
    return ray.tune.Tuner(
        trainable,
        tune_config=ray.tune.TuneConfig(
            metric=section.metric,
            mode=section.mode,
            search_alg=create_searcher(experiment, state, warm_dir),
            scheduler=create_scheduler(experiment),
            num_samples=section.trials,
            max_concurrent_trials=concurrency,
            # A trial actor that ends is reused for the next trial: no new Python process, and torch,
            # sklearn and raycls are imported once per actor instead of once per trial (seconds each).
            reuse_actors=True,
        ),
        run_config=ray.tune.RunConfig(
            name=experiment.name,
            storage_path=storage,
            callbacks=callbacks,
            failure_config=ray.tune.FailureConfig(max_failures=section.max_failures),
            checkpoint_config=ray.tune.CheckpointConfig(
                num_to_keep=section.keep_checkpoints,
                checkpoint_score_attribute=section.metric,
                checkpoint_score_order=section.mode,
            ),
            verbose=0 if options.live else 1,
        ),
    )
