"""One stage of one trial on one worker, top to bottom: plain PyTorch, never Ray.

    data -> phase + model -> loaders -> optimizer + lr schedule -> (resume) -> DDP
    for each epoch: train, evaluate, keep the best, checkpoint, report

`train_stage` is that run; `raycls.train.chain.fit` runs a trial's stages one after another through it
(a single-phase trial is a chain of one). Each epoch ends in `report(metrics, checkpoint_dir)`: `raycls
train --no-ray` prints and keeps the best checkpoint, the Ray reporters forward both to Train or Tune (where
ASHA decides whether the trial goes on). Under DDP (a process group already initialised, e.g. by Ray Train's
TorchTrainer) the model is wrapped here and validation statistics are summed over workers before reporting.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.nn as nn

from raycls import names
from raycls.config.schema import Stage, TrialConfig
from raycls.data import BatchLoader, Splits, load_splits
from raycls.data.augment import training_augment
from raycls.data.datasets import FileData
from raycls.data.stream import TRAIN, TRAIN_EVAL, VAL, StreamLoader, StreamSource
from raycls.errors import ConfigError
from raycls.models import InputSpec, create_model, unwrap
from raycls.models.checkpoint import backbone_weights, load_backbone
from raycls.optim import create_lr_schedule, create_optimizer, end_epoch
from raycls.phases import Phase, create_phase
from raycls.phases.base import TRAIN_CORRECT, TRAIN_SEEN, Previous
from raycls.train.averaging import WeightAverage, create_average
from raycls.train.distributed import all_gather_cat, all_reduce_sum, broadcast_from_rank0
from raycls.train.freeze import (
    freeze_modules,
    frozen_modules,
    keep_frozen_norms_in_eval,
    progressive_unfreezing,
    trainable_parameters,
)
from raycls.train.state import (
    Best,
    Plateau,
    Position,
    Weights,
    configured_hyperparameters,
    keep_configured,
    load_checkpoint,
    read_best,
    save_checkpoint,
)
from raycls.train.steps import StepPolicy, autocast, check_finite, seed_everything, train_step

Metrics = dict[str, float]
ProgressFn = Callable[[int, int], None]  # (batches done in this epoch, batches in the epoch)


class Reporter(Protocol):
    """Where every epoch's metrics go, with the checkpoint folder taken after it (rank 0 only; else None).
    The folder is reused for the next epoch: a reporter copies what it keeps before returning."""

    def __call__(self, metrics: Metrics, checkpoint: Path | None) -> None: ...


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
    # Where rank 0 puts the held-out evaluation of the trial's best weights once training ends (a folder
    # URI); None: no evaluation (the config's `eval.on: none` skips it too).
    eval_dir: str | None = None
    # Where a streamed dataset's batches come from (data.loader: stream): this worker's shards of the Ray Data
    # datasets (raycls.train.ray_data). None: the trial cannot stream (`raycls train --no-ray`).
    streams: StreamSource | None = None


Loader = BatchLoader | StreamLoader


@dataclass
class Data:
    splits: Splits
    spec: InputSpec


@dataclass
class Parts:
    phase: Phase
    model: nn.Module
    train_loader: Loader
    val_loader: Loader
    policy: StepPolicy
    frozen: list[nn.Module] = field(default_factory=list)  # train.freeze: kept out of training
    bn_loader: Loader | None = None  # the training split without augmentation (SWA's BatchNorm update)


def load_data(config: TrialConfig) -> Data:
    splits = load_splits(config.data, seed=config.seed)
    image_size = config.data.image_size or splits.train.size
    return Data(
        splits, InputSpec(num_classes=splits.num_classes, in_chans=splits.train.channels, image_size=image_size)
    )


def build(
    config: TrialConfig,
    stage: Stage,
    data: Data,
    ctx: RunContext,
    *,
    index: int = 0,
    init: Weights | None = None,
    previous: Previous | None = None,
) -> Parts:
    """Phase, model and loaders of one stage on one worker; the same seed gives the same initial weights on
    every rank. `init`: weights to start the backbone from: a saved model of any phase (the previous stage's
    best, or `init:`), whose backbone part is taken. `previous`: the chain's previous stage, for its phase."""
    seed_everything(config.seed + index)  # stage 0 (every single-phase trial) seeds exactly as config.seed
    splits, spec = data.splits, data.spec
    phase = create_phase(stage.phase, spec, topk=config.eval.val_topk, previous=previous)
    policy = StepPolicy.resolve(stage.train, ctx.device)
    backbone = create_model(stage.model, spec)
    if init is not None:
        load_backbone(backbone, backbone_weights(init), what="the previous stage's best weights" if index else "init")
    model = phase.build(backbone).to(ctx.device)
    frozen = frozen_modules(model, phase.backbone(model), stage.train.freeze)
    freeze_modules(frozen)
    if policy.channels_last:
        model = model.to(memory_format=torch.channels_last)
    common = dict(
        mean=splits.mean,
        std=splits.std,
        device=ctx.device,
        image_size=config.data.image_size,
        channels_last=policy.channels_last,
        seed=config.seed + index,
        rank=ctx.rank,
        world_size=ctx.world_size,
        limit_batches=ctx.limit_batches,
    )
    loader = loader_factory(splits, ctx)
    augment = training_augment(stage.augment, config.data)
    train_loader = loader(TRAIN, stage.train.batch_size, train=True, augment=augment, views=phase.views, **common)
    val_loader = loader(VAL, stage.train.eval_batch_size, train=False, **common)
    if len(train_loader) == 0:
        raise ConfigError(
            f"train.batch_size={stage.train.batch_size} exceeds the {len(splits.train)} training images "
            f"of a worker ({ctx.world_size} workers)"
        )
    bn_loader = loader(TRAIN_EVAL, stage.train.eval_batch_size, train=False, **common) if stage.train.swa else None
    return Parts(phase, model, train_loader, val_loader, policy, frozen, bn_loader)


