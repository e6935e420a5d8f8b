"""One-vs-rest ROC curves and AUROC per class (raycls.evaluate.stats), on tensors alone.

Each class in turn is the positive class and every other class the negatives, scored by its softmax
probability. A class with no positive image in the split has no curve: its AUROC is NaN and it is left out
of the macro average (torchmetrics, whose numbers raycls.evaluate.stats reproduces without its
seconds-long import, would count it as 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from raycls import names
from raycls.evaluate import stats


@dataclass(frozen=True)
class RocCurve:
    fpr: list[float]
    tpr: list[float]
    auroc: float  # NaN when the class has no positive image
    positives: int


def roc_curves(logits: torch.Tensor, labels: torch.Tensor) -> list[RocCurve]:
    """One curve per class, in class order."""
    curves = stats.roc(F.softmax(logits.float(), -1), labels)
    positives = torch.bincount(labels, minlength=len(curves))
    aurocs = _absent_as_nan(stats.areas(curves), positives)
    return [
        RocCurve(fpr=fpr.tolist(), tpr=tpr.tolist(), auroc=float(aurocs[i]), positives=int(positives[i]))
        for i, (fpr, tpr, _) in enumerate(curves)
    ]


def per_class_auroc(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[C] one-vs-rest AUROC of each class's softmax probability; NaN for a class absent from `labels`."""
    probs = F.softmax(logits.float(), -1)
    return _absent_as_nan(stats.auroc_per_class(probs, labels), torch.bincount(labels, minlength=probs.shape[1]))


def _absent_as_nan(aurocs: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """stats gives 0 for a class without positives (torchmetrics' rule); here it has no AUROC: NaN."""
    return torch.where(positives > 0, aurocs.double(), math.nan)


def macro_auroc(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The mean one-vs-rest AUROC over the classes present in `labels`."""
    return float(per_class_auroc(logits, labels).nanmean())


def roc_metrics(curves: list[RocCurve]) -> dict[str, float]:
    """The worst present class's AUROC: where the model separates a class least (the macro average is
    classification.py's test_auroc)."""
    present = [curve.auroc for curve in curves if not math.isnan(curve.auroc)]
    return {names.TEST_AUROC_WORST: min(present)} if present else {}
