"""Supervised cross-entropy, with label smoothing and optional MixUp / CutMix (timm's implementation)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from raycls import names
from raycls.config.schema import SupervisedConfig
from raycls.models.checkpoint import unwrap
from raycls.models.registry import InputSpec
from raycls.phases.base import PHASES, Batch, Phase, training_hits
from raycls.phases.mixing import BatchMixer, soft_cross_entropy


@PHASES.register("supervised")
class Supervised(Phase[SupervisedConfig]):
    metric = names.VAL_ACC

    def __init__(self, config: SupervisedConfig, spec: InputSpec, **options):
        super().__init__(config, spec, **options)
        # timm mixes the targets and applies label smoothing to them in one step.
        self.mixer = BatchMixer.maybe(config, spec.num_classes, config.label_smoothing)

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, y = batch
        if self.mixer is not None:
            mixed = self.mixer(x, y, self.backbone(unwrap(model)))
            with mixed.inside:
                logits = model(mixed.images)
            return soft_cross_entropy(logits, mixed.soft), {}
        logits = model(x)
        return F.cross_entropy(logits.float(), y, label_smoothing=self.config.label_smoothing), training_hits(logits, y)

    def classifier(self, model: nn.Module) -> nn.Module:
        return model
