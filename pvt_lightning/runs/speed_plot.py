"""The practitioner's trade-off plot: recall at a fixed precision against inference speed, one point per run.

Reads ``runs_table`` rows (``runs/compare.py``): ``recall_at_precision`` at ``at_precision`` (macro or the
positive class) and ``inference_img_s`` at the run's training batch size, as summary.json recorded them where
each run was trained (so points measured on different devices are labelled with theirs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from pvt_lightning.tags import precision_label


def plottable(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows that have both a recall at a fixed precision and an inference speed."""
    return [row for row in rows if row.get("recall_at_precision") is not None and row.get("inference_img_s")]


def point_label(row: dict[str, Any]) -> str:
    """``pvt_v2_b0 32x32 (cat)``: model, input and, where it is not macro, the class the recall is of."""
    label = f"{row.get('model') or row['run']} {row.get('input') or ''}".strip()
    of = row.get("recall_at_precision_of")
    return label if of in (None, "macro") else f"{label} ({of})"


def plot_recall_vs_speed(rows: Sequence[dict[str, Any]], out_path: str | Path) -> bool:
    """A PNG: x inference images/s (log scale), y recall (%) at the fixed precision, one labelled point per run.

    Returns False (and writes nothing) when no run has both figures.
    """
    from matplotlib.figure import Figure

    points = plottable(rows)
    if not points:
        return False
    figure = Figure(figsize=(7, 5), dpi=100)
    ax = figure.add_subplot(1, 1, 1)
    for row in points:
        x, y = row["inference_img_s"], 100 * row["recall_at_precision"]
        ax.scatter([x], [y], s=40)
        ax.annotate(point_label(row), (x, y), textcoords="offset points", xytext=(5, 4), fontsize="small")
    _log_x(ax)
    ax.margins(x=0.3, y=0.15)  # room for the labels right of the points
    precisions = sorted({precision_label(row["at_precision"]) for row in points})
    devices = sorted({str(row.get("inference_device") or "?") for row in points})
    batches = sorted({str(row.get("batch_size") or "?") for row in points})
    ax.set_xlabel(f"inference images/s at the training batch ({', '.join(batches)}; log scale) on "
                  f"{', '.join(devices)}")
    ax.set_ylabel(f"recall (%) at precision {' / '.join(precisions)}")
    ax.set_title("recall at a fixed precision vs inference speed (one point per run)")
    ax.grid(alpha=0.3, which="both")
    figure.tight_layout()
    figure.savefig(out_path)
    return True


def _log_x(ax) -> None:
    """Log x with plain numbers (1, 2, 5 per decade), no minor labels."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
