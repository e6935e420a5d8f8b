"""One-vs-rest ROC curves and AUROC per class (torchmetrics), on tensors alone.

Each class in turn is the positive class and every other class the negatives, scored by its softmax
probability. A class with no positive image in the split has no curve: its AUROC is NaN and it is left out
of the macro average (torchmetrics would count it as 0).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import multiclass_auroc, multiclass_roc

from raycls import names


@dataclass(frozen=True)
class RocCurve:
    fpr: list[float]
    tpr: list[float]
    auroc: float  # NaN when the class has no positive image
    positives: int


def roc_curves(logits: torch.Tensor, labels: torch.Tensor) -> list[RocCurve]:
    """One curve per class, in class order."""
    probs = F.softmax(logits.float(), -1)
    c = probs.shape[1]
    positives = torch.bincount(labels, minlength=c)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchmetrics warns about classes without positives: NaN below
        fpr, tpr, _ = multiclass_roc(probs, labels, num_classes=c)
    aurocs = per_class_auroc(logits, labels)
    return [
        RocCurve(fpr=fpr[i].tolist(), tpr=tpr[i].tolist(), auroc=float(aurocs[i]), positives=int(positives[i]))
        for i in range(c)
    ]


def per_class_auroc(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[C] one-vs-rest AUROC of each class's softmax probability; NaN for a class absent from `labels`."""
    probs = F.softmax(logits.float(), -1)
    c = probs.shape[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # classes without positives: torchmetrics warns and returns 0
        aurocs = multiclass_auroc(probs, labels, num_classes=c, average="none").double()
    return torch.where(torch.bincount(labels, minlength=c) > 0, aurocs, math.nan)


def macro_auroc(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The mean one-vs-rest AUROC over the classes present in `labels`."""
    return float(per_class_auroc(logits, labels).nanmean())


def roc_metrics(curves: list[RocCurve]) -> dict[str, float]:
    """The worst present class's AUROC: where the model separates a class least (the macro average is
    classification.py's test_auroc)."""
    present = [curve.auroc for curve in curves if not math.isnan(curve.auroc)]
    return {names.TEST_AUROC_WORST: min(present)} if present else {}
