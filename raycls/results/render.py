"""Leaderboard rows as csv, json (a list of row objects keyed by column name) or markdown."""

from __future__ import annotations

import csv
import io
import json

import pyarrow as pa

from raycls.errors import LeaderboardError
from raycls.results.leaderboard import rows_as_dicts


def render(table: pa.Table, fmt: str) -> str:
    rows = rows_as_dicts(table)
    columns = table.column_names
    if fmt == "json":
        return json.dumps(rows, indent=2, default=str) + "\n"
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buffer.getvalue()
    if fmt == "markdown":

        def cell(value: object) -> str:
            text = "" if value is None else (f"{value:.4g}" if isinstance(value, float) else str(value))
            return text.replace("|", "\\|").replace("\n", " ")

        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
        return "\n".join(lines) + "\n"
    raise LeaderboardError(f"--format {fmt!r}: expected table, csv, json or markdown")