def loader_factory(splits: Splits, ctx: RunContext) -> Callable[..., Loader]:
    """(split, batch size, **options) -> its loader: in memory (arrays), or streamed (files, data.loader: stream)."""
    named = {TRAIN: splits.train, VAL: splits.val, TRAIN_EVAL: splits.train}
    if not isinstance(splits.train, FileData):
        return lambda split, batch_size, **options: BatchLoader(named[split], batch_size, **options)  # type: ignore[arg-type]
    if ctx.streams is None:
        raise ConfigError(
            "data.loader: stream reads the images through Ray Data, which `raycls train --no-ray` "
            "does not start: drop --no-ray, or set data.loader: memory"
        )
    streams = ctx.streams
    return lambda split, batch_size, **options: StreamLoader(streams, split, len(named[split]), batch_size, **options)


@dataclass
class StageRun:
    """Where one stage sits in its trial's chain, and what it starts from."""

    index: int = 0  # the stage's position in the chain (0 for a single-phase trial)
    offset: int = 0  # epochs of the stages before it: epochs are numbered over the whole chain
    init: Weights | None = None  # backbone weights to start from (the previous stage's best, or `init:`)
    previous: Previous | None = None  # the chain's previous stage, for phases that build on it
    resume_from: Path | None = None  # a checkpoint of this stage to continue from
    start: int = 0  # the first epoch (within the stage) to train
    keep_best: bool = False  # a later stage starts from this stage's best weights: keep them (carry.pt)
    entered: float = field(default_factory=time.perf_counter)  # when setup began (for setup_s)
    scratch: Path = Path("checkpoint")  # the folder each epoch's checkpoint is written to
    # Chains add the stage's label and the finished stages' summaries to each epoch's metrics (chain.py).
    annotate: Callable[[Metrics, Best, bool], Metrics] | None = None
    finished: dict[str, dict[str, float]] = field(default_factory=dict)  # saved in the checkpoint's position
    # Called with the stage's best (weights kept), the model it judges and its phase after its last epoch,
    # before that epoch is reported: the trial's cost measurement and held-out evaluation run there, because
    # once the last epoch is reported a scheduler may stop the trial at once (ASHA stops every trial at
    # max_t). What it returns is reported with that epoch (the searcher's objectives read it there).
    on_last_epoch: Callable[[Best, nn.Module, Phase], Metrics] | None = None


