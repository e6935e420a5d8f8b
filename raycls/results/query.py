"""Leaderboard queries: `--where`, `--sort`, `--top`, or full SQL, through DuckDB over the Arrow table.

DuckDB (rather than a hand-written filter language) because users already know SQL, and `--sql` then gives
them joins and aggregates across experiments for free. Column names with dots (`train.lr`) may be written
bare in `--where` and `--sort`; they are quoted before DuckDB sees them.
"""

from __future__ import annotations

import re

import pyarrow as pa

from raycls.errors import LeaderboardError

TABLE = "leaderboard"


def quote_dotted(expression: str, columns: list[str]) -> str:
    """Quote bare column names that SQL would misread (dots, `@`) outside string literals:
    train.lr < 0.1 -> "train.lr" < 0.1; val_recall@1 > 0.9 -> "val_recall@1" > 0.9."""
    dotted = sorted((c for c in columns if not c.isidentifier()), key=len, reverse=True)
    if not dotted:
        return expression
    pattern = re.compile(r'(?<![\w."])(' + "|".join(re.escape(c) for c in dotted) + r')(?![\w"])')
    parts = re.split(r"('(?:[^']|'')*')", expression)  # keep quoted strings as they are
    return "".join(part if i % 2 else pattern.sub(r'"\1"', part) for i, part in enumerate(parts))


def top_rows(table: pa.Table, sort: str, *, descending: bool = True, top: int | None = None) -> pa.Table:
    """Sort and cut without DuckDB (the tune driver prints its summary with this: no SQL engine needed)."""
    rows = table.sort_by([(sort, "descending" if descending else "ascending")])  # nulls last
    return rows.slice(0, top) if top is not None else rows


def run_sql(table: pa.Table, sql: str) -> pa.Table:
    import duckdb

    connection = duckdb.connect()
    try:
        connection.register(TABLE, table)
        relation = connection.sql(sql)
        if relation is None:  # a statement that returns no rows
            return pa.table({})
        # DuckDB 2 renamed fetch_arrow_table to to_arrow_table.
        fetch = getattr(relation, "to_arrow_table", None) or relation.fetch_arrow_table
        return fetch()
    except duckdb.Error as err:
        raise LeaderboardError(f"query failed: {str(err).splitlines()[0]}\n  SQL: {sql}") from None
    finally:
        connection.close()


def select(
    table: pa.Table,
    *,
    where: str | None = None,
    sort: str | None = None,
    descending: bool = True,
    top: int | None = None,
) -> pa.Table:
    columns = table.column_names
    if sort and sort not in columns:
        raise LeaderboardError(f"--sort {sort!r}: no such column; columns: {', '.join(columns)}")
    if not where:  # no SQL to run: Arrow sorts and cuts (importing DuckDB costs more than the query)
        return top_rows(table, sort, descending=descending, top=top) if sort else table.slice(0, top)
    sql = f"SELECT * FROM {TABLE}"
    if where:
        sql += f" WHERE {quote_dotted(where, columns)}"
    if sort:
        sql += f' ORDER BY "{sort}" {"DESC" if descending else "ASC"} NULLS LAST'
    if top is not None:
        sql += f" LIMIT {int(top)}"
    return run_sql(table, sql)
