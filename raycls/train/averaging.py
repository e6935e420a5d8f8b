"""Weight averages evaluated beside the raw weights: `train.ema` (timm's ModelEmaV3, after every step) and
`train.swa` (torch.optim.swa_utils, after each of the stage's last epochs, BatchNorm statistics recomputed).

The checkpoint's `model.pt` holds the weights each epoch is judged by (the average when selected), so every
consumer of a checkpoint (the next stage, `raycls eval`, export, serve) gets those; the other set is kept
in the trainer state for resuming.
"""

from __future__ import annotations

import math
from typing import Any

import torch.nn as nn

from raycls import names
from raycls.config.schema import EmaConfig, SwaConfig
from raycls.models import unwrap


class WeightAverage:
    """The part EMA and SWA share: which set is judged, metric names, checkpoint state."""

    suffix = "_avg"
    select = False

    @property
    def module(self) -> nn.Module:
        raise NotImplementedError

    @property
    def active(self) -> bool:
        """Whether the average exists yet (SWA starts late in the stage)."""
        return True

    def after_step(self, model: nn.Module) -> None:
        """Called after every optimizer step."""

    def after_epoch(self, model: nn.Module, epoch: int, bn_loader: Any) -> None:
        """Called after every epoch's training, before its evaluation (`epoch` counted from 0 in the stage)."""

    def judged(self, model: nn.Module) -> nn.Module:
        """The weights the epoch is judged by, checkpointed as model.pt."""
        return self.module if self.select and self.active else unwrap(model)

    def kept(self, model: nn.Module) -> nn.Module:
        """The other set, kept in the trainer state."""
        return unwrap(model) if self.select and self.active else self.module

    def merge(self, raw: dict[str, Any], averaged: dict[str, Any] | None) -> dict[str, Any]:
        """One epoch's metrics: the judged weights' under their own names, the other's suffixed."""
        if averaged is None:
            return raw
        judged, other, suffix = (averaged, raw, "_raw") if self.select else (raw, averaged, self.suffix)
        shown = {k: v for k, v in raw.items() if not _is_val(k)}
        return {
            **shown,
            **{k: v for k, v in judged.items() if _is_val(k)},
            **{k + suffix: v for k, v in other.items() if _is_val(k)},
        }

    def state(self, model: nn.Module) -> dict[str, Any]:
        return {"weights": self.kept(model).state_dict(), **self._counters()}

    def load(self, model: nn.Module, judged: dict[str, Any], state: dict[str, Any]) -> None:
        """Resume: model.pt's weights go to the judged set, the trainer state's to the other."""
        self._restore(state)
        self.judged(model).load_state_dict(judged)
        self.kept(model).load_state_dict(state["weights"])

    def _counters(self) -> dict[str, Any]:
        return {}

    def _restore(self, state: dict[str, Any]) -> None:
        pass


class Ema(WeightAverage):
    suffix = "_ema"

    def __init__(self, model: nn.Module, config: EmaConfig):
        from timm.utils import ModelEmaV3

        self.ema = ModelEmaV3(unwrap(model), decay=config.decay, use_warmup=config.warmup)
        self.select = config.select
        self.steps = 0

    @property
    def module(self) -> nn.Module:
        return self.ema.module

    def after_step(self, model: nn.Module) -> None:
        self.steps += 1
        self.ema.update(unwrap(model), step=self.steps)

    def _counters(self) -> dict[str, Any]:
        return {"steps": self.steps}

    def _restore(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])


class Swa(WeightAverage):
    suffix = "_swa"

    def __init__(self, model: nn.Module, config: SwaConfig, epochs: int):
        from torch.optim.swa_utils import AveragedModel

        self.averaged = AveragedModel(unwrap(model))
        self.select = config.select
        # Averaging begins after the first `start` of the epochs, and always includes the last one.
        self.first = min(math.floor(config.start * epochs), epochs - 1)

    @property
    def module(self) -> nn.Module:
        return self.averaged.module

    @property
    def active(self) -> bool:
        return int(self.averaged.n_averaged) > 0

    def after_epoch(self, model: nn.Module, epoch: int, bn_loader: Any) -> None:
        from torch.optim.swa_utils import update_bn

        if epoch >= self.first:
            self.averaged.update_parameters(unwrap(model))
            update_bn(bn_loader, self.averaged.module)  # the average's own BatchNorm statistics

    def _counters(self) -> dict[str, Any]:
        return {"n_averaged": int(self.averaged.n_averaged)}

    def _restore(self, state: dict[str, Any]) -> None:
        self.averaged.n_averaged.fill_(int(state["n_averaged"]))


def create_average(model: nn.Module, config, epochs: int) -> WeightAverage | None:
    """The stage's weight average (train.ema or train.swa), or None."""
    if config.ema is not None:
        return Ema(model, config.ema)
    if config.swa is not None:
        return Swa(model, config.swa, epochs)
    return None


def _is_val(key: str) -> bool:
    return key.startswith("val_") and key != names.VAL_IMAGES
