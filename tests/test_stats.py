"""raycls.evaluate.stats against torchmetrics, its oracle: the same numbers bit for bit on random inputs with
the awkward cases (tied scores, a class absent from the labels, a class never predicted, confidences of
exactly 1.0), and the evaluation modules import without torchmetrics (its import costs seconds)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_auroc,
    multiclass_calibration_error,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
    multiclass_roc,
)

from raycls.deliver.ensemble import held_out_metrics
from raycls.evaluate import stats

from .conftest import REPO

EXACT = {"rtol": 0.0, "atol": 0.0}


def _case(kind: str, c: int, seed: int, n: int = 300) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, probabilities, labels) of a noisy classifier with one awkward feature."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, c, (n,), generator=g)
    logits = torch.randn(n, c, generator=g) + 1.5 * F.one_hot(labels, c)
    if kind == "absent":  # the last class is never a label
        labels = labels.clamp_max(c - 2)
    elif kind == "never_predicted":  # class 0 is never anyone's argmax (nor in any top-k but the last)
        logits[:, 0] = -100.0
    elif kind == "ties":  # few distinct values: tied scores, tied argmaxes, tied confidences
        logits = logits.round()
    probs = F.softmax(logits, -1)
    if kind == "ties":
        probs = (probs * 10).round() / 10
    elif kind == "certain":  # a third of the images at confidence exactly 1.0
        probs[: n // 3] = F.one_hot(logits[: n // 3].argmax(1), c).float()
    return logits, probs, labels


@pytest.fixture(params=["plain", "absent", "never_predicted", "ties", "certain"])
def cases(request: pytest.FixtureRequest) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """One awkward feature, with 2, 3 and 10 classes and three seeds each (one test item per feature: fast)."""
    return [_case(request.param, c, seed) for c in (2, 3, 10) for seed in (0, 1, 2)]


def test_the_awkward_cases_are_what_they_say() -> None:
    assert (_case("absent", 3, 0)[2] != 2).all()
    assert (_case("never_predicted", 10, 0)[0].argmax(1) != 0).all()
    logits, probs, _ = _case("ties", 10, 0)
    assert len(probs.unique()) <= 11 and len(logits.unique()) < 20
    assert (_case("certain", 3, 0)[1].max(1).values == 1.0).sum() >= 100


def test_confusion_matrix_and_accuracy(cases) -> None:
    for logits, _, labels in cases:
        c = logits.shape[1]
        expected = multiclass_confusion_matrix(logits, labels, num_classes=c)
        torch.testing.assert_close(stats.confusion_matrix(logits.argmax(1), labels, c), expected, **EXACT)
        for k in range(1, min(c, 5) + 1):
            expected = multiclass_accuracy(logits, labels, num_classes=c, average="micro", top_k=k)
            torch.testing.assert_close(stats.topk_accuracy(logits, labels, k), expected, **EXACT)


def test_precision_recall_f1(cases) -> None:
    for logits, _, labels in cases:
        for average in ("macro", "weighted", "none"):
            kwargs = dict(num_classes=logits.shape[1], average=average)
            expected = (
                multiclass_precision(logits, labels, **kwargs),
                multiclass_recall(logits, labels, **kwargs),
                multiclass_f1_score(logits, labels, **kwargs),
            )
            torch.testing.assert_close(stats.precision_recall_f1(logits, labels, average), expected, **EXACT)


@pytest.mark.filterwarnings("ignore::UserWarning")  # torchmetrics warns about a class without positives
def test_roc_and_auroc(cases) -> None:
    for _, probs, labels in cases:
        c = probs.shape[1]
        fpr, tpr, thresholds = multiclass_roc(probs, labels, num_classes=c)
        got = stats.roc(probs, labels)
        assert len(got) == c
        for i, curve in enumerate(got):
            torch.testing.assert_close(curve, (fpr[i], tpr[i], thresholds[i]), **EXACT)
        expected = multiclass_auroc(probs, labels, num_classes=c, average="none")
        torch.testing.assert_close(stats.auroc_per_class(probs, labels), expected, **EXACT)


def test_calibration_error(cases) -> None:
    for _, probs, labels in cases:
        for norm in ("l1", "max"):
            for bins in (10, 15):
                expected = multiclass_calibration_error(
                    probs, labels, num_classes=probs.shape[1], n_bins=bins, norm=norm
                )
                torch.testing.assert_close(stats.calibration_error(probs, labels, bins, norm), expected, **EXACT)


def test_the_ensembles_ece_is_torchmetrics() -> None:
    _, probs, labels = _case("certain", 10, 3)
    expected = multiclass_calibration_error(probs, labels, num_classes=10, n_bins=15)
    assert held_out_metrics(probs, labels)["test_ece"] == float(expected)


def test_the_evaluation_modules_leave_torchmetrics_out() -> None:
    code = (
        "import sys\n"
        "import raycls.evaluate.classification, raycls.evaluate.calibration, raycls.evaluate.roc\n"
        "import raycls.evaluate.stats, raycls.deliver.ensemble\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torchmetrics'))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
