"""`raycls data explore`: the dataset report seed pipelines write before training, as JSON plus PNGs.

Per split (train and validation as a trial carves them, and test): class balance, image size (decoded) and
the source files' sizes and aspect ratios (measured on the files, before `data.resize` squares them), brightness (mean grey level per image) and contrast (its standard deviation), per-channel mean and
std; exact duplicates (identical bytes) and near duplicates (equal 64-bit perceptual hash: a DCT of the
32x32 grey image, its 8x8 lowest frequencies against their median, as in pHash) within each split and
across train/test (leakage: a test image the model may have trained on).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from raycls.config.schema import TrialConfig
from raycls.data.datasets import DATASETS, ArrayData, FileData, cache_dir
from raycls.data.splits import channel_stats, load_splits
from raycls.files import write_json_atomic

REPORT_FILE = "data_report.json"


def _dct_matrix(n: int) -> torch.Tensor:
    k = torch.arange(n, dtype=torch.float64)
    m = torch.cos(torch.pi / n * (k[None] + 0.5) * k[:, None]) * (2 / n) ** 0.5
    m[0] /= 2**0.5
    return m


def perceptual_hashes(images: torch.Tensor, chunk: int = 4096) -> np.ndarray:
    """pHash of uint8 [N, C, H, W] images as uint64: robust to re-encoding, small resizes and noise."""
    dct = _dct_matrix(32)
    out = np.empty(len(images), dtype=np.uint64)
    weights = (1 << np.arange(64, dtype=np.uint64)).astype(np.uint64)
    for start in range(0, len(images), chunk):
        grey = images[start : start + chunk].double().mean(1, keepdim=True)
        small = F.interpolate(grey, size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
        freq = (dct @ small @ dct.T)[:, :8, :8].reshape(len(small), 64)
        bits = (freq > freq[:, 1:].median(dim=1, keepdim=True).values).numpy().astype(np.uint64)  # DC term left out
        out[start : start + chunk] = (bits * weights).sum(1, dtype=np.uint64)
    return out


def exact_hashes(images: torch.Tensor) -> list[str]:
    return [hashlib.sha1(image.numpy().tobytes()).hexdigest() for image in images]


def _groups(keys: list[Any]) -> list[list[int]]:
    where: dict[Any, list[int]] = defaultdict(list)
    for i, key in enumerate(keys):
        where[key].append(i)
    return [group for group in where.values() if len(group) > 1]


def source_sizes(data: ArrayData | FileData) -> np.ndarray:
    """[N, 2] (height, width) of each image as stored: read from each file's header (nothing decoded) for
    image files, the array's shape otherwise."""
    if isinstance(data, ArrayData):
        return np.tile(np.asarray(data.images.shape[-2:]), (len(data), 1))
    from PIL import Image

    def size(file: str) -> tuple[int, int]:
        with Image.open(file) as image:
            return image.height, image.width

    return np.asarray([size(f) for f in data.files], dtype=np.int64).reshape(-1, 2)


def split_stats(data: ArrayData, sizes: np.ndarray | None = None) -> dict[str, Any]:
    """`sizes`: the source images' (height, width), from `source_sizes`; None: the arrays' own."""
    sizes = source_sizes(data) if sizes is None else sizes
    aspect = torch.as_tensor(sizes[:, 1] / sizes[:, 0], dtype=torch.float64)
    counts = torch.bincount(data.labels, minlength=len(data.classes)).tolist()
    grey = data.images.float().mean(1)  # [N, H, W]
    brightness = grey.mean((1, 2)) / 255
    contrast = grey.std((1, 2)) / 255
    mean, std = channel_stats(data.images)
    exact = _groups(exact_hashes(data.images))
    near = _groups(perceptual_hashes(data.images).tolist())
    h, w = data.images.shape[-2:]
    return {
        "images": len(data),
        "class_counts": dict(zip(data.classes, counts)),
        "imbalance_ratio": max(counts) / max(min(counts), 1),
        "image_size": [int(h), int(w)],
        "channels": int(data.images.shape[1]),
        "source_size": {
            "min": sizes.min(0).tolist(),
            "median": np.median(sizes, 0).tolist(),
            "max": sizes.max(0).tolist(),
        },
        "aspect_ratio": _summary(aspect),  # width / height of the source images
        "brightness": _summary(brightness),
        "contrast": _summary(contrast),
        "channel_mean": list(mean),
        "channel_std": list(std),
        "exact_duplicate_groups": len(exact),
        "exact_duplicate_images": sum(len(g) - 1 for g in exact),
        "near_duplicate_groups": len(near),
        "near_duplicate_images": sum(len(g) - 1 for g in near),
        "near_duplicate_examples": near[:10],
    }


