"""Phases on real data (digits): each margin loss trains, reports embedding metrics, and checkpoints its state."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from raycls.config import TrialConfig
from raycls.errors import ConfigError
from raycls.losses import LOSSES, MarginLoss
from raycls.train import run_local

MARGIN_LOSSES = [n for n in LOSSES.names() if issubclass(LOSSES.get(n), MarginLoss)]


def metric_config(loss: str, **phase) -> TrialConfig:
    return TrialConfig.model_validate({
        "data": {"name": "digits", "val_fraction": 0.2}, "model": {"width": 16},
        "phase": {"name": "metric", "loss": loss, "margin_warmup_steps": 50, **phase},
        "train": {"epochs": 4, "batch_size": 64, "optimizer": "adamw", "lr": 3e-3, "warmup_epochs": 1},
    })  # fmt: skip


@pytest.mark.parametrize("loss", MARGIN_LOSSES)
def test_every_margin_loss_learns_digits(loss: str, tmp_path: Path) -> None:
    summary = run_local(metric_config(loss), tmp_path, device=torch.device("cpu"))
    assert summary.best["val_acc"] > 0.9
    assert summary.best["val_knn_acc"] > 0.9 and summary.best["val_recall@1"] > 0.9
    state = torch.load(tmp_path / "checkpoints" / "last" / "model.pt", weights_only=True)
    assert state["margin.step"].item() == summary.final["train_images"] // 64 * 4  # warm-up state is saved
    assert any(k.startswith("margin.head.") for k in state)  # the class centres are trained weights


def test_metric_phase_config_errors(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="not a margin loss; margin losses: adaface"):
        metric_config("supcon")
    with pytest.raises(Exception, match="unknown loss 'arcfaze'"):
        metric_config("arcfaze")
    with pytest.raises(ConfigError, match="does not take these options"):
        run_local(metric_config("cosface", sub_centers=2), tmp_path, fast_dev_run=True)
