"""Held-out classification metrics from logits and labels (raycls.evaluate.stats), on tensors alone.

Top-1 and top-k accuracy, macro and weighted precision / recall / F1, macro one-vs-rest AUROC and NLL; the
per-class report and the confusion matrix are tables for the evaluation folder. The statistics are
raycls.evaluate.stats' plain-torch copies of torchmetrics' (same numbers, without its seconds-long import).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from raycls import names
from raycls.evaluate import stats
from raycls.evaluate.roc import macro_auroc


def classification_metrics(
    logits: torch.Tensor, labels: torch.Tensor, *, topk: tuple[int, ...] = (1, 3, 5)
) -> dict[str, float]:
    """Every summary metric of a classifier on one split (k beyond the number of classes is left out)."""
    logits, labels = logits.float(), labels.long()
    c = logits.shape[1]
    metrics = {
        names.TEST_ACC: stats.topk_accuracy(logits, labels, 1).item(),
        names.TEST_NLL: F.cross_entropy(logits, labels).item(),
    }
    for k in sorted(set(topk)):
        if 1 < k <= c:
            metrics[names.test_topk(k)] = stats.topk_accuracy(logits, labels, k).item()
    for average in ("macro", "weighted"):
        precision, recall, f1 = stats.precision_recall_f1(logits, labels, average)
        metrics[f"test_{average}_precision"] = precision.item()
        metrics[f"test_{average}_recall"] = recall.item()
        metrics[f"test_{average}_f1"] = f1.item()
    # One-vs-rest AUROC of each class present in the split, averaged (a class without positives has none;
    # torchmetrics' own macro average would count it as 0).
    metrics[names.TEST_AUROC] = macro_auroc(logits, labels)
    return metrics


def per_class_report(logits: torch.Tensor, labels: torch.Tensor, classes: tuple[str, ...]) -> list[dict[str, object]]:
    """One row per class: support, accuracy (= recall), precision, recall, F1."""
    c = logits.shape[1]
    precision, recall, f1 = stats.precision_recall_f1(logits, labels, "none")
    support = torch.bincount(labels, minlength=c)
    return [
        {
            "class": classes[i] if i < len(classes) else str(i),
            "support": int(support[i]),
            "accuracy": float(recall[i]),
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
        }
        for i in range(c)
    ]


def confusion_matrix(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[true, predicted] counts."""
    return stats.confusion_matrix(logits.argmax(1), labels, logits.shape[1])
