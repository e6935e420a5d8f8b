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

from raycls.config.schema import Stage, TrialConfig
from raycls.errors import CheckpointError, ConfigError
from raycls.data import BatchLoader, Splits, load_splits
from raycls.evaluate import names
from raycls.models import InputSpec, create_model, unwrap
from raycls.models.checkpoint import backbone_weights, load_backbone, load_weights
from raycls.phases import PHASES, Phase, create_phase
from raycls.phases.base import Previous
from raycls.train.optim import create_optimizer, create_scheduler
from raycls.train.state import Best, Position, Weights, load_checkpoint, read_best, read_metrics, read_position, save_checkpoint
from raycls.train.steps import StepPolicy, autocast, check_finite, seed_everything, train_step

Metrics = dict[str, float]
ReportFn = Callable[[Metrics, "Path | None"], None]
ProgressFn = Callable[[int, int], None]  # (batches done in this epoch, batches in the epoch)
# A fast dev run's batches per split and epoch (Lightning's `fast_dev_run` runs one; two exercise the
# step-to-step state, e.g. the optimizer's second update and a scheduler step).
FAST_DEV_BATCHES = 2


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
class Data:
    splits: Splits
    spec: InputSpec


@dataclass
class Parts:
    phase: Phase
    model: nn.Module
    train_loader: BatchLoader
    val_loader: BatchLoader
    policy: StepPolicy


def load_data(config: TrialConfig) -> Data:
    splits = load_splits(config.data, seed=config.seed)
    image_size = config.data.image_size or splits.train.size
    return Data(splits, InputSpec(num_classes=splits.num_classes, in_chans=splits.train.channels, image_size=image_size))


def build(
    config: TrialConfig, stage: Stage, data: Data, ctx: RunContext, *,
    index: int = 0, init: Weights | None = None, previous: Previous | None = None,
) -> Parts:  # fmt: skip
    """Phase, model and loaders of one stage on one worker; the same seed gives the same initial weights on
    every rank. `init`: weights to start the backbone from: a saved model of any phase (the previous stage's
    best, or `init:`), whose backbone part is taken. `previous`: the chain's previous stage, for its phase."""
    seed_everything(config.seed + index)  # stage 0 (every single-phase trial) seeds exactly as config.seed
    splits, spec = data.splits, data.spec
    phase = create_phase(stage.phase, spec, topk=config.eval.topk, previous=previous)
    policy = StepPolicy.resolve(stage.train, ctx.device)
    backbone = create_model(config.model, spec)
    if init is not None:
        load_backbone(backbone, backbone_weights(init), what="the previous stage's best weights" if index else "init")
    model = phase.build(backbone).to(ctx.device)
    if policy.channels_last:
        model = model.to(memory_format=torch.channels_last)
    common = dict(
        mean=splits.mean, std=splits.std, device=ctx.device, image_size=config.data.image_size,
        channels_last=policy.channels_last, seed=config.seed + index, rank=ctx.rank, world_size=ctx.world_size,
        limit_batches=ctx.limit_batches,
    )  # fmt: skip
    train_loader = BatchLoader(splits.train, stage.train.batch_size, train=True, augment=stage.augment,
                               views=phase.views, **common)  # fmt: skip
    val_loader = BatchLoader(splits.val, stage.train.eval_batch_size, train=False, **common)
    if len(train_loader) == 0:
        raise ConfigError(
            f"train.batch_size={stage.train.batch_size} exceeds the {len(splits.train)} training images "
            f"of a worker ({ctx.world_size} workers)"
        )
    return Parts(phase, model, train_loader, val_loader, policy)


def fit(config: TrialConfig, report: ReportFn, ctx: RunContext | None = None) -> list[Metrics]:
    """Train one trial (every stage of its chain, in order) on this worker; returns every epoch's metrics."""
    ctx = ctx or RunContext()
    runner = ChainRunner(config, report, ctx)
    position = read_position(ctx.resume_from) if ctx.resume_from else Position()
    runner.finished = dict(position.finished)
    stages = config.stages
    handover = initial_weights(config)  # then each stage's best weights, for the next stage
    try:
        for index, stage in enumerate(stages):
            if index < position.stage:
                continue
            resume = ctx.resume_from if index == position.stage and position.epoch >= 0 else None
            if resume is not None and position.epoch + 1 >= stage.train.epochs:
                # The checkpoint closed this stage: the next one starts from its best, saved beside it.
                handover = read_best(resume, _phase_class(stage).metric).weights
                continue
            previous = Previous(stages[index - 1].phase, handover) if index else None
            handover = runner.run_stage(index, stage, init=handover, previous=previous, resume_from=resume,
                                        start=position.epoch + 1 if resume else 0)  # fmt: skip
        if not runner.history and ctx.resume_from is not None:
            # Resumed from the checkpoint of the last epoch (the trial ended, the driver did not hear of it):
            # report that epoch again, so the driver, the scheduler and the searcher see the trial's true end
            # rather than the older result their snapshot holds.
            final = read_metrics(ctx.resume_from)
            report(final, None)
            runner.history.append(final)
    finally:
        shutil.rmtree(runner.scratch, ignore_errors=True)
    return runner.history


