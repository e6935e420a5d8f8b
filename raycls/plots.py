"""Pictures as PNG files (matplotlib, no display): the evaluation's and `raycls data explore`'s. Each is written
whole or not at all. Ground floor: any layer may draw."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import matplotlib

matplotlib.use("Agg")  # no display on workers and CI; set before pyplot is imported
import matplotlib.pyplot as plt
import numpy as np
import torch

from raycls.files import atomic_path


class ReliabilityBins(Protocol):
    """raycls.evaluate.calibration's bins, as drawn here."""

    edges: list[float]
    confidence: list[float]
    accuracy: list[float]
    count: list[int]


def save(fig, path: Path, *, dpi: int = 100) -> Path:
    """Write `fig` to `path` whole (a temporary file, then a rename) and close it."""
    try:
        with atomic_path(path) as tmp:  # the temp name has no image suffix: the format is said
            fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
    return path


def reliability_diagram(bins: ReliabilityBins, path: Path, *, title: str = "") -> Path:
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    lo = np.array(bins.edges[:-1])
    width = bins.edges[1] - bins.edges[0]
    acc = np.nan_to_num(np.array(bins.accuracy, dtype=float))
    ax.bar(lo, acc, width=width, align="edge", edgecolor="black", label="accuracy")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.set(xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title=title or "reliability")
    ax.legend(loc="upper left")
    return save(fig, path)


def confusion_png(matrix: torch.Tensor, classes: Sequence[str], path: Path) -> Path:
    c = matrix.shape[0]
    size = min(3 + 0.35 * c, 20)
    fig, ax = plt.subplots(figsize=(size, size))
    normalised = matrix.double() / matrix.sum(1, keepdim=True).clamp_min(1)
    ax.imshow(normalised.numpy(), cmap="Blues", vmin=0, vmax=1)
    if c <= 30:
        ax.set_xticks(range(c), [str(x) for x in classes[:c]], rotation=90)
        ax.set_yticks(range(c), [str(x) for x in classes[:c]])
        for i in range(c):
            for j in range(c):
                if matrix[i, j]:
                    ax.text(
                        j,
                        i,
                        int(matrix[i, j]),
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if normalised[i, j] > 0.5 else "black",
                    )
    ax.set(xlabel="predicted", ylabel="true", title="confusion matrix (row-normalised colours)")
    return save(fig, path)


def histograms(groups: dict[str, dict[str, np.ndarray]], path: Path) -> Path:
    """One panel per scorer: its scores on the in-distribution set and on each OOD set."""
    scorers = list(groups)
    fig, axes = plt.subplots(1, len(scorers), figsize=(3.5 * len(scorers), 3), squeeze=False)
    for ax, scorer in zip(axes[0], scorers):
        for label, scores in groups[scorer].items():
            finite = scores[np.isfinite(scores)]
            if len(finite):
                ax.hist(finite, bins=40, alpha=0.5, density=True, label=label)
        ax.set(title=scorer, xlabel="score (higher: in-distribution)")
        ax.legend(fontsize=7)
    return save(fig, path)


def image_grid(
    images: torch.Tensor, captions: Sequence[str], path: Path, *, columns: int = 8, overlays: torch.Tensor | None = None
) -> Path:
    """uint8 images [N, C, H, W] with a caption each; `overlays` [N, H, W] in [0, 1] drawn as a heat map."""
    n = len(images)
    rows = max(1, -(-n // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(1.7 * columns, 1.9 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        image = images[i].permute(1, 2, 0).numpy()
        ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray" if image.shape[-1] == 1 else None)
        if overlays is not None:
            ax.imshow(overlays[i].numpy(), cmap="jet", alpha=0.45, vmin=0, vmax=1)
        ax.set_title(captions[i], fontsize=6)
    return save(fig, path)


def scatter_2d(points: np.ndarray, labels: np.ndarray, classes: Sequence[str], path: Path, *, title: str) -> Path:
    fig, ax = plt.subplots(figsize=(6, 6))
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    for c in np.unique(labels):
        mask = labels == c
        ax.scatter(
            points[mask, 0],
            points[mask, 1],
            s=4,
            color=cmap(int(c) % cmap.N),
            label=str(classes[c]) if c < len(classes) else str(c),
        )
    if len(classes) <= 20:
        ax.legend(markerscale=3, fontsize=7, loc="best")
    ax.set(title=title, xticks=[], yticks=[])
    return save(fig, path)


def bars(values: dict[str, float], path: Path, *, title: str, ylabel: str, reference: float | None = None) -> Path:
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(values)), 3.5))
    ax.bar(list(values), list(values.values()))
    if reference is not None:
        ax.axhline(reference, color="gray", linestyle="--", label="clean")
        ax.legend()
    ax.set(title=title, ylabel=ylabel)
    ax.tick_params(axis="x", rotation=60)
    return save(fig, path)


def confidence_histogram(
    edges: Sequence[float], correct: Sequence[int], wrong: Sequence[int], path: Path, *, title: str = ""
) -> Path:
    """Correct and wrong predictions per confidence bin, side by side, on a log scale (mistakes are few)."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    lo = np.array(edges[:-1])
    width = (edges[1] - edges[0]) / 2
    ax.bar(lo, correct, width=width, align="edge", color="#2b8a3e", label=f"correct ({sum(correct)})")
    ax.bar(lo + width, wrong, width=width, align="edge", color="#c92a2a", label=f"wrong ({sum(wrong)})")
    if any(correct) or any(wrong):
        ax.set_yscale("log")
    ax.set(xlabel="confidence (largest probability)", ylabel="images (log scale)", xlim=(0, 1))
    ax.set_title(title or "confidence of correct and wrong predictions")
    ax.legend(loc="upper left")
    return save(fig, path)


def roc_curves(
    curves: Sequence[tuple[str, Sequence[float], Sequence[float], float]], path: Path, *, title: str
) -> Path:
    """One-vs-rest ROC curves: (label, false-positive rates, true-positive rates, AUROC) each."""
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    cmap = plt.get_cmap("tab10" if len(curves) <= 10 else "tab20")
    for i, (label, fpr, tpr, auroc) in enumerate(curves):
        ax.plot(fpr, tpr, color=cmap(i % cmap.N), linewidth=1.2, label=f"{label} ({auroc:.3f})")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="chance (0.5)")
    ax.set(xlabel="false-positive rate", ylabel="true-positive rate", xlim=(0, 1), ylim=(0, 1.01), title=title)
    ax.legend(loc="lower right", fontsize=7)
    return save(fig, path)


def map_grid(cells: Sequence[Sequence[np.ndarray]], titles: Sequence[Sequence[str]], path: Path) -> Path:
    """A grid of pictures: [H, W] arrays drawn as heat maps (each stretched to its own range), [H, W, 3]
    uint8 arrays as colour images; `titles` like `cells`."""
    rows, columns = len(cells), max(len(row) for row in cells)
    fig, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 1.75 * rows), squeeze=False)
    for r, row in enumerate(cells):
        for c, ax in enumerate(axes[r]):
            ax.axis("off")
            if c >= len(row):
                continue
            cell = row[c]
            if cell.ndim == 3:
                ax.imshow(cell)
            else:
                ax.imshow(cell, cmap="viridis")
            ax.set_title(titles[r][c], fontsize=6)
    return save(fig, path)
