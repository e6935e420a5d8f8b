"""Supervised cross-entropy, with label smoothing and optional MixUp / CutMix (timm's implementation)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from raycls.config.schema import SupervisedConfig
from raycls.evaluate import names
from raycls.models.registry import InputSpec
from raycls.phases.base import PHASES, Batch, Phase


@PHASES.register("supervised")
class Supervised(Phase[SupervisedConfig]):
    metric = names.VAL_ACC

    def __init__(self, config: SupervisedConfig, spec: InputSpec, **options):
        super().__init__(config, spec, **options)
        self.mixup = None
        if config.mixup_alpha > 0 or config.cutmix_alpha > 0:
            from timm.data import Mixup

            # timm mixes the targets and applies label smoothing to them in one step.
            self.mixup = Mixup(
                mixup_alpha=config.mixup_alpha,
                cutmix_alpha=config.cutmix_alpha,
                label_smoothing=config.label_smoothing,
                num_classes=spec.num_classes,
            )

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, y = batch
        if self.mixup is not None:
            x, soft = self.mixup(x, y)
            logits = model(x)
            return torch.sum(-soft * F.log_softmax(logits.float(), dim=-1), dim=-1).mean(), {}
        logits = model(x)
        return F.cross_entropy(logits.float(), y, label_smoothing=self.config.label_smoothing), {}

    def classifier(self, model: nn.Module) -> nn.Module:
        return model
