"""Held-out test splits carved for datasets that ship none (digits, folders and CSVs without test images),
and how image files are resized (`data.resize: crop | squash`) and measured (`data explore`'s aspect ratio)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from raycls import names
from raycls.config import DataConfig, TrialConfig
from raycls.config.schema import AugmentConfig
from raycls.data import load_splits
from raycls.data import splits as split_module
from raycls.data.datasets import DATASETS, data_root

DIGITS = 1797


def _rows(images: torch.Tensor, labels: torch.Tensor) -> Counter:
    return Counter((image.numpy().tobytes(), int(label)) for image, label in zip(images, labels))


def test_digits_test_split_is_a_fixed_stratified_part_no_trial_trains_or_selects_on() -> None:
    raw = DATASETS.get("digits").read(DataConfig(), data_root(DataConfig()))
    a = load_splits(DataConfig(name="digits"), seed=0)
    b = load_splits(DataConfig(name="digits", val_fraction=0.3, train_subset=500), seed=7)
    assert a.test is not None and len(a.test) == round(split_module.TEST_FRACTION * DIGITS) == 359
    assert len(a.train) + len(a.val) == DIGITS - 359
    # Train, val and test together are exactly the dataset, each image once: the test split is disjoint.
    union = _rows(
        torch.cat([a.train.images, a.val.images, a.test.images]),
        torch.cat([a.train.labels, a.val.labels, a.test.labels]),
    )
    assert union == _rows(raw.train.images, raw.train.labels)
    # Stratified: every class's share within one image of proportional.
    expected = torch.bincount(raw.train.labels, minlength=10).double() * len(a.test) / DIGITS
    assert (torch.bincount(a.test.labels, minlength=10).double() - expected).abs().max() <= 1.0
    # The same images whatever the trial's seed, validation fraction or training subset.
    assert torch.equal(a.test.images, b.test.images) and torch.equal(a.test.labels, b.test.labels)
    assert not (_rows(b.train.images, b.train.labels).keys() & _rows(a.test.images, a.test.labels).keys())


def test_a_folder_without_a_test_folder_gets_a_carved_test_split(tmp_path: Path) -> None:
    for cls in ("cat", "dog"):
        (tmp_path / "train" / cls).mkdir(parents=True)
        for i in range(10):
            Image.new("RGB", (12, 10), (i * 20, 100 if cls == "cat" else 0, 0)).save(
                tmp_path / "train" / cls / f"{i}.png"
            )
    for loader in ("memory", "stream"):
        splits = load_splits(
            DataConfig(name="folder", path=str(tmp_path), folder_size=8, loader=loader, decode_cache=False), seed=3
        )
        assert splits.test is not None and torch.bincount(torch.as_tensor(splits.test.labels)).tolist() == [2, 2]
        assert len(splits.train) + len(splits.val) == 16


def test_a_digits_trial_is_evaluated_on_the_test_split(tmp_path: Path) -> None:
    from raycls.train.local import run_local
    from raycls.train.loop import load_data

    config = TrialConfig.model_validate(
        {
            "data": {"name": "digits", "train_subset": 400},
            "model": {"name": "small_cnn", "width": 8},
            "train": {"epochs": 1, "batch_size": 64},
        }
    )
    run_local(config, tmp_path)
    summary = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert summary[names.EVAL_SPLIT] == "test"
    assert summary["metrics"][names.TEST_IMAGES] == len(load_data(config).splits.test) == 359


# ------------------------------------------------------------------------------------------------ resize
def _wide(path: Path) -> Path:
    """40 x 20: red left and right quarters, a green 20 x 20 centre."""
    image = np.zeros((20, 40, 3), dtype=np.uint8)
    image[:, :10] = image[:, 30:] = (255, 0, 0)
    image[:, 10:30] = (0, 255, 0)
    Image.fromarray(image).save(path)
    return path


def test_crop_keeps_the_centre_and_squash_the_whole_image(tmp_path: Path) -> None:
    from raycls.images import decode_image

    file = _wide(tmp_path / "wide.png")
    crop, squash = decode_image(file, 16, resize="crop"), decode_image(file, 16, resize="squash")
    assert crop.shape == squash.shape == (16, 16, 3) and not np.array_equal(crop, squash)
    assert (crop[..., 1] == 255).all() and (crop[..., 0] == 0).all()  # only the green centre is left
    assert (squash[:, :2, 0] == 255).all() and (squash[:, 7:9, 1] == 255).all()  # red sides, squeezed


def test_resize_reaches_the_decode_cache_and_the_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAYCLS_CACHE", str(tmp_path / "cache"))
    for cls in ("a", "b"):
        (tmp_path / "data" / "train" / cls).mkdir(parents=True)
        for i in range(3):
            _wide(tmp_path / "data" / "train" / cls / f"{i}.png")
    config = DataConfig(name="folder", path=str(tmp_path / "data"), folder_size=8, val_fraction=0.2)
    crop = load_splits(config, seed=0)  # cached first: a cache keyed without the mode would serve it twice
    squash = load_splits(config.model_copy(update={"resize": "squash"}), seed=0)
    assert (crop.train.images[:, 0] == 0).all() and (squash.train.images[:, 0, :, 0] == 255).all()


def test_crop_trains_on_random_resized_crops() -> None:
    from raycls.data.augment import TIMM_MIN_AREA, training_augment

    folder = DataConfig(name="folder", path="x")
    assert training_augment(AugmentConfig(), folder).resized_crop == TIMM_MIN_AREA
    assert training_augment(AugmentConfig(), folder.model_copy(update={"resize": "squash"})).resized_crop == 0
    assert training_augment(AugmentConfig(resized_crop=0.5), folder).resized_crop == 0.5
    assert training_augment(AugmentConfig(), DataConfig(name="digits")).resized_crop == 0  # arrays, not files


def test_explore_measures_the_aspect_ratio_of_the_source_files(tmp_path: Path) -> None:
    from raycls.data.explore import explore

    for cls in ("a", "b"):
        (tmp_path / "data" / "train" / cls).mkdir(parents=True)
        for i in range(5):
            _wide(tmp_path / "data" / "train" / cls / f"{i}.png")
    config = TrialConfig.model_validate(
        {
            "data": {
                "name": "folder",
                "path": str(tmp_path / "data"),
                "folder_size": 16,
                "decode_cache": False,
                "val_fraction": 0.25,
            }
        }
    )
    report = explore(config, tmp_path / "out")
    for split in ("train", "val", "test"):
        stats = report["splits"][split]
        assert stats["aspect_ratio"]["median"] == 2.0 and stats["source_size"]["median"] == [20, 40]
        assert stats["image_size"] == [16, 16]
