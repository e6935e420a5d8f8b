"""Datasets (a registry), stratified splits, device-side batching and augmentation. No Ray here."""

from raycls.data.augment import AUGMENTATIONS, apply_augmentations
from raycls.data.datasets import DATASETS, ArrayData, RawDataset, data_root, register_dataset
from raycls.data.loader import BatchLoader
from raycls.data.splits import Splits, load_splits, stratified_split

__all__ = [
    "AUGMENTATIONS",
    "DATASETS",
    "ArrayData",
    "BatchLoader",
    "RawDataset",
    "Splits",
    "apply_augmentations",
    "data_root",
    "load_splits",
    "register_dataset",
    "stratified_split",
]
