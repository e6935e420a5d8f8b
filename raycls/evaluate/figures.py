"""The default suite's pictures, drawn from the tables its evaluation writes, where and when they are looked at.

Every completed trial of a search runs the default suite. Its numbers (metrics.json) and tables (the confusion
matrix, the reliability bins, the confidence histogram: CSV) are written in the trial; drawing them with
matplotlib took 0.6 s of a trial's CPU, about 80% of the whole evaluation, for pictures nobody opens for most
trials. So a search's trials write the tables only (unless `eval.trial_plots`), and the pictures are drawn from
those tables by whoever shows them: `raycls eval` (which always draws), the report (for the trials it shows),
and each trial's W&B run (as W&B's own charts, read here from the same tables).

One registry entry per picture: the table it is drawn from, and how. Drawing never changes a table.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raycls import names
from raycls.registry import Registry
from raycls.storage import METRICS_FILE

if TYPE_CHECKING:
    from raycls.evaluate.calibration import ReliabilityBins

CONFUSION_CSV = "confusion_matrix.csv"
RELIABILITY_CSV = "reliability.csv"
RELIABILITY_TS_CSV = "reliability_ts.csv"
CONFIDENCE_CSV = "confidence_histogram.csv"


@dataclass(frozen=True)
class Figure:
    """A picture of an evaluation folder: `<name>.png`, drawn from `table` by `draw(folder, png, metrics)`
    (metrics: the evaluation's, for the title)."""

    table: str
    draw: Callable[[Path, Path, dict[str, Any]], Path]


FIGURES: Registry[Figure] = Registry("eval figure")


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def read_metrics(folder: Path) -> dict[str, Any]:
    """The evaluation's metrics (and its split), {} before metrics.json is written."""
    path = folder / METRICS_FILE
    if not path.is_file():
        return {}
    summary = json.loads(path.read_text())
    return {**summary.get("metrics", {}), names.EVAL_SPLIT: summary.get(names.EVAL_SPLIT, "test")}


def confusion(folder: Path) -> tuple[list[str], list[list[int]]] | None:
    """(class names, counts[true][predicted]) from confusion_matrix.csv, None when there is none."""
    path = folder / CONFUSION_CSV
    if not path.is_file():
        return None
    rows = read_rows(path)
    classes = [row["true"] for row in rows]
    return classes, [[int(row[c]) for c in classes] for row in rows]


def bin_rows(bins: ReliabilityBins) -> list[dict[str, float]]:
    """Reliability bins (raycls.evaluate.calibration.reliability_bins) as the rows of their table."""
    return [
        {
            "low": bins.edges[i],
            "high": bins.edges[i + 1],
            "confidence": bins.confidence[i],
            "accuracy": bins.accuracy[i],
            "count": bins.count[i],
        }
        for i in range(len(bins.count))
    ]


def reliability(folder: Path, table: str = RELIABILITY_CSV) -> ReliabilityBins | None:
    """The bins written by bin_rows, read back (NaN where a bin is empty); None when there is no table."""
    from raycls.evaluate.calibration import ReliabilityBins

    path = folder / table
    if not path.is_file():
        return None
    rows = read_rows(path)
    return ReliabilityBins(
        edges=[float(rows[0]["low"])] + [float(r["high"]) for r in rows],
        confidence=[float(r["confidence"]) for r in rows],
        accuracy=[float(r["accuracy"]) for r in rows],
        count=[int(r["count"]) for r in rows],
    )


def _number(metrics: dict[str, Any], key: str) -> float | None:
    value = metrics.get(key)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _draw_confusion(folder: Path, png: Path, metrics: dict[str, Any]) -> Path:
    import torch

    from raycls.plots import confusion_png

    classes, counts = confusion(folder)  # type: ignore[misc]
    return confusion_png(torch.tensor(counts), classes, png)


def _draw_reliability(folder: Path, png: Path, metrics: dict[str, Any]) -> Path:
    from raycls.plots import reliability_diagram

    ece = _number(metrics, names.TEST_ECE)
    title = f"{metrics.get(names.EVAL_SPLIT, 'test')}: ECE {ece:.3f}" if ece is not None else ""
    return reliability_diagram(reliability(folder), png, title=title)  # type: ignore[arg-type]


def _draw_reliability_ts(folder: Path, png: Path, metrics: dict[str, Any]) -> Path:
    from raycls.plots import reliability_diagram

    t, ece = _number(metrics, names.TEST_TEMPERATURE), _number(metrics, names.TEST_ECE_TS)
    title = f"temperature {t:.2f}: ECE {ece:.3f}" if t is not None and ece is not None else ""
    return reliability_diagram(reliability(folder, RELIABILITY_TS_CSV), png, title=title)  # type: ignore[arg-type]


def _draw_confidence(folder: Path, png: Path, metrics: dict[str, Any]) -> Path:
    from raycls.plots import confidence_histogram

    rows = read_rows(folder / CONFIDENCE_CSV)
    gap = _number(metrics, names.TEST_CONF_GAP)
    return confidence_histogram(
        [float(rows[0]["low"])] + [float(r["high"]) for r in rows],
        [int(r["correct"]) for r in rows],
        [int(r["wrong"]) for r in rows],
        png,
        title=f"{metrics.get(names.EVAL_SPLIT, 'test')}: confidence of correct vs wrong"
        + (f" (gap {gap:.3f})" if gap is not None else ""),
    )


FIGURES.register("confusion_matrix")(Figure(CONFUSION_CSV, _draw_confusion))
FIGURES.register("reliability")(Figure(RELIABILITY_CSV, _draw_reliability))
FIGURES.register("reliability_ts")(Figure(RELIABILITY_TS_CSV, _draw_reliability_ts))
FIGURES.register("confidence_histogram")(Figure(CONFIDENCE_CSV, _draw_confidence))


def draw_figures(folder: Path, out: Path | None = None) -> list[Path]:
    """Every picture whose table is in the evaluation `folder` and whose PNG is in neither `folder` nor `out`,
    drawn into `out` (default: `folder`); returns every such picture's PNG, drawn now or before."""
    out = folder if out is None else out
    pngs: list[Path] = []
    metrics: dict[str, Any] | None = None  # read once, by the first picture drawn
    for name, figure in FIGURES.in_order():
        if not (folder / figure.table).is_file():
            continue
        kept = folder / f"{name}.png"
        if kept.is_file():
            pngs.append(kept)
            continue
        png = out / f"{name}.png"
        if not png.is_file():
            out.mkdir(parents=True, exist_ok=True)
            metrics = read_metrics(folder) if metrics is None else metrics
            figure.draw(folder, png, metrics)
        pngs.append(png)
    return pngs
