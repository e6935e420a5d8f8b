"""Calibration: do the model's confidences mean what they say? On tensors alone.

ECE and MCE over 15 equal-width confidence bins (torchmetrics' numbers, computed by raycls.evaluate.stats
without torchmetrics' seconds-long import; Guo et al. 2017's definition), the multiclass
Brier score, a reliability diagram's bins, and temperature scaling: one scalar T fitted on the validation
split by minimising its NLL (logits / T keep their argmax, so accuracy is unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from raycls import names
from raycls.evaluate import stats

BINS = 15


def ece(logits: torch.Tensor, labels: torch.Tensor, *, bins: int = BINS) -> float:
    return stats.calibration_error(F.softmax(logits.float(), -1), labels, bins, "l1").item()


def mce(logits: torch.Tensor, labels: torch.Tensor, *, bins: int = BINS) -> float:
    return stats.calibration_error(F.softmax(logits.float(), -1), labels, bins, "max").item()


def brier(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over images of the squared distance between the probability vector and the one-hot label."""
    probs = F.softmax(logits.double(), -1)
    return ((probs - F.one_hot(labels, probs.shape[1]).double()) ** 2).sum(-1).mean().item()


@dataclass(frozen=True)
class ReliabilityBins:
    edges: list[float]
    confidence: list[float]  # mean confidence per bin (NaN when empty)
    accuracy: list[float]
    count: list[int]


def reliability_bins(logits: torch.Tensor, labels: torch.Tensor, *, bins: int = BINS) -> ReliabilityBins:
    probs = F.softmax(logits.double(), -1)
    confidence, predicted = probs.max(-1)
    correct = (predicted == labels).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    which = torch.bucketize(confidence, edges[1:-1], right=True)  # [lo, hi) bins, like stats.calibration_error
    count = torch.bincount(which, minlength=bins)
    conf_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, which, confidence)
    acc_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, which, correct)
    safe = count.clamp_min(1).double()
    empty = count == 0
    return ReliabilityBins(
        edges=edges.tolist(),
        confidence=torch.where(empty, float("nan"), conf_sum / safe).tolist(),
        accuracy=torch.where(empty, float("nan"), acc_sum / safe).tolist(),
        count=count.tolist(),
    )


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, *, steps: int = 100) -> float:
    """The temperature T > 0 that minimises the NLL of `logits / T` (LBFGS on log T)."""
    logits, labels = logits.double(), labels.long()
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return float(log_t.exp().item())


def calibration_metrics(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    val_logits: torch.Tensor | None = None,
    val_labels: torch.Tensor | None = None,
) -> dict[str, float]:
    """ECE, MCE and Brier on the evaluated split; with validation logits, the temperature fitted on them and
    the evaluated split's ECE and NLL after scaling."""
    metrics = {
        names.TEST_ECE: ece(logits, labels),
        names.TEST_MCE: mce(logits, labels),
        names.TEST_BRIER: brier(logits, labels),
    }
    if val_logits is not None and val_labels is not None and len(val_labels) > 1:
        t = fit_temperature(val_logits, val_labels)
        scaled = logits.double() / t
        metrics.update(
            {
                names.TEST_TEMPERATURE: t,
                names.TEST_ECE_TS: ece(scaled, labels),
                names.TEST_NLL_TS: F.cross_entropy(scaled, labels).item(),
            }
        )
    return metrics