def _summary(values: torch.Tensor) -> dict[str, float]:
    q = torch.quantile(values, torch.tensor([0.05, 0.5, 0.95], dtype=values.dtype))
    return {
        "mean": float(values.mean()),
        "std": float(values.std()),
        "p05": float(q[0]),
        "median": float(q[1]),
        "p95": float(q[2]),
    }


def leakage(train: ArrayData, test: ArrayData) -> dict[str, Any]:
    """Test images whose exact bytes or perceptual hash also occur in the training pool."""
    train_exact, train_near = set(exact_hashes(train.images)), set(perceptual_hashes(train.images).tolist())
    test_near = perceptual_hashes(test.images).tolist()
    exact = [i for i, h in enumerate(exact_hashes(test.images)) if h in train_exact]
    near = [i for i, h in enumerate(test_near) if h in train_near]
    return {"exact": len(exact), "near": len(near), "exact_test_indices": exact[:50], "near_test_indices": near[:50]}


def explore(config: TrialConfig, out: Path) -> dict[str, Any]:
    """Write `data_report.json` and its PNGs into `out`; returns the report."""
    from raycls.plots import bars, histograms, image_grid

    # Image files are listed (the splits a trial carves, as files) to measure the files, then decoded.
    listed = (
        config.data.model_copy(update={"loader": "stream"})
        if DATASETS.get(config.data.name).list_files
        else config.data
    )
    splits = load_splits(listed, seed=config.seed)
    files = {"train": splits.train, "val": splits.val, "test": splits.test}
    cache = cache_dir() if config.data.decode_cache else None
    named = {name: data.decode(cache) if isinstance(data, FileData) else data for name, data in files.items()}
    report: dict[str, Any] = {
        "dataset": config.data.name,
        "seed": config.seed,
        "classes": list(named["train"].classes),
        "splits": {name: split_stats(named[name], source_sizes(files[name])) for name in named},
    }
    pool = ArrayData(
        torch.cat([named["train"].images, named["val"].images]),
        torch.cat([named["train"].labels, named["val"].labels]),
        named["train"].classes,
    )
    report["train_test_leakage"] = leakage(pool, named["test"])
    out.mkdir(parents=True, exist_ok=True)
    for name, _data in named.items():
        bars(
            report["splits"][name]["class_counts"],
            out / f"class_balance_{name}.png",
            title=f"{name}: images per class",
            ylabel="images",
        )
    histograms(
        {
            "brightness": {n: (d.images.float().mean((1, 2, 3)) / 255).numpy() for n, d in named.items()},
            "contrast": {n: (d.images.float().mean(1).std((1, 2)) / 255).numpy() for n, d in named.items()},
        },
        out / "brightness_contrast.png",
    )
    groups = report["splits"]["train"]["near_duplicate_examples"]
    if groups:
        index = [i for group in groups[:8] for i in group[:2]]
        image_grid(
            named["train"].images[index],
            [f"group {k // 2}" for k in range(len(index))],
            out / "near_duplicates_train.png",
        )
    write_json_atomic(out / REPORT_FILE, report)
    return report


__all__ = ["explore", "leakage", "perceptual_hashes", "source_sizes", "split_stats"]
