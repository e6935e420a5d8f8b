"""Supervised contrastive pretraining (Khosla et al. 2020): two augmented views of every image, a projection
head, and the SupCon loss that pulls together all views of the same class. Judged by val_knn_acc: the k-NN
accuracy of the backbone's embeddings over the whole validation split (all workers' together).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from raycls import names
from raycls.config.schema import SupConConfig
from raycls.evaluate.evaluators import EmbeddingMetrics, Outputs
from raycls.losses import ProjectionHead, SupConLoss
from raycls.models import BackboneModel
from raycls.phases.base import PHASES, Batch, Phase


class ProjectedModel(BackboneModel):
    """Backbone + projection head; `embed` gives the backbone features that evaluation and later phases use."""

    def __init__(self, backbone: nn.Module, projection: ProjectionHead):
        super().__init__(backbone)
        self.projection = projection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.embed(x))


@PHASES.register("supcon")
class SupCon(Phase[SupConConfig]):
    metric = names.VAL_KNN_ACC
    views = 2
    evaluators = (EmbeddingMetrics,)  # no classifier yet: judged by its embeddings alone

    def build(self, backbone: nn.Module) -> nn.Module:
        self.criterion = SupConLoss(temperature=self.config.temperature)
        head = ProjectionHead(backbone.num_features, self.config.hidden_dim, self.config.projection_dim)
        return ProjectedModel(backbone, head)

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, y = batch  # x: [B, views, C, H, W]
        b, v = x.shape[:2]
        features = model(x.flatten(0, 1)).view(b, v, -1)  # one forward for all views: one DDP sync
        return self.criterion(features, y), {}

    def outputs(self, model: nn.Module, x: torch.Tensor) -> Outputs:
        return Outputs(embeddings=model.embed(x))
