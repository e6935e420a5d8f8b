"""One trial in this process, no Ray: `raycls train --no-ray` (so `breakpoint()` works) and tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

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
    """Train `config`; write config.json, metrics.json and checkpoints/{last,best} into `out`."""
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
