"""The per-worker training loop: plain PyTorch, never Ray.

`fit(config, report, context)` runs one trial on one worker: data -> model -> phase -> optimizer -> epochs.
Each epoch it calls `report(metrics, checkpoint_dir)`: `raycls train --no-ray` prints and keeps the best
checkpoint, the Ray Train bridge forwards both to Tune (where ASHA decides whether the trial goes on).
Under DDP (a torch.distributed process group already initialised, e.g. by Ray Train's TorchTrainer) the
loop wraps the model itself and sums validation statistics over workers before reporting.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from raycls.config.schema import TrialConfig
from raycls.errors import ConfigError
from raycls.data import BatchLoader, Splits, load_splits
from raycls.evaluate import names
from raycls.models import InputSpec, create_model, unwrap
from raycls.phases import Phase, create_phase
from raycls.train.optim import create_optimizer, create_scheduler
from raycls.train.state import load_checkpoint, save_checkpoint
from raycls.train.steps import StepPolicy, autocast, check_finite, seed_everything, train_step

Metrics = dict[str, float]
ReportFn = Callable[[Metrics, "Path | None"], None]
ProgressFn = Callable[[int, int], None]  # (batches done in this epoch, batches in the epoch)


@dataclass
class RunContext:
    """Where and how this worker runs; everything else comes from the TrialConfig."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    rank: int = 0
    world_size: int = 1
    # Run only this many batches of each split per epoch (`--fast-dev-run`).
    limit_batches: int | None = None
    # A checkpoint folder to resume from (model + optimizer + schedule + epoch).
    resume_from: Path | None = None
    progress: ProgressFn | None = None


@dataclass
class Parts:
    splits: Splits
    phase: Phase
    model: nn.Module
    train_loader: BatchLoader
    val_loader: BatchLoader
    policy: StepPolicy


def build(config: TrialConfig, ctx: RunContext) -> Parts:
    """Data, phase and model for one worker; the same seed gives the same initial weights on every rank."""
    seed_everything(config.seed)
    splits = load_splits(config.data, seed=config.seed)
    image_size = config.data.image_size or splits.train.size
    spec = InputSpec(num_classes=splits.num_classes, in_chans=splits.train.channels, image_size=image_size)
    phase = create_phase(config.phase, spec, topk=config.eval.topk)
    policy = StepPolicy.resolve(config.train, ctx.device)
    model = phase.build(create_model(config.model, spec)).to(ctx.device)
    if policy.channels_last:
        model = model.to(memory_format=torch.channels_last)
    common = dict(
        mean=splits.mean, std=splits.std, device=ctx.device, image_size=config.data.image_size,
        channels_last=policy.channels_last, seed=config.seed, rank=ctx.rank, world_size=ctx.world_size,
        limit_batches=ctx.limit_batches,
    )  # fmt: skip
    train_loader = BatchLoader(splits.train, config.train.batch_size, train=True, augment=config.augment,
                               views=phase.views, **common)  # fmt: skip
    val_loader = BatchLoader(splits.val, config.train.eval_batch_size, train=False, **common)
    if len(train_loader) == 0:
        raise ConfigError(
            f"train.batch_size={config.train.batch_size} exceeds the {len(splits.train)} training images "
            f"of a worker ({ctx.world_size} workers)"
        )
    return Parts(splits, phase, model, train_loader, val_loader, policy)


