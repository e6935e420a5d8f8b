"""Fewer images than a split holds, taken the one way raycls takes them: stratified and seeded, never the
first N (datasets may be sorted by class; the shared CIFAR-10 copy is). Fast dev runs, evaluation samples,
export parity checks."""

from __future__ import annotations

from typing import TypeVar

import numpy as np

from raycls.data.datasets import ArrayData, FileData


def stratified_subset(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted indices of `n` of the images (all of them when n >= len(labels)): every class once before any
    class twice, then each in proportion to its size; seeded. The one way raycls takes fewer images than a
    split holds (fast dev runs, evaluation samples): never the first N, as datasets may be sorted by class
    (the shared CIFAR-10 copy is)."""
    labels = np.asarray(labels, dtype=np.int64)
    if n >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))  # ranks within a class follow this shuffle, not the file order
    shuffled = labels[order]
    by_class = np.argsort(shuffled, kind="stable")
    counts = np.bincount(shuffled)
    rank = np.empty(len(labels))
    rank[by_class] = np.arange(len(labels)) - np.repeat(np.cumsum(counts) - counts, counts)
    share = (rank + 0.5) / counts[shuffled]  # systematic sampling: a class's k-th image at its share of the class
    pick = np.lexsort((rng.random(len(labels)), share, rank > 0))[:n]  # first images first, then by share
    return np.sort(order[pick])


Sampled = TypeVar("Sampled", ArrayData, FileData)


def stratified_sample(data: Sampled, n: int | None, seed: int) -> Sampled:
    """`n` images of `data` (all when n is None), by `stratified_subset`, in the split's order."""
    if n is None or n >= len(data):
        return data
    return data.subset(stratified_subset(np.asarray(data.labels), n, seed))