def initial_weights(config: TrialConfig) -> Weights | None:
    if config.init is None:
        return None
    if not isinstance(config.init, str):
        raise CheckpointError(f"init {config.init}: a leaderboard reference must be resolved by the driver "
                              "(raycls tune / raycls train) before the trial starts")  # fmt: skip
    return load_weights(config.init)


def _phase_class(stage: Stage) -> type[Phase]:
    return PHASES.get(stage.phase.name)


class ChainRunner:
    """Runs a trial's stages one after another; epochs are numbered over the whole chain (ASHA's time axis)."""

    def __init__(self, config: TrialConfig, report: ReportFn, ctx: RunContext):
        self.config, self.report, self.ctx = config, report, ctx
        self.entered = time.perf_counter()
        self.data = load_data(config)
        self.stages = config.stages
        self.chained = len(self.stages) > 1
        self.finished: dict[str, dict[str, float]] = {}  # stage label -> its metrics at its best epoch
        self.history: list[Metrics] = []
        self.scratch = Path(tempfile.mkdtemp(prefix="raycls-ckpt-"))

    def run_stage(
        self, index: int, stage: Stage, *, init: Weights | None, previous: Previous | None, resume_from: Path | None, start: int
    ) -> Weights | None:  # fmt: skip
        """Train one stage; returns its best weights (the whole phase module's) when a later stage needs them."""
        ctx = self.ctx
        entered = time.perf_counter() if self.history else self.entered  # the first stage run also loaded the data
        parts = build(self.config, stage, self.data, ctx, index=index, init=init, previous=previous)
        model, phase, policy = parts.model, parts.phase, parts.policy
        optimizer = create_optimizer(stage.train, model)
        scheduler = create_scheduler(stage.train, optimizer, len(parts.train_loader))
        keep = index + 1 < len(self.stages)  # the best weights go on to the next stage
        best = Best(phase.metric)
        if resume_from is not None:
            load_checkpoint(resume_from, model, optimizer, scheduler)
            best = read_best(resume_from, phase.metric)
        phase.start(model, total_steps=stage.train.epochs * len(parts.train_loader))
        # DDP after restoring, so every rank starts from the same weights (DDP also broadcasts rank 0's).
        trained = nn.parallel.DistributedDataParallel(model) if ctx.world_size > 1 else model
        offset = sum(s.train.epochs for s in self.stages[:index])
        for epoch in range(start, stage.train.epochs):
            started = time.perf_counter()
            train_loss, images, seconds = train_epoch(trained, phase, parts.train_loader, optimizer, scheduler, policy, ctx, epoch)
            metrics = {
                names.EPOCH: offset + epoch + 1,  # epochs finished over the chain: the time axis ASHA's rungs count in
                names.TRAIN_LOSS: train_loss,
                names.LR: optimizer.param_groups[0]["lr"],
                names.TRAIN_IMAGES: images,
                names.IMAGES_PER_S: images / max(seconds, 1e-9),
                **evaluate(model, phase, parts.val_loader, policy),
            }
            metrics[names.EPOCH_S] = time.perf_counter() - started
            if epoch == start:  # data, model and optimizer construction, once per stage and (re)start
                metrics[names.SETUP_S] = started - entered
            if names.VAL_LOSS in metrics:  # phases without a validation loss (supcon) have train_loss checked
                check_finite(metrics[names.VAL_LOSS], what=names.VAL_LOSS, epoch=offset + epoch + 1)
            best.offer(metrics, model, keep_weights=keep)
            if self.chained:
                metrics = self._chain_metrics(stage, metrics, best, last=epoch + 1 == stage.train.epochs)
            # Only rank 0 writes a checkpoint: all ranks hold the same weights under DDP.
            position = Position(stage=index, epoch=epoch, finished=self.finished)
            checkpoint = save_checkpoint(self.scratch / "checkpoint", model, optimizer, scheduler, metrics,
                                         position=position, best=best if keep else None) if ctx.rank == 0 else None  # fmt: skip
            self.report(metrics, checkpoint)
            self.history.append(metrics)
        return best.weights

    def _chain_metrics(self, stage: Stage, metrics: Metrics, best: Best, *, last: bool) -> Metrics:
        """A chain's epoch also says its stage and, from each finished stage, its metrics at its best epoch."""
        if last:
            self.finished[stage.label] = {k: v for k, v in best.metrics.items() if k.startswith("val_") or k == names.EPOCH}
        kept = {names.stage_metric(label, k): v for label, done in self.finished.items() for k, v in done.items()}
        return {**metrics, names.STAGE: stage.label, **kept}


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
            sums, embedding = phase.eval_batch(model, batch)
        for key, value in sums.items():
            totals[key] = totals.get(key, 0) + value.double()
        if embedding is not None:
            embedded.append(embedding.float())
            labels.append(batch[1])
    summed = all_reduce_sum(totals)
    metrics = phase.eval_metrics(summed)
    # Every worker's embeddings: k-NN over a shard alone would score a different (smaller) problem.
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
