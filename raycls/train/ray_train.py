"""The bridge between the plain-PyTorch loop and Ray: the Tune trainable and the Ray Train launch.

This module and `raycls.tune` are the only places that import Ray.

A Tune trial runs `tune_trainable`. One-worker trials run the loop directly in the trial's actor: starting a
Ray Train run (controller actor, worker group, process group) costs seconds per trial that a one-process
trial gains nothing from (benchmarks/trial_overhead.py measures both). Multi-worker trials always launch a
`TorchTrainer` (Train V2) whose workers run the loop under DDP; `TuneReportCallback` forwards rank 0's
reports (the loop all-reduces validation metrics first) to Tune, so ASHA sees every epoch either way.
"""

from __future__ import annotations

from collections.abc import Callable
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import ray
import ray.train
import ray.tune
import torch

from raycls.config.experiment import Experiment, Resources
from raycls.config.load import resolve_trial
from raycls.config.schema import TrialConfig
from raycls.evaluate import names
from raycls.evaluate.summary import Summary, summarize
from raycls.files import replace_dir, write_json_atomic
from raycls.train.local import CONFIG_FILE, METRICS_FILE
from raycls.train.loop import FAST_DEV_BATCHES, Metrics, RunContext, fit

TRAIN_RUNS_DIR = "train_runs"
# Reported with every epoch: how many times this trial has started again from one of its checkpoints (a
# Ray Train worker-group restart after a lost node, a Tune retry, a resumed driver). The count travels in
# the checkpoint itself, so every kind of restart is seen, including Ray Train's own, which Tune's
# `trial.num_failures` does not count.
RESTARTS = names.RESTARTS
RESTARTS_FILE = "raycls_restarts.json"
NODE_ID = names.NODE_ID
# A multi-worker trial whose Ray Train run gave up (after its own max_failures restarts) leaves this file in
# the run's folder: Tune's retry of the trial then fails at once instead of restarting the worker group
# max_failures times more (retries would multiply: (max_failures + 1) ** 2 attempts).
FAILED_FILE = "raycls_failed.txt"


def trial_extras(config: TrialConfig, device: torch.device) -> dict[str, Any]:
    """Reported with every epoch, so the driver can tell finished trials from stopped ones."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {names.MAX_EPOCHS: config.total_epochs, names.DEVICE: name, NODE_ID: ray.get_runtime_context().get_node_id()}


@contextmanager
def restored(checkpoint: ray.train.Checkpoint | None) -> Iterator[Path | None]:
    """A local copy of the checkpoint to resume from (None on a fresh start)."""
    if checkpoint is None:
        yield None
        return
    with checkpoint.as_directory() as folder:
        yield Path(folder)


def restarts_of(resume_from: Path | None) -> int:
    """0 on a fresh start; one more than the checkpoint's own count when starting from a checkpoint."""
    if resume_from is None:
        return 0
    try:
        return int(json.loads((resume_from / RESTARTS_FILE).read_text())[RESTARTS]) + 1
    except (OSError, ValueError, KeyError, TypeError):
        return 1  # a checkpoint written before raycls counted restarts


def mark_restarts(checkpoint: Path | None, restarts: int) -> None:
    if checkpoint is not None:
        (checkpoint / RESTARTS_FILE).write_text(json.dumps({RESTARTS: restarts}))


# ------------------------------------------------------------------------------------------- Tune trial
def tune_trainable(params: dict[str, Any], *, experiment_json: str, storage: str) -> None:
    """One Tune trial: the experiment's base config with this trial's sampled `params` applied."""
    experiment = Experiment.model_validate_json(experiment_json)
    trial_id = ray.tune.get_context().get_trial_id()
    if _has_row(storage, experiment.name, trial_id):
        # A resumed driver restores trials that ended after Tune's last snapshot as unfinished: their row
        # is written, so they are not trained again (nor counted twice).
        return
    config = resolve_trial(experiment, params)
    limit = FAST_DEV_BATCHES if experiment.experiment.fast_dev_run else None
    if experiment.experiment.resources.workers == 1:
        _run_in_trial_actor(config, experiment.experiment.resources, limit_batches=limit)
    else:
        _run_torch_trainer(config, experiment, storage, name=f"train-{trial_id}", limit_batches=limit)


