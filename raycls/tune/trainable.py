"""The Tune trainable: what one trial of `raycls tune` runs, in its Tune trial actor.

One-worker trials run the loop directly in the trial's actor: starting a Ray Train run (controller actor,
worker group, process group) costs seconds per trial that a one-process trial gains nothing from
(benchmarks/trial_overhead.py measures both). Multi-worker trials launch a `TorchTrainer` (Train V2, built
by `raycls.train.ray_train.torch_trainer`) whose workers run the loop under DDP; `TuneReportCallback`
forwards rank 0's reports (the loop all-reduces validation metrics first) to Tune, so ASHA sees every epoch
either way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.tune
import torch

from raycls import names
from raycls.config.experiment import Experiment, Resources
from raycls.config.load import resolve_trial
from raycls.config.schema import FAST_DEV_BATCHES, TrialConfig
from raycls.data.stream import device_bytes
from raycls.errors import last_error_line
from raycls.storage import ExperimentPaths, filesystem
from raycls.train.chain import fit
from raycls.train.loop import RunContext
from raycls.train.ray_data import local_source, resolve_data, trial_datasets
from raycls.train.ray_train import (
    RESTARTS,
    RayReporter,
    fit_trainer,
    restarts_of,
    restored,
    torch_trainer,
    trial_extras,
)

# A multi-worker trial whose Ray Train run gave up (after its own max_failures restarts) leaves this file in
# the run's folder: Tune's retry of the trial then fails at once instead of restarting the worker group
# max_failures times more (retries would multiply: (max_failures + 1) ** 2 attempts).
FAILED_FILE = "raycls_failed.txt"

# Ray's TuneReportCallback forwards a Train run's reports to the trial through a queue actor that the trial's
# Tune session creates, one per trial: a new process started beside the Train controller and workers at
# every trial's start (measured: the first report came ~1 s later on 2 cores). A reused trial actor runs its
# trials one after the other, so it keeps one queue for all of them (`_reuse_report_queue`).
_report_queue: Any = None


def tune_trainable(params: dict[str, Any], *, experiment_json: str, storage: str) -> None:
    """One Tune trial: the experiment's base config with this trial's sampled `params` applied."""
    experiment = Experiment.model_validate_json(experiment_json)
    context = ray.tune.get_context()
    trial_id = context.get_trial_id()
    paths = ExperimentPaths(storage, experiment.name)
    if paths.exists(paths.row(trial_id)):
        # A resumed driver restores trials that ended after Tune's last snapshot as unfinished: their row
        # is written, so they are not trained again (nor counted twice).
        return
    # Resolved here, once per trial (--set is already in the experiment); the driver's row reads this file.
    # PBT's bookkeeping keys (its lineage) ride in the Tune config; the trial config is the rest.
    config = resolve_trial(experiment, names.sampled_values(params))
    paths.write_text(paths.trial_config(Path(context.get_trial_dir()).name), json.dumps(config.to_dict(), indent=2))
    limit = FAST_DEV_BATCHES if experiment.experiment.fast_dev_run else None
    eval_dir = paths.eval_dir(trial_id)  # evaluated there once it completes (eval.on), by its own workers
    if experiment.experiment.resources.workers == 1:
        ranking = (experiment.experiment.metric, experiment.experiment.mode)
        _run_in_trial_actor(
            config, experiment.experiment.resources, limit_batches=limit, eval_dir=eval_dir, ranking=ranking
        )
    else:
        _run_torch_trainer(config, experiment, paths, name=f"train-{trial_id}", limit_batches=limit, eval_dir=eval_dir)


def _run_in_trial_actor(
    config: TrialConfig,
    resources: Resources,
    *,
    limit_batches: int | None = None,
    eval_dir: str | None = None,
    ranking: tuple[str, str] | None = None,
) -> None:
    device = torch.device("cuda" if resources.gpu and torch.cuda.is_available() else "cpu")
    extras = trial_extras(config, device)
    config = resolve_data(config, device_memory=device_bytes(device))
    streams = (
        local_source(trial_datasets(config, limit_batches=limit_batches)) if config.data.loader == "stream" else None
    )

    with restored(ray.tune.get_checkpoint()) as resume_from:
        extras[RESTARTS] = restarts_of(resume_from)
        reporter = RayReporter(ray.tune.report, ray.tune.Checkpoint, extras, ranking=ranking)
        fit(
            config,
            reporter,
            RunContext(
                device=device, resume_from=resume_from, limit_batches=limit_batches, eval_dir=eval_dir, streams=streams
            ),
        )


def _run_torch_trainer(
    config: TrialConfig,
    experiment: Experiment,
    paths: ExperimentPaths,
    *,
    name: str,
    limit_batches: int | None = None,
    eval_dir: str | None = None,
) -> None:
    from ray.tune.integration.ray_train import TuneReportCallback

    runs = paths.train_runs()
    fs, root = filesystem(f"{runs}/{name}")
    failed = f"{root}/{FAILED_FILE}"
    if fs.get_file_info(failed).is_file:
        with fs.open_input_stream(failed) as stream:
            message = stream.read().decode(errors="replace")
        raise RuntimeError(f"the Ray Train run already failed after its retries (max_failures): {message}")
    _reuse_report_queue()
    trainer = torch_trainer(
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
        eval_dir=eval_dir,
    )
    try:
        fit_trainer(trainer)
    except ray.train.TrainingFailedError as err:
        if _raised_by_training(err):  # not a lost process or node (a killed driver takes its workers along)
            fs.create_dir(root, recursive=True)
            with fs.open_output_stream(failed) as stream:
                stream.write(_last_line(err).encode())
        raise


def _reuse_report_queue() -> None:
    """Hands this trial's Tune session the queue an earlier trial of this actor made (see `_report_queue`),
    emptied first; the first trial makes it. The previous trial's Train run had ended (its `fit` returned)
    before this one began, so nothing writes to it any more. A Ray whose session keeps the queue elsewhere
    makes one per trial, as Ray does."""
    global _report_queue
    from ray.train._internal.session import get_session
    from ray.util.queue import Empty

    session = get_session()
    if session is None or not hasattr(session, "_inter_actor_queue"):
        return
    if _report_queue is not None:
        try:
            while True:
                _report_queue.get_nowait()
        except Empty:
            session._inter_actor_queue = _report_queue
            return
        except Exception:  # its actor is gone (its node was lost): make a new one, as Ray would
            pass
    _report_queue = session._get_or_create_inter_actor_queue()


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
    return (
        isinstance(error, WorkerGroupError)
        and bool(failures)
        and not any(isinstance(e, lost) for e in failures.values())
    )


def _last_line(error: BaseException) -> str:
    text = str(error)
    return last_error_line(text) if text.strip() else type(error).__name__