def fit(config: TrialConfig, report: ReportFn, ctx: RunContext | None = None) -> list[Metrics]:
    """Train one trial on this worker; returns the metrics of every epoch."""
    ctx = ctx or RunContext()
    entered = time.perf_counter()
    parts = build(config, ctx)
    model, phase, policy = parts.model, parts.phase, parts.policy
    optimizer = create_optimizer(config.train, model)
    scheduler = create_scheduler(config.train, optimizer, len(parts.train_loader))
    start = load_checkpoint(ctx.resume_from, model, optimizer, scheduler) if ctx.resume_from else 0
    phase.start(model, total_steps=config.train.epochs * len(parts.train_loader))
    # DDP after restoring, so every rank starts from the same weights (DDP also broadcasts rank 0's).
    trained = nn.parallel.DistributedDataParallel(model) if ctx.world_size > 1 else model

    history: list[Metrics] = []
    scratch = Path(tempfile.mkdtemp(prefix="raycls-ckpt-"))
    try:
        for epoch in range(start, config.train.epochs):
            started = time.perf_counter()
            train_loss, images, seconds = train_epoch(trained, phase, parts.train_loader, optimizer, scheduler, policy, ctx, epoch)
            metrics = {
                names.EPOCH: epoch + 1,  # epochs finished: the time axis ASHA's rungs count in
                names.TRAIN_LOSS: train_loss,
                names.LR: optimizer.param_groups[0]["lr"],
                names.TRAIN_IMAGES: images,
                names.IMAGES_PER_S: images / max(seconds, 1e-9),
                **evaluate(model, phase, parts.val_loader, policy),
            }
            metrics[names.EPOCH_S] = time.perf_counter() - started
            if not history:  # data, model and optimizer construction, once per (re)start
                metrics[names.SETUP_S] = started - entered
            if names.VAL_LOSS in metrics:  # phases without a validation loss (supcon) have train_loss checked
                check_finite(metrics[names.VAL_LOSS], what=names.VAL_LOSS, epoch=epoch + 1)
            # Only rank 0 writes a checkpoint: all ranks hold the same weights under DDP.
            checkpoint = save_checkpoint(scratch / "checkpoint", model, optimizer, scheduler, epoch, metrics) if ctx.rank == 0 else None
            report(metrics, checkpoint)
            history.append(metrics)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return history


def train_epoch(
    model: nn.Module,
    phase: Phase,
    loader: BatchLoader,
    optimizer: torch.optim.Optimizer,
    scheduler,
    policy: StepPolicy,
    ctx: RunContext,
    epoch: int,
) -> tuple[float, float, float]:
    """One pass over this worker's shard; returns (mean loss, images trained on, both over all workers; seconds)."""
    model.train()
    loader.set_epoch(epoch)
    started = time.perf_counter()
    total = torch.zeros((), device=policy.device)
    for i, batch in enumerate(loader):
        total += train_step(model, phase.loss, batch, optimizer, scheduler, policy)
        phase.after_step(unwrap(model))
        if ctx.progress is not None:
            ctx.progress(i + 1, len(loader))
    summed = all_reduce_sum({"loss": total / len(loader), "images": torch.tensor(float(loader.num_images), device=policy.device)})
    seconds = time.perf_counter() - started  # after the all-reduce: includes waiting for the device
    mean_loss = summed["loss"] / ctx.world_size
    check_finite(mean_loss, what=names.TRAIN_LOSS, epoch=epoch + 1)
    return mean_loss, summed["images"], seconds


@torch.no_grad()
def evaluate(model: nn.Module, phase: Phase, loader: BatchLoader, policy: StepPolicy) -> Metrics:
    """Validation metrics over the whole split: each worker sums its shard, then the sums are all-reduced.

    Runs the unwrapped model: DDP's forward would sync buffers, and workers' shards may differ in length.
    """
    model.eval()
    totals: dict[str, torch.Tensor] = {IMAGES_KEY: torch.zeros((), dtype=torch.float64, device=policy.device)}
    embedded: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    for batch in loader:
        totals[IMAGES_KEY] += len(batch[1])
        with autocast(policy):
            for key, value in phase.eval_batch(model, batch).items():
                totals[key] = totals.get(key, 0) + value.double()
            embedding = phase.embed(model, batch[0])
        if embedding is not None:
            embedded.append(embedding.float())
            labels.append(batch[1])
    summed = all_reduce_sum(totals)
    metrics = phase.eval_metrics(summed)
    if embedded:
        metrics.update(phase.embedding_metrics(*all_gather_cat(torch.cat(embedded), torch.cat(labels))))
    # How many validation images the metrics cover, over all workers: the whole split, each once.
    return {**metrics, names.VAL_IMAGES: summed.pop(IMAGES_KEY)}


def all_gather_cat(embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every worker's (unevenly sized) shards, concatenated in rank order, on every worker."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return embeddings, labels
    shards: list = [None] * dist.get_world_size()
    dist.all_gather_object(shards, (embeddings.cpu(), labels.cpu()))
    device = embeddings.device
    return torch.cat([e for e, _ in shards]).to(device), torch.cat([y for _, y in shards]).to(device)


IMAGES_KEY = "_images"


def all_reduce_sum(values: dict[str, torch.Tensor]) -> dict[str, float]:
    if not values:
        return {}
    keys = sorted(values)
    stacked = torch.stack([torch.as_tensor(values[k], dtype=torch.float64) for k in keys])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(stacked)
    return dict(zip(keys, stacked.tolist()))
