"""The plain-PyTorch loop under Ray Train: the per-worker function, the TorchTrainer that runs it, and
`raycls train` without --no-ray (one Ray Train run, no Tune).

This module, its Ray Data side (`raycls.train.ray_data`, for streamed datasets) and `raycls.tune` are the
only places that import Ray; nothing here imports `ray.tune` (the Tune trainable, which launches
`torch_trainer` for multi-worker trials, is `raycls.tune.trainable`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch

from raycls import names
from raycls.config.experiment import Resources
from raycls.config.schema import FAST_DEV_BATCHES, TrialConfig
from raycls.evaluate.summary import Summary, summarize
from raycls.files import replace_dir, write_json_atomic
from raycls.ranking import Ranking, checkpoint_attribute
from raycls.storage import BEST, LAST, RunPaths
from raycls.train.chain import fit
from raycls.train.loop import Metrics, RunContext
from raycls.train.ray_data import ShardConfig, resolve_data, shard_source, trial_datasets

# Reported with every epoch: how many times this trial has started again from one of its checkpoints (a
# Ray Train worker-group restart after a lost node, a Tune retry, a resumed driver). The count travels in
# the checkpoint itself, so every kind of restart is seen, including Ray Train's own, which Tune's
# `trial.num_failures` does not count.
RESTARTS = names.RESTARTS
RESTARTS_FILE = "raycls_restarts.json"
NODE_ID = names.NODE_ID

# How often Ray Train's controller polls its workers (Ray's default: every 2 s). It learns of each report,
# checkpoint and the end of training only when it polls, so every Train run lost up to 2 s at each step:
# measured, a 2-worker run of two epochs took 16 s at 2 s and 11 s at 0.5 s (0.2 s: ~0.5 s less again, at
# 4x the polls). A missed poll is not an error (Ray gives up on a worker after its own 10-min timeout).
# Set the variable yourself to choose another; benchmarks/trial_overhead.py measures both beside raycls.
POLL_INTERVAL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
POLL_INTERVAL_S = "0.5"


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


@dataclass
class RayReporter:
    """The loop's Reporter under Ray: each epoch's metrics plus the trial's extras, and rank 0's checkpoint,
    through `report` (ray.train.report on a Train worker, ray.tune.report in a one-worker Tune trial).
    Every rank must call it: under Ray Train, report is a barrier."""

    report: Callable[..., None]
    checkpoint_class: type
    extras: dict[str, Any]
    # `raycls train` shows every epoch; Train V2's Result keeps only the last report's metrics.
    history_file: str | None = None
    rank: int = 0
    # (metric, mode) of the experiment: a chain's epochs also report names.CHAIN_SCORE, which checkpoints
    # are kept by (a later stage's above an earlier stage's).
    ranking: tuple[str, str] | None = None

    def __call__(self, metrics: Metrics, checkpoint: Path | None) -> None:
        mark_restarts(checkpoint, self.extras[RESTARTS])
        if self.ranking is not None and names.STAGE_INDEX in metrics:
            metrics = {**metrics, names.CHAIN_SCORE: Ranking.of(*self.ranking).checkpoint_key(metrics)}
        saved = self.checkpoint_class.from_directory(str(checkpoint)) if checkpoint else None
        if self.history_file and self.rank == 0:
            with open(self.history_file, "a") as handle:
                handle.write(json.dumps({**metrics, **self.extras}) + "\n")
        self.report({**metrics, **self.extras}, checkpoint=saved)


def checkpoint_score(config: TrialConfig, metric: str) -> str:
    return checkpoint_attribute(metric, len(config.stages))


# -------------------------------------------------------------------------------------- Ray Train run
def train_worker(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker. TorchTrainer has already initialised the process group."""
    config = TrialConfig.from_json(loop_config["config_json"])
    context = ray.train.get_context()
    device = ray.train.torch.get_device()
    ctx = RunContext(
        device=device,
        rank=context.get_world_rank(),
        world_size=context.get_world_size(),
        limit_batches=loop_config.get("limit_batches"),
        eval_dir=loop_config.get("eval_dir"),
        streams=shard_source() if config.data.loader == "stream" else None,
    )
    with restored(ray.train.get_checkpoint()) as resume_from:
        ctx.resume_from = resume_from
        extras = {**trial_extras(config, device), RESTARTS: restarts_of(resume_from)}
        reporter = RayReporter(
            ray.train.report,
            ray.train.Checkpoint,
            extras,
            history_file=loop_config.get("history_file"),
            rank=ctx.rank,
            ranking=tuple(loop_config["ranking"]),
        )
        fit(config, reporter, ctx)


