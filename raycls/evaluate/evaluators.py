"""Validation evaluators: what a phase is judged by, apart from how it trains.

A phase says which evaluators it uses (`Phase.evaluators`) and how its model answers one batch
(`Phase.outputs`: class logits and/or embeddings, from one forward pass); the evaluators turn that into
metrics. Under DDP the loop sums each evaluator's per-batch statistics over workers (`batch_sums` ->
`metrics`) and gathers every worker's embeddings before `embedding_metrics`: k-NN over a shard alone would
score a different, smaller problem.

- `ClassifierMetrics`: val_loss, val_acc, val_top{k} (k capped at the number of classes).
- `EmbeddingMetrics`: val_knn_acc (weighted k-NN) and val_recall@1, leave-one-out over the whole split;
  every phase uses it, so a chain (supcon > arcface > ...) has one metric ASHA compares at every epoch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from raycls import names
from raycls.evaluate.embeddings import knn_accuracy, recall_at_1

# Neighbours in the k-NN accuracy of phases whose config has no knn_k.
DEFAULT_KNN_K = 20


@dataclass
class Outputs:
    """A phase's model on one validation batch."""

    embeddings: torch.Tensor | None = None  # the backbone's embeddings (None: no embedding metrics)
    logits: torch.Tensor | None = None  # class scores that rank the classes (val_acc, top-k)
    loss_logits: torch.Tensor | None = None  # logits whose cross-entropy is val_loss (None: `logits`)


class Evaluator:
    """One family of validation metrics. Statistics must be additive (sums and counts): workers' add up."""

    def batch_sums(self, outputs: Outputs, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}

    def metrics(self, totals: dict[str, float]) -> dict[str, float]:
        return {}

    def embedding_metrics(self, embeddings: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        return {}

    @classmethod
    def reports(cls, topk: int) -> frozenset[str]:
        """The metric names it reports (the chain preflight checks the experiment metric against them)."""
        raise NotImplementedError

    @classmethod
    def for_phase(cls, *, topk: int, knn_k: int) -> Evaluator:
        """Built for one phase: top-k from the trial's eval section, k-NN's k from the phase config."""
        return cls()


class ClassifierMetrics(Evaluator):
    def __init__(self, topk: int):
        self.topk = topk

    @classmethod
    def for_phase(cls, *, topk: int, knn_k: int) -> ClassifierMetrics:
        return cls(topk)

    def batch_sums(self, outputs: Outputs, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = outputs.logits.float()
        loss_logits = logits if outputs.loss_logits is None else outputs.loss_logits.float()
        hits = logits.topk(self.topk, dim=-1).indices == labels[:, None]
        return {
            "loss_sum": F.cross_entropy(loss_logits, labels, reduction="sum"),
            "correct": hits[:, 0].sum(),
            "correct_topk": hits.any(dim=-1).sum(),
            "count": torch.tensor(len(labels), device=labels.device),
        }

    def metrics(self, totals: dict[str, float]) -> dict[str, float]:
        n = max(totals["count"], 1.0)
        return {
            names.VAL_LOSS: totals["loss_sum"] / n,
            names.VAL_ACC: totals["correct"] / n,
            names.val_topk(self.topk): totals["correct_topk"] / n,
        }

    @classmethod
    def reports(cls, topk: int) -> frozenset[str]:
        return frozenset({names.VAL_LOSS, names.VAL_ACC, names.val_topk(topk)})


class EmbeddingMetrics(Evaluator):
    def __init__(self, k: int = DEFAULT_KNN_K):
        self.k = k

    @classmethod
    def for_phase(cls, *, topk: int, knn_k: int) -> EmbeddingMetrics:
        return cls(knn_k)

    def embedding_metrics(self, embeddings: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        return {
            names.VAL_KNN_ACC: knn_accuracy(embeddings, labels, k=self.k),
            names.VAL_RECALL_AT_1: recall_at_1(embeddings, labels),
        }

    @classmethod
    def reports(cls, topk: int) -> frozenset[str]:
        return frozenset({names.VAL_KNN_ACC, names.VAL_RECALL_AT_1})
