"""Supervised cross-entropy, with label smoothing and optional MixUp / CutMix (timm's implementation)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from raycls.config.schema import SupervisedConfig
from raycls.evaluate import names
from raycls.models.registry import InputSpec, embed_and_classify
from raycls.phases.base import CLASSIFIER_METRICS, PHASES, Batch, EvalBatch, Phase


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

    def eval_batch(self, model: nn.Module, batch: Batch) -> EvalBatch:
        x, y = batch
        embeddings, logits = embed_and_classify(self.backbone(model), x)
        return classifier_sums(logits.float(), logits.float(), y, self.topk), embeddings

    def eval_metrics(self, totals: dict[str, float]) -> dict[str, float]:
        return classifier_metrics(totals, self.topk)

    def classifier(self, model: nn.Module) -> nn.Module:
        return model

    @classmethod
    def reports(cls, topk: int) -> frozenset[str]:
        return super().reports(topk) | CLASSIFIER_METRICS | {names.val_topk(topk)}


def classifier_sums(logits: torch.Tensor, loss_logits: torch.Tensor, y: torch.Tensor, topk: int) -> dict[str, torch.Tensor]:
    """Additive validation statistics of a classifier: `logits` rank the classes, `loss_logits` give val_loss."""
    hits = logits.topk(topk, dim=-1).indices == y[:, None]
    return {
        "loss_sum": F.cross_entropy(loss_logits, y, reduction="sum"),
        "correct": hits[:, 0].sum(),
        "correct_topk": hits.any(dim=-1).sum(),
        "count": torch.tensor(len(y), device=y.device),
    }


def classifier_metrics(totals: dict[str, float], topk: int) -> dict[str, float]:
    n = max(totals["count"], 1.0)
    return {
        names.VAL_LOSS: totals["loss_sum"] / n,
        names.VAL_ACC: totals["correct"] / n,
        names.val_topk(topk): totals["correct_topk"] / n,
    }
