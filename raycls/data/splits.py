"""Seeded, stratified train/validation splits (and subsets) of the training pool, and the held-out test split
carved once for a dataset that ships none."""

from __future__ import annotations

import hashlib
import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from raycls.config.schema import DataConfig
from raycls.data.datasets import DATASETS, ArrayData, FileData, cache_dir, data_root
from raycls.data.stream import host_available_bytes, should_stream
from raycls.errors import DataError
from raycls.files import save_npy_atomic

# Image-file datasets normalise by the statistics of at most this many training images (a seeded sample, the
# same whichever loader reads them): a streamed dataset is never decoded whole in one process.
STATS_SAMPLE = 4096
# A dataset without a test split of its own (digits; a folder or CSV without test images) gets this stratified
# share of its images as the test split, carved with a fixed seed, not the trial's: every trial of every
# experiment is evaluated on the same images, and no trial trains or selects on them (digits: 359 of 1,797).
TEST_FRACTION = 0.2
TEST_SEED = 0


@dataclass(frozen=True)
class Splits:
    """The training, validation and test splits: decoded arrays (data.loader: memory), or image files that
    Ray Data decodes as they stream (data.loader: stream; the evaluation suite decodes `test`). Every
    training dataset has a test split: its own, or one carved by `carve_test`."""

    train: ArrayData | FileData
    val: ArrayData | FileData
    test: ArrayData | FileData
    # Per-channel mean and std of the training split, in [0, 1] units: the normalisation every split uses.
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def num_classes(self) -> int:
        return len(self.train.classes)


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (rest, taken), both sorted, with `fraction` of every class in `taken`, at least one per class."""
    counts = np.bincount(labels)
    if (counts[counts > 0] < 2).any():
        raise DataError("every class needs at least 2 images to split off a test or validation set")
    n_classes = int((counts > 0).sum())
    taken = max(int(round(fraction * len(labels))), n_classes)
    # scikit-learn's split (the one users reproduce), kept on the node: every trial of a search splits the
    # same labels, and importing scikit-learn costs ~1.5 s in each trial actor.
    path = _split_file(labels, taken, seed)
    taken_idx = _read_split(path, taken, len(labels))
    if taken_idx is None:  # not computed on this node yet (or unreadable: computed again)
        from sklearn.model_selection import train_test_split

        _, taken_idx = train_test_split(np.arange(len(labels)), test_size=taken, stratify=labels, random_state=seed)
        taken_idx = np.sort(taken_idx)
        try:
            save_npy_atomic(path, taken_idx)
        except OSError:  # a read-only or full cache: the split is still right, only not kept
            pass
    return np.setdiff1d(np.arange(len(labels)), taken_idx, assume_unique=True), taken_idx


def _split_file(labels: np.ndarray, taken: int, seed: int) -> Path:
    """The cache file of one split: the labels, the count taken, the seed and scikit-learn's version (read from
    its metadata, not imported: a new version may split otherwise)."""
    version = importlib.metadata.version("scikit-learn")
    key = hashlib.sha1(np.ascontiguousarray(labels, dtype=np.int64).tobytes() + f":{taken}:{seed}:{version}".encode())
    return cache_dir() / "splits" / f"{key.hexdigest()[:24]}.npy"


def _read_split(path: Path, taken: int, size: int) -> np.ndarray | None:
    """The kept indices when the file holds `taken` sorted indices of `size` items, else None."""
    try:
        indices = np.load(path)
    except (OSError, ValueError, EOFError):  # absent, cut short or not an array
        return None
    valid = (
        indices.ndim == 1
        and indices.dtype.kind in "iu"
        and len(indices) == taken
        and (taken == 0 or (indices[0] >= 0 and indices[-1] < size and bool(np.all(np.diff(indices) > 0))))
    )
    return indices.astype(np.int64) if valid else None


def carve_test(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices (pool, test) of the held-out test split of a dataset that has none: TEST_FRACTION of every
    class, the same whatever the trial's seed."""
    return stratified_split(labels, TEST_FRACTION, TEST_SEED)


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
    """Read the dataset, carve its test split if it has none (`carve_test`), and a stratified validation
    split from the rest (seeded by the trial seed). With
    `data.loader: stream` (resolved by `resolve_loader`) the splits are image files, not decoded."""
    spec = DATASETS.get(config.name)
    if spec.eval_only:
        raise DataError(f"dataset {config.name!r} is evaluation-only: it has no training split")
    if config.loader == "stream":
        if spec.list_files is None:
            raise DataError(
                f"data.loader: stream needs a dataset of image files ({', '.join(streamable())}); "
                f"{config.name!r} is read into memory whole: use data.loader: memory or auto"
            )
        files = spec.list_files(config, data_root(config))
        pool, test = files.train, files.test
    else:
        raw = spec.read(config, data_root(config))
        assert raw.train is not None  # readers of training datasets always return one
        pool, test = raw.train, raw.test
    if test is None:
        pool_idx, test_idx = carve_test(np.asarray(pool.labels))
        pool, test = pool.subset(pool_idx), pool.subset(test_idx)
    labels = np.asarray(pool.labels)
    if config.train_subset is not None and config.train_subset < len(pool):
        # CIFAR arrays may be sorted by class: a subset must be stratified, never "the first N".
        _, keep = stratified_split(labels, config.train_subset / len(pool), seed)
        pool, labels = pool.subset(keep), labels[keep]
    train_idx, val_idx = stratified_split(labels, config.val_fraction, seed)
    train = pool.subset(train_idx)
    mean, std = normalisation(train, seed, sample=STATS_SAMPLE if spec.list_files else None)
    return Splits(train=train, val=pool.subset(val_idx), test=test, mean=mean, std=std)


def streamable() -> list[str]:
    return [name for name in DATASETS.names() if DATASETS.get(name).list_files is not None]


def normalisation(
    train: ArrayData | FileData, seed: int, *, sample: int | None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of the training split, or of a seeded sample of `sample` of its images. A
    streamed split's sample is decoded here, not cached: each seed samples other files, and the decode cache
    would keep a copy of every sample."""
    if sample is not None and len(train) > sample:
        pick = np.sort(np.random.default_rng(seed).choice(len(train), size=sample, replace=False))
        train = train.subset(pick)
    images = train.decode(None).images if isinstance(train, FileData) else train.images
    return channel_stats(images)


def resolve_loader(config: DataConfig, *, device_memory: int | None = None) -> DataConfig:
    """`data.loader: auto` made `memory` or `stream` (files listed, nothing decoded), so that every worker of
    a trial, and a replay of it, reads the same way. Called once per trial, where the trial is launched."""
    spec = DATASETS.get(config.name)
    if config.loader != "auto":
        return config
    if spec.list_files is None:
        return config.model_copy(update={"loader": "memory"})
    pool = spec.list_files(config, data_root(config)).train
    images = min(len(pool), config.train_subset or len(pool))
    stream = should_stream(
        config, images, config.folder_size, device_memory=device_memory, host_memory=host_available_bytes()
    )
    return config.model_copy(update={"loader": "stream" if stream else "memory"})


__all__ = [
    "STATS_SAMPLE",
    "TEST_FRACTION",
    "Splits",
    "carve_test",
    "load_splits",
    "normalisation",
    "resolve_loader",
    "stratified_split",
]
