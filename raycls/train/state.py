"""Trainer checkpoints: the model's weights (models/checkpoint.py's format) plus what resuming needs.

A chain (supcon > arcface > distill) resumes mid-way: the checkpoint records its position (stage, epoch in
the stage, the finished stages' summaries) and, while more stages follow, the current stage's best weights
so far (`carry.pt`): those, not the last epoch's, are what the next stage starts from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from raycls.errors import CheckpointError
from raycls.models.checkpoint import WEIGHTS_FILE, atomic_save, save_weights, unwrap
from raycls.ranking import Ranking
from raycls.storage import METRICS_FILE

if TYPE_CHECKING:
    from raycls.train.averaging import WeightAverage

STATE_FILE = "trainer.pt"
CARRY_FILE = "carry.pt"

Weights = dict[str, torch.Tensor]


@dataclass
class Position:
    """Where a checkpoint was taken in the chain."""

    stage: int = 0
    epoch: int = -1  # the last finished epoch of `stage`, counted from 0 within the stage
    # Finished stages' metrics at their best epochs, by stage label.
    finished: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass
class Best:
    """A stage's best epoch so far, judged by the phase's own metric."""

    metric: str
    value: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    # The whole phase module's weights (backbone and heads), on the CPU; kept only when a later stage needs
    # them: it starts from the backbone's, and a `teacher: previous` distillation uses the whole model.
    weights: Weights | None = None

    def offer(self, metrics: dict[str, float], model: nn.Module, *, keep_weights: bool) -> None:
        value = metrics.get(self.metric)
        if value is None:
            return
        if Ranking.of(self.metric).as_good(value, self.value):
            self.value, self.metrics = value, dict(metrics)
            if keep_weights:
                self.weights = {k: v.detach().to("cpu", copy=True) for k, v in unwrap(model).state_dict().items()}


@dataclass
class Plateau:
    """Epochs since the phase's metric last improved by more than `min_delta` (train.early_stopping).
    A resumed stage starts counting again from its best value so far."""

    metric: str
    patience: int
    min_delta: float
    best: float | None = None
    waited: int = 0

    def update(self, metrics: dict[str, float]) -> bool:
        """Take an epoch's metrics; True once `patience` epochs in a row have not improved."""
        value = metrics.get(self.metric)
        if value is None:
            return False
        if Ranking.of(self.metric).improves(value, self.best, self.min_delta):
            self.best, self.waited = value, 0
        else:
            self.waited += 1
        return self.waited >= self.patience


def save_checkpoint(
    folder: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    metrics: dict,
    *,
    position: Position,
    best: Best | None = None,
    average: WeightAverage | None = None,
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    # The weights the epoch was judged by (a selected weight average's) are the checkpoint's model.
    save_weights(average.judged(model) if average is not None else model, folder / WEIGHTS_FILE)
    state = {
        "stage": position.stage,
        "epoch": position.epoch,
        "finished": position.finished,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        **({"average": average.state(model)} if average is not None else {}),
    }
    atomic_save(state, folder / STATE_FILE)
    if best is not None and best.weights is not None:
        atomic_save(
            {"metric": best.metric, "value": best.value, "metrics": best.metrics, "weights": best.weights},
            folder / CARRY_FILE,
        )
    else:
        (folder / CARRY_FILE).unlink(missing_ok=True)  # the scratch folder is reused from epoch to epoch
    (folder / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    return folder


def _state(folder: Path, device: torch.device | str = "cpu") -> dict:
    weights, state_file = folder / WEIGHTS_FILE, folder / STATE_FILE
    if not weights.is_file() or not state_file.is_file():
        raise CheckpointError(f"{folder} is not a raycls checkpoint (needs {WEIGHTS_FILE} and {STATE_FILE})")
    return torch.load(state_file, map_location=device, weights_only=True)


def read_position(folder: Path) -> Position:
    state = _state(folder)
    return Position(
        stage=int(state.get("stage", 0)), epoch=int(state["epoch"]), finished=dict(state.get("finished", {}))
    )


def read_metrics(folder: Path) -> dict[str, float]:
    """The metrics reported with the checkpoint (those of the epoch it was taken after)."""
    return json.loads((folder / METRICS_FILE).read_text())


def read_best(folder: Path, metric: str) -> Best:
    """The stage's best so far as the checkpoint saw it (an empty Best when it kept no weights)."""
    path = folder / CARRY_FILE
    if not path.is_file():
        return Best(metric)
    carry = torch.load(path, map_location="cpu", weights_only=True)
    return Best(metric, value=carry["value"], metrics=dict(carry["metrics"]), weights=carry["weights"])


def load_checkpoint(
    folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, *, average: WeightAverage | None = None
) -> None:
    """Restore model, optimizer and schedule from `folder` (read_position says where it was taken)."""
    device = next(unwrap(model).parameters()).device
    state = _state(folder, device)
    weights = torch.load(folder / WEIGHTS_FILE, map_location=device, weights_only=True)
    if average is not None and "average" in state:
        average.load(model, weights, state["average"])
    else:
        unwrap(model).load_state_dict(weights)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])


def configured_hyperparameters(optimizer: torch.optim.Optimizer) -> list[tuple[float, float]]:
    """Each parameter group's initial lr and weight decay as the config set them (before a checkpoint loads)."""
    return [(group.get("initial_lr", group["lr"]), group.get("weight_decay", 0.0)) for group in optimizer.param_groups]


def keep_configured(optimizer: torch.optim.Optimizer, schedule, configured: list[tuple[float, float]]) -> None:
    """After loading a checkpoint, the config's lr and weight decay win over the checkpoint's: a PBT exploit
    resumes another trial's checkpoint under perturbed values (a plain resume has the same ones: no change).
    The schedule keeps its position; its base lrs become the config's."""
    if len(configured) != len(optimizer.param_groups):
        return  # a different grouping: the checkpoint's own values stand
    schedule.base_lrs = [lr for lr, _ in configured]
    for index, (group, (lr, decay)) in enumerate(zip(optimizer.param_groups, configured)):
        group["initial_lr"] = lr
        if "weight_decay" in group:
            group["weight_decay"] = decay
        group["lr"] = lr * schedule.lr_lambdas[index](schedule.last_epoch)


def is_whole(folder: Path) -> bool:
    """Whether `folder` holds a checkpoint that loads: a copy cut short by a killed process does not."""
    try:
        _state(folder)
        torch.load(folder / WEIGHTS_FILE, map_location="cpu", weights_only=True)
        json.loads((folder / METRICS_FILE).read_text())
    except Exception:  # missing, empty, truncated: all mean "do not resume from this"
        return False
    return True