def train_stage(
    config: TrialConfig, stage: Stage, data: Data, ctx: RunContext, report: Reporter, run: StageRun
) -> Best:
    """Train one stage for its epochs; returns its best epoch (with its weights when `run.keep_best`)."""
    parts = build(config, stage, data, ctx, index=run.index, init=run.init, previous=run.previous)
    model, phase, policy = parts.model, parts.phase, parts.policy
    optimizer = create_optimizer(stage.train, model, backbone=phase.backbone(model))
    lr_schedule = create_lr_schedule(stage.train, optimizer, len(parts.train_loader), metric=phase.metric)
    # After the optimizer, which must hold every parameter a later epoch thaws.
    unfreezing = progressive_unfreezing(stage.train.freeze, stage.train.unfreeze, phase.backbone(model))
    if unfreezing is not None and ctx.world_size > 1:
        raise ConfigError(
            "train.freeze: progressive trains on one worker per trial: DDP fixes the parameters it synchronises "
            "when it wraps the model (set experiment.resources.workers: 1)"
        )
    best = Best(phase.metric)
    average = create_average(model, stage.train, stage.train.epochs)  # train.ema / train.swa
    if run.resume_from is not None:
        configured = configured_hyperparameters(optimizer)  # this config's, before the checkpoint's replace them
        load_checkpoint(run.resume_from, model, optimizer, lr_schedule, average=average)
        keep_configured(optimizer, lr_schedule, configured)
        best = read_best(run.resume_from, phase.metric)
    stopping = stage.train.early_stopping
    plateau = Plateau(phase.metric, stopping.patience, stopping.min_delta, best=best.value) if stopping else None
    phase.start(model, total_steps=stage.train.epochs * len(parts.train_loader))
    # DDP after restoring, so every rank starts from the same weights (DDP also broadcasts rank 0's).
    trained = nn.parallel.DistributedDataParallel(model) if ctx.world_size > 1 else model
    if stage.train.compile:  # evaluation runs the uncompiled module (its shapes and modes differ)
        trained = torch.compile(trained, backend=stage.train.compile_backend)

    for epoch in range(run.start, stage.train.epochs):
        accuracy: Metrics = {}  # train_acc, when the phase counts its training hits (no mixing)
        started = time.perf_counter()
        compiling = stage.train.compile and epoch == run.start
        if unfreezing is not None:
            parts.frozen = unfreezing.at_epoch(epoch)
        train_loss, images, seconds, first_step = train_epoch(
            trained,
            phase,
            parts.train_loader,
            optimizer,
            lr_schedule,
            policy,
            ctx,
            epoch,
            frozen=parts.frozen,
            average=average,
            accuracy=accuracy,
        )
        validation = evaluate(model, phase, parts.val_loader, policy, sync=ctx.world_size > 1)
        if average is not None:
            average.after_epoch(model, epoch, parts.bn_loader)
            averaged = (
                evaluate(average.module, phase, parts.val_loader, policy, sync=ctx.world_size > 1)
                if average.active
                else None
            )
            validation = average.merge(validation, averaged)
        judged = average.judged(model) if average is not None else model  # what the epoch is judged and kept by
        end_epoch(lr_schedule, validation)  # plateau reads the epoch's judged validation metric
        metrics = {
            names.EPOCH: run.offset + epoch + 1,  # epochs finished over the chain: the time axis ASHA's rungs count in
            names.TRAIN_LOSS: train_loss,
            names.LR: optimizer.param_groups[0]["lr"],
            names.TRAIN_IMAGES: images,
            names.IMAGES_PER_S: images / max(seconds - (first_step if compiling else 0.0), 1e-9),
            names.TRAINABLE_PARAMS: trainable_parameters(model),
            **accuracy,
            **validation,
        }
        metrics[names.EPOCH_S] = time.perf_counter() - started
        if compiling:  # the first step compiled the model: reported apart, and not as epoch time
            metrics[names.COMPILE_S] = first_step
            metrics[names.EPOCH_S] -= first_step
        if epoch == run.start:  # data, model and optimizer construction, once per stage and (re)start
            metrics[names.SETUP_S] = started - run.entered
        if names.VAL_LOSS in metrics:  # phases without a validation loss (supcon) have train_loss checked
            check_finite(metrics[names.VAL_LOSS], what=names.VAL_LOSS, epoch=run.offset + epoch + 1)
        best.offer(metrics, judged, keep_weights=run.keep_best)
        last = epoch + 1 == stage.train.epochs
        if plateau is not None and plateau.update(metrics) and not last:
            metrics[names.STOPPED_BY], last = names.PATIENCE, True  # this epoch ends the stage
        if run.annotate is not None:
            metrics = run.annotate(metrics, best, last)
        if run.on_last_epoch is not None and last:
            metrics = {**metrics, **run.on_last_epoch(best, judged, phase)}
        # Only rank 0 writes a checkpoint: all ranks hold the same weights under DDP.
        position = Position(stage=run.index, epoch=epoch, finished=run.finished)
        checkpoint = (
            save_checkpoint(
                run.scratch,
                model,
                optimizer,
                lr_schedule,
                metrics,
                position=position,
                best=best if run.keep_best else None,
                average=average,
            )
            if ctx.rank == 0
            else None
        )
        report(metrics, checkpoint)
        if last:
            break
    return best


