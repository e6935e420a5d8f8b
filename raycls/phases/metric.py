"""Metric learning: a cosine classifier trained with an angular-margin loss (ArcFace, CosFace, AdaFace,
CurricularFace, sub-center ArcFace). Reports val_acc from the cosine logits and, from the backbone
embeddings, val_knn_acc and val_recall@1.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from raycls import names
from raycls.config.schema import MetricConfig
from raycls.errors import ConfigError
from raycls.evaluate.evaluators import Outputs
from raycls.losses import LOSSES, MarginLoss
from raycls.models import BackboneModel, unwrap
from raycls.phases.base import PHASES, Batch, Phase
from raycls.phases.mixing import BatchMixer


class MarginModel(BackboneModel):
    """Backbone + margin loss in one module, so the optimizer, DDP and checkpoints all see the class centres
    (the loss's head weights) and the loss's state buffers (warm-up step, AdaFace statistics, ...)."""

    def __init__(self, backbone: nn.Module, margin: MarginLoss):
        super().__init__(backbone)
        self.margin = margin

    def forward(
        self,
        x: torch.Tensor,
        labels: torch.Tensor | None = None,
        partners: torch.Tensor | None = None,
        lam: float = 1.0,
    ) -> Any:
        """Cosine logits without labels; the margin loss's output (loss, cosine) with them. The loss runs
        inside forward so that DDP synchronises the class centres' gradients. `partners`, `lam`: a mixed
        batch (MixUp / CutMix), whose loss is lam * loss(labels) + (1 - lam) * loss(partners)."""
        embeddings = self.embed(x)
        if labels is None:
            return self.margin.cosine(embeddings)
        if self.training:
            self.margin.step.add_(1)  # drives the margin warm-up; a buffer, so it survives a resume
        out = self.margin(embeddings, labels)
        if partners is not None:
            other = self.margin(embeddings, partners)
            out = out._replace(loss=lam * out.loss + (1.0 - lam) * other.loss)
        return out


class CosineClassifier(nn.Module):
    """A margin model as a plain classifier: the scaled cosine logits its loss trains on, without the margin."""

    def __init__(self, model: MarginModel, scale: float):
        super().__init__()
        self.model, self.scale = model, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.model(x)


@PHASES.register("metric")
class Metric(Phase[MetricConfig]):
    metric = names.VAL_ACC

    def __init__(self, config: MetricConfig, spec, **options):
        super().__init__(config, spec, **options)
        self.mixer = BatchMixer.maybe(config, spec.num_classes)

    def build(self, backbone: nn.Module) -> nn.Module:
        config = self.config
        options = {"scale": config.scale, "margin_warmup_steps": config.margin_warmup_steps}
        options |= {"margin": config.margin} if config.margin is not None else {}
        options |= {"sub_centers": config.sub_centers} if config.sub_centers is not None else {}
        try:
            loss = LOSSES.get(config.loss)(backbone.num_features, self.spec.num_classes, **options)
        except TypeError as err:  # an option this loss does not take (sub_centers on arcface, ...)
            raise ConfigError(f"phase.loss={config.loss!r} does not take these options ({err})") from None
        return MarginModel(backbone, loss)

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, y = batch
        if self.mixer is not None:
            mixed = self.mixer(x, y, self.backbone(unwrap(model)))
            with mixed.inside:
                return model(mixed.images, mixed.labels, mixed.partners, mixed.lam).loss, {}
        return model(x, y).loss, {}

    def outputs(self, model: nn.Module, x: torch.Tensor) -> Outputs:
        embeddings = model.embed(x)
        cosine = model.margin.cosine(embeddings).float()
        # val_loss: the scaled cosine without margin, the classifier's own cross-entropy at inference.
        return Outputs(embeddings=embeddings, logits=cosine, loss_logits=self.config.scale * cosine)

    def classifier(self, model: nn.Module) -> nn.Module:
        return CosineClassifier(model, self.config.scale)
