"""Trainer checkpoints: the model's weights (models/checkpoint.py's format) plus what resuming needs."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from raycls.errors import CheckpointError
from raycls.models.checkpoint import WEIGHTS_FILE, atomic_save, save_weights, unwrap

STATE_FILE = "trainer.pt"
METRICS_FILE = "metrics.json"


def save_checkpoint(
    folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, epoch: int, metrics: dict
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_weights(model, folder / WEIGHTS_FILE)
    atomic_save({"epoch": epoch, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, folder / STATE_FILE)
    (folder / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    return folder


def load_checkpoint(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler) -> int:
    """Restore model, optimizer and schedule from `folder`; returns the epoch to start from."""
    weights, state_file = folder / WEIGHTS_FILE, folder / STATE_FILE
    if not weights.is_file() or not state_file.is_file():
        raise CheckpointError(f"{folder} is not a raycls checkpoint (needs {WEIGHTS_FILE} and {STATE_FILE})")
    device = next(unwrap(model).parameters()).device
    unwrap(model).load_state_dict(torch.load(weights, map_location=device, weights_only=True))
    state = torch.load(state_file, map_location=device, weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["epoch"]) + 1
