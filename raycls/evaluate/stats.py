"""Classification statistics in plain torch, reproducing torchmetrics 1.9's numbers exactly.

Why not torchmetrics itself: `import torchmetrics` pulls in torchvision, torch._dynamo, transformers and
scipy.signal (about 5 s in a fresh process on a small machine), and every Ray trial actor would pay it at its
first held-out evaluation. The few statistics raycls reports are short to write; tests/test_stats.py keeps
torchmetrics as the oracle. Each function follows torchmetrics' float32 arithmetic step by step (where it
divides, sums and casts), its zero-division rule (0) and its rules for absent classes, so the numbers match
bit for bit. Inputs: `logits` or `probs` are [N, C] float, `labels` [N] class indices; `probs` must already
be probabilities (torchmetrics would softmax scores outside [0, 1]; raycls always passes a softmax).
"""

from __future__ import annotations

from typing import Literal

import torch

Average = Literal["macro", "weighted", "none"]


def _safe_divide(num: torch.Tensor, denom: torch.Tensor) -> torch.Tensor:
    """num / denom in float32 (integers are cast first), 0 where denom is 0 (torchmetrics' zero_division=0)."""
    num = num if num.is_floating_point() else num.float()
    denom = denom if denom.is_floating_point() else denom.float()
    return torch.where(denom != 0, num / denom, torch.zeros((), dtype=num.dtype, device=num.device))


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[true, predicted] int64 counts of predicted class indices `preds` [N]."""
    flat = labels.long() * num_classes + preds.long()
    return torch.bincount(flat, minlength=num_classes**2).reshape(num_classes, num_classes)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int = 1) -> torch.Tensor:
    """The share of images whose label is among the k highest scores (float32 scalar)."""
    if k == 1:  # torchmetrics takes argmax for k = 1 and topk otherwise: they may break ties differently
        hits = logits.argmax(1) == labels
    else:
        hits = (torch.topk(logits, k, dim=1).indices == labels.unsqueeze(1)).any(1)
    return _safe_divide(hits.sum(), torch.tensor(len(labels), device=labels.device))


def _reduce(
    score: torch.Tensor, average: Average, tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor
) -> torch.Tensor:
    """torchmetrics' `_adjust_weights_safe_divide`: macro gives weight 0 to a class that is neither in the
    labels nor predicted (tp + fp + fn == 0), weighted weighs by support; each term is divided, then summed."""
    if average == "none":
        return score
    if average == "weighted":
        weights = tp + fn
    else:
        weights = torch.ones_like(score)
        weights[tp + fp + fn == 0] = 0.0
    return _safe_divide(weights * score, weights.sum(-1, keepdim=True)).sum(-1)


def precision_recall_f1(
    logits: torch.Tensor, labels: torch.Tensor, average: Average = "macro"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Precision, recall and F1 of the argmax predictions (0 for a class whose denominator is 0), averaged
    over classes ("macro", "weighted") or per class ("none")."""
    matrix = confusion_matrix(logits.argmax(1), labels, logits.shape[1])
    tp = matrix.diag()
    fp, fn = matrix.sum(0) - tp, matrix.sum(1) - tp
    precision = _safe_divide(tp, tp + fp)
    recall = _safe_divide(tp, tp + fn)
    f1 = _safe_divide(2.0 * tp, 2.0 * tp + 1.0 * fn + fp)  # F-beta with beta = 1, as torchmetrics writes it
    return (
        _reduce(precision, average, tp, fp, fn),
        _reduce(recall, average, tp, fp, fn),
        _reduce(f1, average, tp, fp, fn),
    )


def _binary_roc(scores: torch.Tensor, positive: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fpr, tpr, thresholds at every distinct score, highest first, after a (0, 0) start at threshold 1."""
    order = torch.argsort(scores, descending=True)
    scores, positive = scores[order], positive[order]
    # The last index of each run of tied scores, and the last image: ties make one point, whatever their order.
    last = torch.where(scores[1:] - scores[:-1])[0]
    last = torch.cat([last, torch.tensor([len(scores) - 1], device=last.device)])
    tps = torch.cumsum(positive.long() * 1.0, 0)[last]  # float32 counts, like torchmetrics
    fps = 1 + last - tps
    zero = torch.zeros(1, dtype=tps.dtype, device=tps.device)
    tps, fps = torch.cat([zero, tps]), torch.cat([zero, fps])
    thresholds = torch.cat([torch.ones(1, dtype=scores.dtype, device=scores.device), scores[last]])
    # No negatives (or positives): the rate is meaningless; torchmetrics returns zeros (and warns).
    fpr = fps / fps[-1] if fps[-1] > 0 else torch.zeros_like(thresholds)
    tpr = tps / tps[-1] if tps[-1] > 0 else torch.zeros_like(thresholds)
    return fpr, tpr, thresholds


def roc(probs: torch.Tensor, labels: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """One-vs-rest (fpr, tpr, thresholds) of each class's probability, in class order."""
    return [_binary_roc(probs[:, i], labels == i) for i in range(probs.shape[1])]


def auroc_per_class(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[C] float32 trapezoidal area under each class's ROC curve: 0 for a class without positives (or without
    negatives), as in torchmetrics (callers that want NaN there mask it themselves)."""
    return areas(roc(probs, labels))


def areas(curves: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """[C] trapezoidal area under each (fpr, tpr, thresholds) curve of `roc`."""
    return torch.stack([torch.trapz(tpr, fpr) for fpr, tpr, _ in curves])


def calibration_error(
    probs: torch.Tensor, labels: torch.Tensor, bins: int = 15, norm: Literal["l1", "max"] = "l1"
) -> torch.Tensor:
    """Top-label calibration error over `bins` equal-width confidence bins: "l1" is the ECE (|accuracy -
    confidence| weighted by each bin's share of images), "max" the MCE (the largest gap, an empty bin counting
    as 0). Bins are [lo, hi) through bucketize(right=True) - 1, so a confidence of exactly 1.0 falls in an
    extra bin past the last edge, as in torchmetrics."""
    confidences, predictions = probs.max(dim=1)
    confidences, accuracies = confidences.float(), predictions.eq(labels).float()
    edges = torch.linspace(0, 1, bins + 1, dtype=confidences.dtype, device=confidences.device)
    which = torch.bucketize(confidences, edges, right=True) - 1
    zeros = torch.zeros(len(edges), dtype=confidences.dtype, device=confidences.device)
    count = zeros.clone().scatter_add_(0, which, torch.ones_like(confidences))
    conf = torch.nan_to_num(zeros.clone().scatter_add_(0, which, confidences) / count)
    acc = torch.nan_to_num(zeros.clone().scatter_add_(0, which, accuracies) / count)
    return _NORMS[norm](torch.abs(acc - conf), count / count.sum())


# How the per-bin gaps |accuracy - confidence| reduce to one number, given each bin's share of the images.
_NORMS = {
    "l1": lambda gap, share: torch.sum(gap * share),
    "max": lambda gap, share: torch.max(gap),
}
