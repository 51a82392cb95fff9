"""Result tables: CSV files and GitHub-markdown tables from rows of dicts."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence


def format_cell(value: Any) -> str:
    """'-' for missing values; floats with 3 decimals below 10, 1 above."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def markdown_table(rows: Sequence[Mapping[str, Any]] | Sequence[Sequence[Any]], columns: Sequence[str],
                   fmt: Callable[[Any], str] = format_cell) -> str:
    """A markdown table with header ``columns``; a row is a mapping (read by column) or a sequence of cells."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [row.get(c) for c in columns] if isinstance(row, Mapping) else list(row)
        lines.append("| " + " | ".join(fmt(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(rows: Sequence[Mapping[str, Any]], path: str | Path, columns: Sequence[str] | None = None) -> Path:
    """``rows`` as CSV with ``columns`` (default: the first row's keys); missing and None values are empty cells."""
    columns = list(columns) if columns is not None else list(rows[0]) if rows else []
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: "" if row.get(c) is None else row[c] for c in columns})
    return Path(path)
