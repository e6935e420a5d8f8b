"""How sure the model is when it is right and when it is wrong, on tensors alone.

The histogram of each test image's confidence (its largest softmax probability), split by whether the
prediction was correct: a model that knows when it errs puts its mistakes at low confidence, so the two
histograms separate. The seed pipelines draw it beside the reliability diagram (calibration.py), which bins
the same confidences but shows accuracy per bin rather than how many images fall in it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from raycls import names

BINS = 20


@dataclass(frozen=True)
class ConfidenceHistogram:
    edges: list[float]  # BINS + 1 edges over [0, 1]
    correct: list[int]  # correct predictions per bin
    wrong: list[int]  # wrong predictions per bin

    @property
    def total(self) -> int:
        return sum(self.correct) + sum(self.wrong)


def confidences(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(each image's largest probability, whether its argmax is its label)."""
    confidence, predicted = F.softmax(logits.double(), -1).max(-1)
    return confidence, predicted == labels


def confidence_histogram(logits: torch.Tensor, labels: torch.Tensor, *, bins: int = BINS) -> ConfidenceHistogram:
    """Counts of correct and wrong predictions per equal-width confidence bin; every image is in one bin
    (the last bin is closed, so a confidence of exactly 1 counts)."""
    confidence, correct = confidences(logits, labels)
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    which = torch.bucketize(confidence, edges[1:-1], right=True)
    return ConfidenceHistogram(
        edges=edges.tolist(),
        correct=torch.bincount(which[correct], minlength=bins).tolist(),
        wrong=torch.bincount(which[~correct], minlength=bins).tolist(),
    )


def confidence_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Mean confidence of correct and of wrong predictions, and their gap (what the histogram shows in one
    number); a model without a mistake has no wrong mean and no gap."""
    confidence, correct = confidences(logits, labels)
    metrics: dict[str, float] = {}
    if correct.any():
        metrics[names.TEST_CONF_CORRECT] = float(confidence[correct].mean())
    if (~correct).any():
        metrics[names.TEST_CONF_WRONG] = float(confidence[~correct].mean())
    if len(metrics) == 2:
        metrics[names.TEST_CONF_GAP] = metrics[names.TEST_CONF_CORRECT] - metrics[names.TEST_CONF_WRONG]
    return metrics
