"""Seeded, stratified train/validation splits (and subsets) of the training pool."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from raycls.config.schema import DataConfig
from raycls.data.datasets import DATASETS, ArrayData, data_root
from raycls.errors import DataError


@dataclass(frozen=True)
class Splits:
    train: ArrayData
    val: ArrayData
    test: ArrayData | None
    # Per-channel mean and std of the training split, in [0, 1] units: the normalisation every split uses.
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def num_classes(self) -> int:
        return len(self.train.classes)


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (rest, taken) with `fraction` of every class in `taken`, at least one per class."""
    from sklearn.model_selection import train_test_split

    counts = np.bincount(labels)
    if (counts[counts > 0] < 2).any():
        raise DataError("every class needs at least 2 images to split off a validation set")
    n_classes = int((counts > 0).sum())
    taken = max(int(round(fraction * len(labels))), n_classes)
    rest_idx, taken_idx = train_test_split(
        np.arange(len(labels)), test_size=taken, stratify=labels, random_state=seed
    )
    return np.sort(rest_idx), np.sort(taken_idx)


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std per channel in [0, 1] units, in chunks so CIFAR-size sets never make a float copy."""
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    for start in range(0, len(images), chunk):
        block = images[start : start + chunk].to(torch.float64) / 255.0
        total += block.sum(dim=(0, 2, 3))
        total_sq += (block**2).sum(dim=(0, 2, 3))
    n = len(images) * images.shape[2] * images.shape[3]
    mean = total / n
    std = (total_sq / n - mean**2).clamp_min(1e-12).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


def load_splits(config: DataConfig, *, seed: int) -> Splits:
    """Read the dataset and carve a stratified validation split (seeded by the trial seed)."""
    spec = DATASETS.get(config.name)
    if spec.eval_only:
        raise DataError(f"dataset {config.name!r} is evaluation-only: it has no training split")
    raw = spec.read(config, data_root(config))
    assert raw.train is not None  # readers of training datasets always return one
    pool = raw.train
    labels = pool.labels.numpy()
    if config.train_subset is not None and config.train_subset < len(pool):
        # CIFAR arrays may be sorted by class: a subset must be stratified, never "the first N".
        _, keep = stratified_split(labels, config.train_subset / len(pool), seed)
        pool, labels = pool.subset(keep), labels[keep]
    train_idx, val_idx = stratified_split(labels, config.val_fraction, seed)
    train = pool.subset(train_idx)
    mean, std = channel_stats(train.images)
    return Splits(train=train, val=pool.subset(val_idx), test=raw.test, mean=mean, std=std)