def _has_row(storage: str, experiment: str, trial_id: str) -> bool:
    from raycls.results.leaderboard import LEADERBOARD_DIR, filesystem

    fs, root = filesystem(storage)
    return fs.get_file_info(f"{root}/{experiment}/{LEADERBOARD_DIR}/{trial_id}.parquet").is_file


def _run_in_trial_actor(config: TrialConfig, resources: Resources, *, limit_batches: int | None = None) -> None:
    device = torch.device("cuda" if resources.gpu and torch.cuda.is_available() else "cpu")
    extras = trial_extras(config, device)

    with restored(ray.tune.get_checkpoint()) as resume_from:
        extras[RESTARTS] = restarts_of(resume_from)

        def report(metrics: Metrics, checkpoint: Path | None) -> None:
            mark_restarts(checkpoint, extras[RESTARTS])
            saved = ray.tune.Checkpoint.from_directory(str(checkpoint)) if checkpoint else None
            ray.tune.report({**metrics, **extras}, checkpoint=saved)

        fit(config, report, RunContext(device=device, resume_from=resume_from, limit_batches=limit_batches))


def _run_torch_trainer(
    config: TrialConfig, experiment: Experiment, storage: str, *, name: str, limit_batches: int | None = None
) -> None:
    from ray.tune.integration.ray_train import TuneReportCallback

    from raycls.results.leaderboard import filesystem

    runs = f"{storage.rstrip('/')}/{experiment.name}/{TRAIN_RUNS_DIR}"
    fs, root = filesystem(f"{runs}/{name}")
    failed = f"{root}/{FAILED_FILE}"
    if fs.get_file_info(failed).is_file:
        with fs.open_input_stream(failed) as stream:
            message = stream.read().decode(errors="replace")
        raise RuntimeError(f"the Ray Train run already failed after its retries (max_failures): {message}")
    trainer = _torch_trainer(
        config,
        experiment.experiment.resources,
        storage_path=runs,
        name=name,  # deterministic (the Tune trial id, no timestamp): a retried trial restores this Train run
        callbacks=[TuneReportCallback()],
        keep=experiment.experiment.keep_checkpoints,
        metric=experiment.experiment.metric,
        mode=experiment.experiment.mode,
        # Ray Train restarts the worker group from the run's last checkpoint (a lost node, a crashed worker)
        # inside this trial; Tune's own retries then only cover a lost coordinator.
        max_failures=experiment.experiment.max_failures,
        limit_batches=limit_batches,
    )
    try:
        trainer.fit()
    except ray.train.TrainingFailedError as err:
        if _raised_by_training(err):  # not a lost process or node (a killed driver takes its workers along)
            fs.create_dir(root, recursive=True)
            with fs.open_output_stream(failed) as stream:
                stream.write(_last_line(err).encode())
        raise


