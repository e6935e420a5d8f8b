"""The Pareto front of a multi-objective experiment, marked on its leaderboard rows when they are read.

A row cannot carry its own front membership when it is written (the next trial may dominate it), so the
front is computed from the rows on every read: `pareto` (on the front) and `pareto_rank` (0 on the front,
1 on the front of the rest, ...: non-dominated sorting, as NSGA-II ranks). Only completed trials with every
objective are ranked; early-stopped and failed trials get nulls (Optuna did not count them either).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from raycls.ranking import Ranking
from raycls.results.arrays import bools, int64s

OBJECTIVES = "objectives"  # the row's column: "test_acc:max,params:min"
PARETO = "pareto"
PARETO_RANK = "pareto_rank"


def format_objectives(objectives: Sequence[tuple[str, str]]) -> str | None:
    return ",".join(f"{metric}:{mode}" for metric, mode in objectives) or None


def parse_objectives(text: str | None) -> list[tuple[str, str]]:
    return [tuple(part.rsplit(":", 1)) for part in text.split(",")] if text else []  # type: ignore[misc]


def non_dominated_ranks(losses: np.ndarray) -> np.ndarray:
    """Front index of each row of `losses` [n, k] (every column: smaller is better). Row i dominates row j
    when it is no worse in every column and better in one; rank 0 is dominated by none."""
    n = len(losses)
    ranks = np.full(n, -1, dtype=np.int64)
    left = np.arange(n)
    rank = 0
    while left.size:
        points = losses[left]
        no_worse = (points[:, None, :] <= points[None, :, :]).all(axis=2)  # [j, i]: j no worse than i
        better = (points[:, None, :] < points[None, :, :]).any(axis=2)
        dominated = (no_worse & better).any(axis=0)
        ranks[left[~dominated]] = rank
        left = left[dominated]
        rank += 1
    return ranks


def mark_pareto(table: pa.Table) -> pa.Table:
    """`table` with `pareto` and `pareto_rank` columns, per experiment, when any row has objectives."""
    if OBJECTIVES not in table.column_names or table.column(OBJECTIVES).null_count == table.num_rows:
        return table
    rows = table.select([c for c in ("experiment", "status", OBJECTIVES) if c in table.column_names]).to_pylist()
    ranks: list[int | None] = [None] * table.num_rows
    groups: dict[tuple[str, str], list[int]] = {}
    for index, row in enumerate(rows):
        if row.get(OBJECTIVES) and row.get("status") == "completed":
            groups.setdefault((row["experiment"], row[OBJECTIVES]), []).append(index)
    for (_, text), indices in groups.items():
        objectives = parse_objectives(text)
        if not all(metric in table.column_names for metric, _ in objectives):
            continue
        columns = [table.column(metric).to_pylist() for metric, _ in objectives]
        ranked = [i for i in indices if all(_finite(column[i]) for column in columns)]
        if not ranked:
            continue
        rankings = [Ranking.of(metric, mode) for metric, mode in objectives]
        losses = np.array([[-rankings[k].signed(float(columns[k][i])) for k in range(len(objectives))] for i in ranked])
        for i, rank in zip(ranked, non_dominated_ranks(losses)):
            ranks[i] = int(rank)
    # Built without pa.array, which imports pandas (raycls.results.arrays): every leaderboard read comes here.
    table = table.append_column(PARETO, bools([None if r is None else r == 0 for r in ranks]))
    return table.append_column(PARETO_RANK, int64s(ranks))


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)
