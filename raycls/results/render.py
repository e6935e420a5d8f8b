"""Leaderboard rows shown to a person: a rich table (the terminal, a log), csv, json (a list of row objects
keyed by column name) or markdown; and how one cell reads in any of them."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from raycls.errors import LeaderboardError
from raycls.results.leaderboard import ReadResult, param_columns, rows_as_dicts, stage_columns

if TYPE_CHECKING:  # rich is imported where a table is drawn: csv / json / markdown and the report's cells skip it
    from rich.console import Console
    from rich.table import Table

# The columns a table shows first, before each chain stage's and each sampled parameter's.
SUMMARY_COLUMNS = (
    "experiment",
    "trial_id",
    "status",
    "phase",
    "score",
    "val_acc",
    "val_loss",
    "test_acc",
    "test_ece",
    "epochs",
    "wall_s",
)
# In a log (not a terminal) a row stays on one line: these, the sort column, then the parameters.
LOG_COLUMNS = ("trial_id", "status", "score", "epochs", "wall_s")


def cell(value: Any) -> str:
    """One value as every rendering shows it: floats to 4 significant digits, None empty."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def rich_table(
    table: pa.Table, *, title: str | None = None, columns: list[str] | None = None, wrap: bool = True
) -> Table:
    from rich.table import Table

    from raycls.results.arrays import to_pylist  # table.to_pylist() would import pandas for the timestamps

    columns = columns or [c for c in SUMMARY_COLUMNS if c in table.column_names] + stage_columns(table) + param_columns(
        table
    )
    out = Table(title=title)
    for column in columns:
        out.add_column(column, overflow="fold", no_wrap=not wrap)
    for row in to_pylist(table):
        out.add_row(*(cell(row.get(c)) for c in columns))
    return out


def print_top(console: Console, read: ReadResult, sort: str, *, descending: bool, top: int) -> None:
    """The best `top` rows by `sort` (a search's closing table): every summary column on a terminal; in a log
    (CI, a scheduler's file) the key columns, one line per trial however wide, as Tune's reporter prints
    them. Every column stays in `raycls leaderboard` and its --format csv / json / markdown."""
    from raycls.results.query import top_rows

    for problem in read.skipped:
        console.print(f"[yellow]skipped[/] {problem}", highlight=False)
    if read.table.num_rows == 0:
        console.print("no trials yet")
        return
    sort = sort if sort in read.table.column_names else "score"
    rows = top_rows(read.table, sort, descending=descending, top=top)
    title = f"top {min(top, rows.num_rows)} by {sort}"
    if console.is_terminal:
        console.print(rich_table(rows, title=title))
        return
    key = [c for c in dict.fromkeys((*LOG_COLUMNS, sort)) if c in rows.column_names] + param_columns(rows)
    table = rich_table(rows, title=title, columns=key, wrap=False)
    console.print(table, width=max(console.width, console.measure(table).maximum))


def _json(table: pa.Table) -> str:
    return json.dumps(rows_as_dicts(table), indent=2, default=str) + "\n"


def _csv(table: pa.Table) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=table.column_names, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows_as_dicts(table))
    return buffer.getvalue()


def _markdown(table: pa.Table) -> str:
    def escaped(value: object) -> str:
        return cell(value).replace("|", "\\|").replace("\n", " ")

    columns = table.column_names
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(escaped(r.get(c)) for c in columns) + " |" for r in rows_as_dicts(table)]
    return "\n".join(lines) + "\n"


FORMATS: dict[str, Callable[[pa.Table], str]] = {"csv": _csv, "json": _json, "markdown": _markdown}


def render(table: pa.Table, fmt: str) -> str:
    """`table` as text in `fmt` (csv, json or markdown; `table` is `rich_table`'s)."""
    if fmt not in FORMATS:
        known = ["table", *FORMATS]
        raise LeaderboardError(f"--format {fmt!r}: expected {', '.join(known[:-1])} or {known[-1]}")
    return FORMATS[fmt](table)