# -------------------------------------------------------------------------------------- Ray Train run
def train_worker(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker. TorchTrainer has already initialised the process group."""
    config = TrialConfig.from_json(loop_config["config_json"])
    context = ray.train.get_context()
    device = ray.train.torch.get_device()
    extras = trial_extras(config, device)

    history_file = loop_config.get("history_file")

    def report(metrics: Metrics, checkpoint: Path | None) -> None:
        # Every rank must call report (it is a barrier); rank 0 alone passes a checkpoint.
        mark_restarts(checkpoint, extras[RESTARTS])
        saved = ray.train.Checkpoint.from_directory(str(checkpoint)) if checkpoint else None
        if history_file and context.get_world_rank() == 0:
            # `raycls train` shows every epoch; Train V2's Result keeps only the last report's metrics.
            with open(history_file, "a") as handle:
                handle.write(json.dumps({**metrics, **extras}) + "\n")
        ray.train.report({**metrics, **extras}, checkpoint=saved)

    ctx = RunContext(device=device, rank=context.get_world_rank(), world_size=context.get_world_size(),
                     limit_batches=loop_config.get("limit_batches"))  # fmt: skip
    with restored(ray.train.get_checkpoint()) as resume_from:
        ctx.resume_from = resume_from
        extras[RESTARTS] = restarts_of(resume_from)
        fit(config, report, ctx)


def _torch_trainer(
    config: TrialConfig,
    resources: Resources,
    *,
    storage_path: str,
    name: str,
    callbacks: list | None = None,
    keep: int = 1,
    metric: str = names.VAL_ACC,
    mode: str = "max",
    limit_batches: int | None = None,
    history_file: str | None = None,
    max_failures: int = 0,
):
    from ray.train.torch import TorchTrainer

    per_worker = {"CPU": resources.cpus_per_worker, **({"GPU": resources.gpus_per_worker} if resources.gpu else {})}
    return TorchTrainer(
        train_worker,
        train_loop_config={"config_json": config.to_json(), "limit_batches": limit_batches, "history_file": history_file},
        scaling_config=ray.train.ScalingConfig(
            num_workers=resources.workers, use_gpu=resources.gpu, resources_per_worker=per_worker
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            callbacks=callbacks or [],
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=keep, checkpoint_score_attribute=metric, checkpoint_score_order=mode
            ),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
        ),
    )


def train_with_ray(
    config: TrialConfig,
    out: Path,
    *,
    resources: Resources,
    metric: str,
    mode: str,
    fast_dev_run: bool = False,
    on_epoch: Callable[[Metrics], None] | None = None,
) -> Summary:
    """`raycls train` without --no-ray: one Ray Train run (DDP over `resources.workers`), no Tune.
    Ray must be initialised by the caller (the CLI, through raycls.tune.cluster.init_ray)."""
    out = out.absolute()
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / CONFIG_FILE, config.to_dict())
    history_file = out / "history.jsonl"
    history_file.unlink(missing_ok=True)
    trainer = _torch_trainer(config, resources, storage_path=str(out), name="ray_train", metric=metric, mode=mode,
                             limit_batches=FAST_DEV_BATCHES if fast_dev_run else None, history_file=str(history_file))  # fmt: skip
    result = trainer.fit()
    if result.error:
        raise result.error
    # Written by rank 0 when it shares this filesystem (a local Ray); else the last report is all we have.
    lines = history_file.read_text().splitlines() if history_file.is_file() else []
    history = [json.loads(line) for line in lines] or [dict(result.metrics)]
    history = [{k: v for k, v in row.items() if isinstance(v, (int, float))} for row in history]
    for metrics in history:
        if on_epoch is not None:
            on_epoch(metrics)
    summary = summarize(history, metric, mode)  # type: ignore[arg-type]
    best = result.get_best_checkpoint(metric, mode) or result.checkpoint
    if best is not None:
        with best.as_directory() as folder:
            replace_dir(Path(folder), out / "checkpoints" / "best")
    if result.checkpoint is not None:
        with result.checkpoint.as_directory() as folder:
            replace_dir(Path(folder), out / "checkpoints" / "last")
    write_json_atomic(out / METRICS_FILE, {**summary.to_dict(), "history": history})
    return summary


def _raised_by_training(error: BaseException) -> bool:
    """Whether the training code itself raised on the workers (NaN loss, missing data), as opposed to a
    worker process or node that went away: only the first kind fails again the same way when retried."""
    from ray.exceptions import RayActorError
    from ray.train.v2.api.exceptions import WorkerGroupError

    try:
        from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError, WorkerHealthCheckTimeoutError

        lost: tuple[type, ...] = (RayActorError, WorkerHealthCheckFailedError, WorkerHealthCheckTimeoutError)
    except ImportError:  # a Ray without these internals
        lost = (RayActorError,)
    failures = getattr(error, "worker_failures", None) or {}
    return isinstance(error, WorkerGroupError) and bool(failures) and not any(isinstance(e, lost) for e in failures.values())


def _last_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    informative = [line for line in lines if "Error" in line or "Exception" in line]
    return (informative[-1] if informative else (lines[-1] if lines else type(error).__name__))[:2000]


__all__ = ["NODE_ID", "RESTARTS", "TRAIN_RUNS_DIR", "train_with_ray", "tune_trainable"]
