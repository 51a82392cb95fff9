"""``pvt-lightning compare``: the runs under a folder side by side, as a table (text, Markdown, CSV) and plots.

Prints the practitioner's table (model, input, batch x devices, time per epoch, peak memory, precision /
recall, recall at a fixed precision, accuracy, inference images/s and batch-1 latency, params, GMACs),
writes ``runs.md`` and ``runs.csv``, PNG plots of val/acc, val/recall and peak memory per epoch, and
``recall_vs_speed.png`` (recall at the fixed precision against inference speed, a point per run) into
``--out``. ``--per-class`` adds a table per dataset (runs with the same classes): each class's
precision and recall in every run, from the last validated epoch, as ``per_class.md`` and ``per_class.csv``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from pvt_lightning.cli.options import option
from pvt_lightning.errors import UsageError
from pvt_lightning.runs.compare import (format_markdown, format_per_class_markdown, format_per_class_text,
                                        format_text, per_class_groups, plot_runs, runs_table, write_csv,
                                        write_per_class_csv)
from pvt_lightning.runs.speed_plot import plot_recall_vs_speed
from pvt_lightning.tags import MEMORY_TAGS, VAL_ACC, VAL_RECALL

PLOTS = {"val_acc.png": (VAL_ACC,), "val_recall.png": (VAL_RECALL,), "memory.png": MEMORY_TAGS}
SPEED_PLOT = "recall_vs_speed.png"


@dataclass
class CompareConfig:
    """Which runs to compare and where the table and plots go."""

    logdir: str = option("runs", "folder holding the runs (searched recursively)", "compare")
    filter: Optional[str] = option(None, "keep runs whose path below --logdir contains this text", "compare")
    out: str = option("compare_out", "folder for runs.md, runs.csv and the PNG plots", "compare")
    per_class: bool = option(False, "also compare precision/recall class by class (runs grouped by their class "
                             "names)", "compare")


CONFIG = CompareConfig


def run(config: CompareConfig) -> int:
    logdir = Path(config.logdir).expanduser()
    try:
        rows = runs_table(logdir, config.filter)
    except FileNotFoundError as error:
        raise UsageError(f"--logdir {logdir}: {error}") from None
    if not rows:
        which = f" matching --filter {config.filter!r}" if config.filter else ""
        raise UsageError(f"no runs{which} under {logdir} (a run is a folder with summary.json or TensorBoard event "
                         "files); train one with `pvt-lightning train` or point --logdir at your runs")
    out = Path(config.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    print(format_text(rows), end="")
    (out / "runs.md").write_text(format_markdown(rows))
    write_csv(rows, out / "runs.csv")
    written = [name for name, tags in PLOTS.items() if plot_runs(logdir, tags, out / name, config.filter)]
    if plot_recall_vs_speed(rows, out / SPEED_PLOT):
        written.append(SPEED_PLOT)
    if config.per_class:
        written = per_class_tables(logdir, config.filter, out) + written
    print(f"\n{len(rows)} runs; wrote runs.md, runs.csv{''.join(', ' + name for name in written)} to {out}")
    return 0


def per_class_tables(logdir: Path, filter: str | None, out: Path) -> list[str]:
    """Print and write the per-class tables; the names of the files written (none without per-class scalars)."""
    groups = per_class_groups(logdir, filter)
    if not groups:
        print("\nno per-class scalars (val/precision/<class>) in these runs; --per-class needs runs trained with "
              "pvt-lightning's default callbacks")
        return []
    print("\n" + format_per_class_text(groups), end="")
    (out / "per_class.md").write_text(format_per_class_markdown(groups))
    write_per_class_csv(groups, out / "per_class.csv")
    return ["per_class.md", "per_class.csv"]
