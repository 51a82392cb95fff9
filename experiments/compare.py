"""Compare runs: the seed's table (model, input, params, GMACs, time/epoch, memory, P/R, accuracy) and plots.

    python experiments/compare.py --logdir runs [--filter b2] [--out compare_out] [--per-class]

Prints the table, writes ``runs.md`` and ``runs.csv`` and PNG plots of val/acc, val/recall and
peak memory per epoch into ``--out``. ``--per-class`` adds a second table per dataset (runs with the
same classes): each class's precision and recall in every run, from the ``val/precision/<class>`` and
``val/recall/<class>`` scalars of the last validated epoch, as ``per_class.md`` and ``per_class.csv``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pvt_lightning.runs.compare import (
    MEMORY_TAGS,
    format_markdown,
    format_per_class_markdown,
    format_per_class_text,
    format_text,
    per_class_groups,
    plot_runs,
    runs_table,
    write_csv,
    write_per_class_csv,
)

PLOTS = {"val_acc.png": ("val/acc",), "val_recall.png": ("val/recall",), "memory.png": MEMORY_TAGS}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--logdir", default="runs", help="folder holding the runs (searched recursively)")
    parser.add_argument("--filter", default=None, help="keep runs whose path below --logdir contains this text")
    parser.add_argument("--out", default="compare_out", help="folder for runs.md, runs.csv and the PNG plots")
    parser.add_argument("--per-class", action="store_true",
                        help="also compare precision/recall class by class (runs grouped by their class names)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logdir = Path(args.logdir)
    try:
        rows = runs_table(logdir, args.filter)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not rows:
        which = f" matching --filter {args.filter!r}" if args.filter else ""
        print(f"error: no runs{which} under {logdir} (a run is a folder with summary.json or TensorBoard "
              f"event files); train one with `python experiments/run.py` or point --logdir at your runs",
              file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(format_text(rows), end="")
    (out / "runs.md").write_text(format_markdown(rows))
    write_csv(rows, out / "runs.csv")
    written = [name for name, tags in PLOTS.items() if plot_runs(logdir, tags, out / name, args.filter)]
    if args.per_class:
        groups = per_class_groups(logdir, args.filter)
        if groups:
            print("\n" + format_per_class_text(groups), end="")
            (out / "per_class.md").write_text(format_per_class_markdown(groups))
            write_per_class_csv(groups, out / "per_class.csv")
            written = ["per_class.md", "per_class.csv", *written]
        else:
            print("\nno per-class scalars (val/precision/<class>) in these runs; --per-class needs runs trained with "
                  "pvt-lightning's default callbacks", file=sys.stderr)
    print(f"\n{len(rows)} runs; wrote runs.md, runs.csv{''.join(', ' + name for name in written)} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