def train_epoch(
    model: nn.Module,
    phase: Phase,
    loader: BatchLoader,
    optimizer: torch.optim.Optimizer,
    lr_schedule,
    policy: StepPolicy,
    ctx: RunContext,
    epoch: int,
    *,
    frozen: Sequence[nn.Module] = (),
    average: WeightAverage | None = None,
    accuracy: Metrics | None = None,
) -> tuple[float, float, float, float]:
    """One pass over this worker's shard; returns (mean loss, images trained on, both over all workers;
    seconds; seconds of its first step, which compiles a compiled model). Sets train_acc in `accuracy`
    (over all workers) when the phase counted its training hits."""
    model.train()
    keep_frozen_norms_in_eval(frozen)
    loader.set_epoch(epoch)
    phase.begin_epoch(epoch)
    started = time.perf_counter()
    total = torch.zeros((), device=policy.device)
    tally: dict[str, torch.Tensor] = {}
    first_step = 0.0
    for i, batch in enumerate(loader):
        total += train_step(model, phase.loss, batch, optimizer, lr_schedule, policy, tally)
        if i == 0:
            first_step = time.perf_counter() - started
        phase.after_step(unwrap(model))
        if average is not None:
            average.after_step(model)
        if ctx.progress is not None:
            ctx.progress(i + 1, len(loader))
    # A phase counts its hits on every unmixed batch; all_reduce_sum agrees the keys over the workers.
    hits = {k: tally[k].float() for k in (TRAIN_CORRECT, TRAIN_SEEN) if k in tally}
    summed = all_reduce_sum(
        {"loss": total / len(loader), "images": torch.tensor(float(loader.num_images), device=policy.device), **hits}
    )
    if accuracy is not None and summed.get(TRAIN_SEEN, 0) > 0:
        accuracy[names.TRAIN_ACC] = summed[TRAIN_CORRECT] / summed[TRAIN_SEEN]
    seconds = time.perf_counter() - started  # after the all-reduce: includes waiting for the device
    mean_loss = summed["loss"] / ctx.world_size
    check_finite(mean_loss, what=names.TRAIN_LOSS, epoch=epoch + 1)
    return mean_loss, summed["images"], seconds, first_step


# The count of validation images, summed with the phase's statistics (a key no phase uses).
IMAGES_KEY = "_images"
EMBEDS_KEY = "_embeds"  # whether a rank made embeddings (so all join the gather)


@torch.no_grad()
def evaluate(model: nn.Module, phase: Phase, loader: BatchLoader, policy: StepPolicy, *, sync: bool = False) -> Metrics:
    """Validation metrics over the whole split: each worker sums its shard, then the sums are all-reduced.

    Runs the unwrapped model (workers' shards may differ in length, and DDP's forward is a collective);
    `sync`: first take rank 0's buffers (BatchNorm statistics), which DDP does not keep in sync.
    """
    if sync:
        broadcast_from_rank0(unwrap(model).buffers())
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
    totals[EMBEDS_KEY] = torch.tensor(float(bool(embedded)), device=policy.device)
    summed = all_reduce_sum(totals)
    # Every worker's embeddings: k-NN over a shard alone would score a different (smaller) problem. Every rank
    # joins the gather when any rank embedded (a rank whose shard was empty sends nothing).
    gathered = None
    if summed.pop(EMBEDS_KEY):
        empty = (torch.zeros(0, device=policy.device), torch.zeros(0, dtype=torch.long, device=policy.device))
        gathered = all_gather_cat(*((torch.cat(embedded), torch.cat(labels)) if embedded else empty))
    metrics = phase.eval_metrics(summed)
    if gathered is not None:
        metrics.update(phase.embedding_metrics(*gathered))
    # How many validation images the metrics cover, over all workers: the whole split, each once.
    return {**metrics, names.VAL_IMAGES: summed.pop(IMAGES_KEY)}