def torch_trainer(
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
    eval_dir: str | None = None,
):
    from ray.train.torch import TorchTrainer

    per_worker = {"CPU": resources.cpus_per_worker, **({"GPU": resources.gpus_per_worker} if resources.gpu else {})}
    config = resolve_data(config, device_memory=launch_device_memory(resources))
    return TorchTrainer(
        train_worker,
        datasets=trial_datasets(config, world_size=resources.workers, limit_batches=limit_batches) or None,
        dataset_config=ShardConfig(),
        train_loop_config={
            "config_json": config.to_json(),
            "limit_batches": limit_batches,
            "history_file": history_file,
            "eval_dir": eval_dir,
            "ranking": (metric, mode),
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=resources.workers, use_gpu=resources.gpu, resources_per_worker=per_worker
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            callbacks=callbacks or [],
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=keep,
                checkpoint_score_attribute=checkpoint_score(config, metric),
                checkpoint_score_order=mode,
            ),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
        ),
    )


def fit_trainer(trainer: Any) -> Any:
    """`trainer.fit()` with raycls's controller poll interval, unless the user set one. The controller
    reads the variable from this process when `fit` starts it (Ray propagates it), so it is set only
    around the call: other Train runs in this process (yours, a benchmark's floor) keep Ray's default."""
    if POLL_INTERVAL_ENV in os.environ:
        return trainer.fit()
    os.environ[POLL_INTERVAL_ENV] = POLL_INTERVAL_S
    try:
        return trainer.fit()
    finally:
        os.environ.pop(POLL_INTERVAL_ENV, None)


def launch_device_memory(resources: Resources) -> int | None:
    """The GPU memory `data.loader: auto` budgets by, as seen where the trial is launched (its workers' GPUs
    are taken to be like the first GPU visible here; none visible: host memory decides alone)."""
    if not resources.gpu or not torch.cuda.is_available():
        return None
    return int(torch.cuda.get_device_properties(0).total_memory)


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
    Ray must be initialised by the caller (the CLI, through raycls.tune.cluster.init_ray). A fast dev run is
    the config's and the loop's, as in run_local."""
    if fast_dev_run:
        config = config.fast_dev_run()
    out = out.absolute()
    out.mkdir(parents=True, exist_ok=True)
    run = RunPaths(out)
    write_json_atomic(run.config, config.to_dict())
    history_file = out / "history.jsonl"
    history_file.unlink(missing_ok=True)
    trainer = torch_trainer(
        config,
        resources,
        storage_path=str(out),
        name="ray_train",
        metric=metric,
        mode=mode,
        limit_batches=FAST_DEV_BATCHES if fast_dev_run else None,
        history_file=str(history_file),
        eval_dir=str(run.eval_dir),
    )
    result = fit_trainer(trainer)
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
    best = result.get_best_checkpoint(checkpoint_score(config, metric), mode) or result.checkpoint
    if best is not None:
        with best.as_directory() as folder:
            replace_dir(Path(folder), run.checkpoint(BEST))
    if result.checkpoint is not None:
        with result.checkpoint.as_directory() as folder:
            replace_dir(Path(folder), run.checkpoint(LAST))
    write_json_atomic(run.metrics, {**summary.to_dict(), "history": history})
    return summary


__all__ = ["NODE_ID", "RESTARTS", "fit_trainer", "torch_trainer", "train_with_ray", "train_worker"]
