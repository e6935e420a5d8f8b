"""Error analysis on tensors alone: the most confident mistakes, and test images whose label is probably
wrong (confident learning, cleanlab's `find_label_issues` on out-of-sample probabilities: the test split was
never trained on, so its predicted probabilities are out-of-sample by construction)."""

from __future__ import annotations

import torch


def confident_mistakes(probs: torch.Tensor, labels: torch.Tensor, *, top: int = 24) -> list[dict[str, float | int]]:
    """The `top` wrong predictions with the highest confidence, most confident first."""
    confidence, predicted = probs.max(-1)
    wrong = (predicted != labels).nonzero().flatten()
    order = wrong[confidence[wrong].argsort(descending=True)][:top]
    return [
        {"index": int(i), "label": int(labels[i]), "predicted": int(predicted[i]), "confidence": float(confidence[i])}
        for i in order
    ]


def label_issues(probs: torch.Tensor, labels: torch.Tensor) -> list[dict[str, float | int]]:
    """Images cleanlab flags as mislabelled (ranked by self-confidence: least confident in its label first),
    each with the label it suggests (the predicted class)."""
    from cleanlab.filter import find_label_issues

    p = probs.double().numpy()
    p = p / p.sum(1, keepdims=True)
    y = labels.numpy()
    # n_jobs=1: cleanlab otherwise forks a multiprocessing pool, and a fork of a threaded process (a Ray trial
    # actor runs the loop in a thread beside Ray's own) can inherit a held lock and hang forever (seen: a zoo
    # search stuck in find_label_issues' forked worker). The work is a few argsorts: one process is enough.
    ranked = find_label_issues(y, p, return_indices_ranked_by="self_confidence", n_jobs=1)
    return [
        {"index": int(i), "label": int(y[i]), "suggested": int(p[i].argmax()), "label_confidence": float(p[i, y[i]])}
        for i in ranked
    ]
