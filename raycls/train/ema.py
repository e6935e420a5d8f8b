"""`train.ema`: an exponential moving average of the weights (timm's ModelEmaV3), evaluated beside them.

The checkpoint's `model.pt` holds the weights each epoch is judged by (the average with `select: true`), so
every consumer of a checkpoint (the next stage, `raycls eval`, export, serve) gets those; the other set is
kept in the trainer state for resuming.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from raycls.config.schema import EmaConfig
from raycls.evaluate import names
from raycls.models import unwrap


class WeightAverage:
    def __init__(self, model: nn.Module, config: EmaConfig):
        from timm.utils import ModelEmaV3

        self.ema = ModelEmaV3(unwrap(model), decay=config.decay, use_warmup=config.warmup)
        self.select = config.select
        self.steps = 0

    @property
    def module(self) -> nn.Module:
        return self.ema.module

    def update(self, model: nn.Module) -> None:
        self.steps += 1
        self.ema.update(unwrap(model), step=self.steps)

    def judged(self, model: nn.Module) -> nn.Module:
        """The weights the epoch is judged by, checkpointed as model.pt."""
        return self.ema.module if self.select else unwrap(model)

    def kept(self, model: nn.Module) -> nn.Module:
        """The other set, kept in the trainer state."""
        return unwrap(model) if self.select else self.ema.module

    def merge(self, raw: dict[str, Any], averaged: dict[str, Any]) -> dict[str, Any]:
        """One epoch's metrics: the judged weights' under their own names, the other's suffixed."""
        judged, other, suffix = (averaged, raw, "_raw") if self.select else (raw, averaged, "_ema")
        shown = {k: v for k, v in raw.items() if not _is_val(k)}
        return {**shown, **{k: v for k, v in judged.items() if _is_val(k)},
                **{k + suffix: v for k, v in other.items() if _is_val(k)}}  # fmt: skip

    def state(self, model: nn.Module) -> dict[str, Any]:
        return {"weights": self.kept(model).state_dict(), "steps": self.steps}

    def load(self, model: nn.Module, judged: dict[str, Any], state: dict[str, Any]) -> None:
        """Resume: model.pt's weights go to the judged set, the trainer state's to the other."""
        self.judged(model).load_state_dict(judged)
        self.kept(model).load_state_dict(state["weights"])
        self.steps = int(state["steps"])


def _is_val(key: str) -> bool:
    return key.startswith("val_") and key != names.VAL_IMAGES
