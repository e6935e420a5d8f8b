"""One trial in this process, no Ray: `raycls train --no-ray` (so `breakpoint()` works) and tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from raycls import names
from raycls.config.schema import FAST_DEV_BATCHES, TrialConfig
from raycls.evaluate.summary import Summary, summarize
from raycls.files import replace_dir, write_json_atomic
from raycls.names import Mode
from raycls.ranking import Ranking
from raycls.storage import BEST, LAST, RunPaths
from raycls.train.chain import fit
from raycls.train.loop import Metrics, ProgressFn, RunContext
from raycls.train.steps import default_device


class KeepBestReporter:
    """Keeps `checkpoints/last` and `checkpoints/best` (by `metric`) under `out`."""

    def __init__(self, out: Path, metric: str, mode: Mode, on_epoch: Callable[[Metrics], None] | None = None):
        self.run, self.ranking, self.on_epoch = RunPaths(out), Ranking.of(metric, mode), on_epoch
        self.best: float | None = None

    def __call__(self, metrics: Metrics, checkpoint: Path | None) -> None:
        if checkpoint is not None:
            replace_dir(checkpoint, self.run.checkpoint(LAST))
            value = self.ranking.checkpoint_key(metrics)  # a chain's later stages first
            if value is not None and self.ranking.as_good(value, self.best):
                self.best = value
                replace_dir(checkpoint, self.run.checkpoint(BEST))
        if self.on_epoch is not None:
            self.on_epoch(metrics)


def run_local(
    config: TrialConfig,
    out: Path,
    *,
    metric: str = "val_acc",
    mode: Mode = "max",
    fast_dev_run: bool = False,
    device: torch.device | None = None,
    progress: ProgressFn | None = None,
    on_epoch: Callable[[Metrics], None] | None = None,
) -> Summary:
    """Train `config`; write config.json, metrics.json and checkpoints/{last,best} into `out`. A fast dev run is
    the config's (`TrialConfig.fast_dev_run`: one epoch, small batches, a few images per evaluated set) and the
    loop's (FAST_DEV_BATCHES batches of each split)."""
    if fast_dev_run:  # idempotent: a caller that already shrank the config loses nothing
        config = config.fast_dev_run()
    out.mkdir(parents=True, exist_ok=True)
    run = RunPaths(out)
    write_json_atomic(run.config, config.to_dict())
    ctx = RunContext(
        device=device or default_device(),
        limit_batches=FAST_DEV_BATCHES if fast_dev_run else None,
        progress=progress,
        eval_dir=str(run.eval_dir),
    )
    history = fit(config, KeepBestReporter(out, metric, mode, on_epoch), ctx)
    summary = summarize(history, metric, mode)
    write_json_atomic(run.metrics, {**summary.to_dict(), "history": history})
    return summary


class SegmentEnd(Exception):
    """A schedule's segment reached the epoch where the next one takes over."""


class SegmentReporter:
    """Forwards to the run's reporter, and ends the segment once epoch `end` is reported (None: never)."""

    def __init__(self, keeper: KeepBestReporter, end: int | None):
        self.keeper, self.end = keeper, end

    def __call__(self, metrics: Metrics, checkpoint: Path | None) -> None:
        self.keeper(metrics, checkpoint)
        if self.end is not None and int(metrics[names.EPOCH]) >= self.end:
            raise SegmentEnd


def run_schedule(
    segments: list[tuple[int, TrialConfig]],
    out: Path,
    *,
    metric: str = "val_acc",
    mode: Mode = "max",
    fast_dev_run: bool = False,
    device: torch.device | None = None,
    on_epoch: Callable[[Metrics], None] | None = None,
) -> Summary:
    """Replay a PBT trial's schedule (its row's `schedule`): segment k, (first epoch, config), trains until the
    next segment's first epoch, which resumes from its last checkpoint under its own config (the config's lr
    and weight decay replace the checkpoint's: raycls.train.state.keep_configured; augmentation and MixUp are
    built from the config). Writes what run_local writes; config.json is the last segment's. A fast dev run
    shrinks every segment's config, as run_local does its one."""
    if fast_dev_run:
        segments = [(start, config.fast_dev_run()) for start, config in segments]
    out.mkdir(parents=True, exist_ok=True)
    run = RunPaths(out)
    write_json_atomic(run.config, segments[-1][1].to_dict())
    history: list[Metrics] = []

    def record(metrics: Metrics) -> None:
        history.append(dict(metrics))
        if on_epoch is not None:
            on_epoch(metrics)

    keeper = KeepBestReporter(out, metric, mode, record)
    for index, (_, config) in enumerate(segments):
        end = segments[index + 1][0] if index + 1 < len(segments) else None
        ctx = RunContext(
            device=device or default_device(),
            limit_batches=FAST_DEV_BATCHES if fast_dev_run else None,
            eval_dir=str(run.eval_dir),
            resume_from=run.checkpoint(LAST) if index else None,
        )
        try:
            fit(config, SegmentReporter(keeper, end), ctx)
        except SegmentEnd:
            continue
    summary = summarize(history, metric, mode)
    write_json_atomic(run.metrics, {**summary.to_dict(), "history": history})
    return summary


def schedule_segments(schedule: list[dict], config_of: Callable[[dict], TrialConfig]) -> list[tuple[int, TrialConfig]]:
    """A row's `schedule` ([{epoch, values}]) as (first epoch, config) segments, `config_of(values)` making each
    segment's config; a segment that starts where the next one does never trains and is dropped."""
    ordered = sorted(schedule, key=lambda s: int(s["epoch"]))
    return [
        (int(s["epoch"]), config_of(s["values"]))
        for i, s in enumerate(ordered)
        if i + 1 == len(ordered) or int(ordered[i + 1]["epoch"]) > int(s["epoch"])
    ]
