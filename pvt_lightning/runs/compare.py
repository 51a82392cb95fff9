"""Reading runs back: run directories, ``summary.json``, TensorBoard scalars, and the practitioner's table.

A run directory is any folder under a logdir holding ``summary.json`` (written by ``run.py`` at the
end of training) and/or TensorBoard event files (so interrupted runs still show up, from their
events). ``experiments/compare.py`` and the notebooks build on these functions.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Iterable, Sequence

from pvt_lightning.models.registry import is_pvt_v2, variant_label
from pvt_lightning.runs.tables import markdown_table, write_csv as write_table_csv
from pvt_lightning.tags import (MEMORY_TAGS, PER_CLASS_PREFIXES, POSITIVE_PREFIXES, PRECISION, TIME_TAG, VAL_ACC,
                                VAL_PRECISION, VAL_RECALL, memory_device, parse_recall_at_precision,
                                positive_class_tags, precision_label, recall_at_precision_tag)

SUMMARY_FILE = "summary.json"
EVENTS_GLOB = "events.out.tfevents.*"
METRICS_CSV = "metrics.csv"
"""What ``--logger csv`` writes instead of event files (Lightning's CSVLogger)."""

COLUMNS = ("run", "model", "input", "params_m", "gmacs", "epoch_time_s", "peak_memory_mb", "memory_device",
           "precision", "recall", "pr_of", "accuracy", "best_epoch", "epochs", "batch_size", "devices",
           "recall_at_precision", "at_precision", "recall_at_precision_of", "inference_img_s", "batch1_img_s",
           "latency_ms_p50", "latency_ms_p90", "inference_device")
"""Keys of a ``runs_table`` row; ``pr_of`` is "macro" or the positive class the precision/recall are of;
``recall_at_precision`` is the recall at precision ``at_precision`` (the run's first ``--report-precision``) of
``recall_at_precision_of`` (likewise); ``inference_*``, ``batch1_img_s`` and ``latency_*`` come from
summary.json's ``inference`` block (measured where the run trained)."""

Series = list[tuple[int, float]]


def find_runs(logdir: str | Path, filter: str | None = None) -> list[Path]:
    """Run directories under ``logdir`` (sorted), keeping those whose path below it contains ``filter``."""
    logdir = Path(logdir)
    if not logdir.is_dir():
        raise FileNotFoundError(f"log directory {logdir} does not exist; pass the --logdir your runs were written to")
    candidates = {path.parent for path in logdir.rglob(SUMMARY_FILE)}
    candidates |= {path.parent for path in logdir.rglob(EVENTS_GLOB)}
    candidates |= {path.parent for path in logdir.rglob(METRICS_CSV)}
    runs = sorted(candidates)
    if filter:
        runs = [run for run in runs if filter in run.relative_to(logdir).as_posix()]
    return runs


def load_summary(run_dir: str | Path) -> dict[str, Any]:
    """The run's ``summary.json``, or an empty dict for a run that did not finish."""
    path = Path(run_dir) / SUMMARY_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def load_scalars(run_dir: str | Path, tags: Iterable[str] | None = None) -> dict[str, Series]:
    """Every (or the given) scalar tag of the run's event files (or metrics.csv), as ``[(step, value), ...]``."""
    if not list(Path(run_dir).glob(EVENTS_GLOB)) and (Path(run_dir) / METRICS_CSV).is_file():
        return _csv_scalars(Path(run_dir) / METRICS_CSV, tags)
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    accumulator = EventAccumulator(str(run_dir), size_guidance={SCALARS: 0}).Reload()  # 0: keep every point
    available = accumulator.Tags()["scalars"]
    wanted = available if tags is None else [tag for tag in tags if tag in available]
    return {tag: sorted((event.step, event.value) for event in accumulator.Scalars(tag)) for tag in wanted}


def _csv_scalars(path: Path, tags: Iterable[str] | None) -> dict[str, Series]:
    """Lightning's metrics.csv: one row per logging call, the step in ``step``, blanks where a tag was not logged."""
    series: dict[str, Series] = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            step = int(float(row["step"]))
            for tag, value in row.items():
                if tag not in ("step", "epoch") and value not in ("", None):
                    series.setdefault(tag, []).append((step, float(value)))
    wanted = series if tags is None else [tag for tag in tags if tag in series]
    return {tag: sorted(series[tag]) for tag in wanted}


def epoch_series(scalars: dict[str, Series], tag: str) -> Series:
    """``(epoch, value)`` points of ``tag``: every pvt-lightning scalar is written at step = epoch."""
    return scalars.get(tag, [])


def model_name(variant: str, linear_sra: bool | None) -> str:
    """The seed table's model names: ``pvt_v2_b5``, ``pvt_v2_b0_li`` (linear SRA on), ``resnet50``."""
    try:
        label, pvt = variant_label(variant, linear_sra), is_pvt_v2(variant)
    except ValueError:  # a variant this version does not know: shown as recorded
        return variant
    return f"pvt_v2_{label}" if pvt else label


def _last(series: Series) -> float | None:
    return series[-1][1] if series else None


def _positive_tags(scalars: dict[str, Series], positive_class: str | None) -> tuple[str, str] | None:
    """The ``val/positive/{precision,recall}/<class>`` tags of the run, if it had a positive class."""
    prefix = POSITIVE_PREFIXES[PRECISION]
    names = [positive_class] if positive_class else sorted(
        tag[len(prefix):] for tag in scalars if tag.startswith(prefix))
    for name in names[:1]:
        pair = positive_class_tags(name)
        if all(tag in scalars for tag in pair):
            return pair
    return None


def run_row(run_dir: str | Path, logdir: str | Path | None = None) -> dict[str, Any]:
    """One table row: figures from ``summary.json`` where the run has one, from its events otherwise."""
    run_dir = Path(run_dir)
    summary = load_summary(run_dir)
    scalars = load_scalars(run_dir)
    metrics = summary.get("metrics") or {tag: _last(epoch_series(scalars, tag)) for tag in
                                         (VAL_ACC, VAL_PRECISION, VAL_RECALL)}
    accuracy = epoch_series(scalars, VAL_ACC)
    memory_tag = next((tag for tag in MEMORY_TAGS if tag in scalars), None)
    img_size = summary.get("img_size")
    row = {
        "run": run_dir.relative_to(logdir).as_posix() if logdir else run_dir.as_posix(),
        "model": model_name(summary["variant"], summary.get("linear_sra")) if "variant" in summary else None,
        "input": f"{img_size[0]}x{img_size[1]}" if img_size else None,
        "params_m": summary.get("params_m"),
        "gmacs": summary.get("gmacs"),
        "epoch_time_s": summary.get("epoch_time_s"),
        "peak_memory_mb": summary.get("peak_memory_mb"),
        "memory_device": summary.get("memory_device"),
        "precision": metrics.get(VAL_PRECISION),
        "recall": metrics.get(VAL_RECALL),
        "pr_of": "macro",
        "accuracy": metrics.get(VAL_ACC),
        "best_epoch": (summary.get("best") or {}).get("epoch"),
        "epochs": summary.get("epochs"),
    }
    if not summary:  # an unfinished run: what its events say
        times = [value for _, value in scalars.get(TIME_TAG, [])]
        best = max(accuracy, key=lambda point: point[1]) if accuracy else None
        row.update(
            epoch_time_s=sum(times) / len(times) if times else None,
            peak_memory_mb=max(value for _, value in scalars[memory_tag]) if memory_tag else None,
            memory_device=None if memory_tag is None else memory_device(memory_tag),
            best_epoch=best[0] if best else None,
            epochs=len(accuracy) or None,
        )
    positive = _positive_tags(scalars, summary.get("positive_class"))
    if positive:
        row.update(precision=_last(scalars[positive[0]]), recall=_last(scalars[positive[1]]),
                   pr_of=positive[0].rsplit("/", 1)[1])
    inference = summary.get("inference") or {}
    row.update(batch_size=summary.get("batch_size"), devices=summary.get("world_size"),
               **recall_at_fixed_precision(summary, scalars, summary.get("positive_class") or (
                   positive[0].rsplit("/", 1)[1] if positive else None)),
               inference_img_s=inference.get("img_s"), batch1_img_s=inference.get("batch1_img_s"),
               latency_ms_p50=inference.get("latency_ms_p50"), latency_ms_p90=inference.get("latency_ms_p90"),
               inference_device=inference.get("device"))
    return row


def first_precision(summary: dict[str, Any], scalars: dict[str, Series]) -> float | None:
    """The precision a run's recall-at-precision figures are compared at: its first ``--report-precision``
    (summary.json), else the lowest it logged; None if it logged none."""
    precisions = (summary.get("recall_at_precision") or {}).get("precisions") or sorted(
        {parsed[0] for tag in [*(summary.get("metrics") or {}), *scalars]
         if (parsed := parse_recall_at_precision(tag))})
    return float(precisions[0]) if precisions else None


def recall_at_fixed_precision(summary: dict[str, Any], scalars: dict[str, Series],
                              positive_class: str | None) -> dict[str, Any]:
    """The row's ``recall_at_precision``, ``at_precision`` and ``recall_at_precision_of``: at the run's first
    reported precision (summary.json's, else the lowest logged), of the positive class where the run had one,
    else macro; from summary.json's final ``metrics``, else the last logged value."""
    metrics = summary.get("metrics") or {}
    p = first_precision(summary, scalars)
    if p is None:
        return {"recall_at_precision": None, "at_precision": None, "recall_at_precision_of": None}
    for of in ([positive_class] if positive_class else []) + [None]:
        tag = recall_at_precision_tag(p, of)
        value = metrics.get(tag, _last(epoch_series(scalars, tag)))
        if value is not None:
            return {"recall_at_precision": value, "at_precision": p, "recall_at_precision_of": of or "macro"}
    return {"recall_at_precision": None, "at_precision": p, "recall_at_precision_of": None}


def runs_table(logdir: str | Path, filter: str | None = None) -> list[dict[str, Any]]:
    """One row per run under ``logdir`` (keys: ``COLUMNS``), in path order."""
    return [run_row(run, logdir) for run in find_runs(logdir, filter)]


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _memory(row: dict[str, Any]) -> str:
    if row["peak_memory_mb"] is None:
        return "-"
    where = {"cuda": "GPU", "cpu": "CPU"}.get(row["memory_device"], "")
    return f"{row['peak_memory_mb']:.0f} MB {where}".rstrip()


def _batch(row: dict[str, Any]) -> str:
    if row.get("batch_size") is None:
        return "-"
    return f"{row['batch_size']} x {row['devices'] if row.get('devices') is not None else '?'}"


def _at_precision(row: dict[str, Any]) -> str:
    """``87.5 @P0.90`` (macro) or ``87.5 @P0.90 (cat)`` (the positive class)."""
    if row.get("recall_at_precision") is None:
        return "-"
    text = f"{_percent(row['recall_at_precision'])} @P{precision_label(row['at_precision'])}"
    return text if row["recall_at_precision_of"] == "macro" else f"{text} ({row['recall_at_precision_of']})"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}" if value < 100 else f"{value:.0f}"


def display_rows(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and formatted cells of the practitioner's table (percentages, minutes, MB, images/s, ms)."""
    header = ["model", "input", "batch x devices", "time / epoch", "peak memory", "precision / recall",
              "recall @ precision", "accuracy", "inference img/s", "batch-1 latency", "params (M)", "GMACs",
              "best epoch", "run"]
    cells = []
    for row in rows:
        pr = f"{_percent(row['precision'])} / {_percent(row['recall'])}"
        if row["pr_of"] != "macro":
            pr += f" ({row['pr_of']})"
        latency = row.get("latency_ms_p50")
        cells.append([
            row["model"] or "?", row["input"] or "?", _batch(row),
            _duration(row["epoch_time_s"]), _memory(row), pr, _at_precision(row), _percent(row["accuracy"]),
            _rate(row.get("inference_img_s")), "-" if latency is None else f"{latency:.1f} ms",
            "-" if row["params_m"] is None else f"{row['params_m']:.2f}",
            "-" if row["gmacs"] is None else f"{row['gmacs']:.3f}",
            "-" if row["best_epoch"] is None else str(row["best_epoch"]), row["run"],
        ])
    return header, cells


def format_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The table as GitHub Markdown."""
    header, cells = display_rows(rows)
    return markdown_table(cells, header, fmt=str)


def format_text(rows: Sequence[dict[str, Any]]) -> str:
    """The table with aligned columns, for a terminal."""
    header, cells = display_rows(rows)
    widths = [max(len(line[i]) for line in [header, *cells]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip()
                     for line in [header, *cells]) + "\n"


def write_csv(rows: Sequence[dict[str, Any]], path: str | Path) -> None:
    """Raw numbers (fractions, seconds, MB), one row per run, columns ``COLUMNS``."""
    write_table_csv(rows, path, COLUMNS)


def plot_runs(logdir: str | Path, tags: Sequence[str], out_path: str | Path, filter: str | None = None) -> list[str]:
    """One PNG with a panel per tag (those any run has), one line per run against the epoch.

    Returns the tags plotted; an empty list means no run had any of them and nothing was written.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    runs = find_runs(logdir, filter)
    series = {run.relative_to(logdir).as_posix(): load_scalars(run) for run in runs}
    present = [tag for tag in tags if any(tag in scalars for scalars in series.values())]
    if not present:
        return []
    figure = Figure(figsize=(6 * len(present), 4), dpi=100)
    for i, tag in enumerate(present):
        ax = figure.add_subplot(1, len(present), i + 1)
        for name, scalars in series.items():
            points = epoch_series(scalars, tag)
            if points:
                ax.plot([epoch for epoch, _ in points], [value for _, value in points], marker="o", label=name)
        ax.set_title(tag)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(out_path)
    return present


# --- per-class precision and recall --------------------------------------------------------------------------

PER_CLASS_COLUMNS = ("run", "class", "precision", "recall", "recall_at_precision", "at_precision")
PER_CLASS_LABELS = {"precision": "P", "recall": "R", "recall_at_precision": "R@P"}


def per_class_values(run_dir: str | Path, scalars: dict[str, Series] | None = None) -> dict[str, dict[str, float]]:
    """``{class: {"precision": p, "recall": r, "recall_at_precision": q, "at_precision": P}}`` at the run's last
    validated epoch, in its class order (the last two where the run logged recall at a fixed precision)."""
    scalars = load_scalars(run_dir) if scalars is None else scalars
    summary = load_summary(run_dir)
    prefixes = dict(PER_CLASS_PREFIXES)
    at = first_precision(summary, scalars)
    if at is not None:
        prefixes["recall_at_precision"] = recall_at_precision_tag(at) + "/"
    values: dict[str, dict[str, float]] = {}
    for metric, prefix in prefixes.items():
        for tag, series in scalars.items():
            if tag.startswith(prefix) and series:
                values.setdefault(tag[len(prefix):], {})[metric] = series[-1][1]
                if metric == "recall_at_precision":
                    values[tag[len(prefix):]]["at_precision"] = at
    order = summary.get("class_names") or sorted(values)
    return {name: values[name] for name in order if name in values}


def per_class_groups(logdir: str | Path, filter: str | None = None) -> list[dict[str, Any]]:
    """Runs grouped by dataset (same class names): ``[{"classes": [...], "runs": {run: {class: {...}}}}]``.

    Runs without per-class scalars (trained without the report callback) are left out.
    """
    groups: dict[tuple[str, ...], dict[str, Any]] = {}
    for run in find_runs(logdir, filter):
        values = per_class_values(run)
        if values:
            group = groups.setdefault(tuple(values), {"classes": list(values), "runs": {}})
            group["runs"][run.relative_to(logdir).as_posix()] = values
    return list(groups.values())


def per_class_rows(group: dict[str, Any], limit: int | None = None) -> tuple[list[str], list[list[str]], bool]:
    """Header and cells of one group's table: a row per class, precision and recall (%) per run.

    With ``limit`` and more classes than that, the ``limit`` classes with the lowest recall in any run
    (the rare and hard ones), worst first; the flag says whether rows were left out.
    """
    runs = group["runs"]
    classes = group["classes"]
    cut = limit is not None and len(classes) > limit
    if cut:
        def worst(name: str) -> float:
            return min(v[name].get("recall", float("inf")) for v in runs.values())

        classes = sorted(classes, key=worst)[:limit]
    shown = {run: [m for m in PER_CLASS_LABELS if any(m in v for v in values.values())] for run, values in runs.items()}
    header = ["class"] + [f"{_per_class_label(metric, runs[run])} {run}" for run in runs for metric in shown[run]]
    cells = [[name] + [_percent(runs[run][name].get(metric)) for run in runs for metric in shown[run]]
             for name in classes]
    return header, cells, cut


def _per_class_label(metric: str, values: dict[str, dict[str, float]]) -> str:
    """P, R, or R@P0.90 (the run's precision)."""
    at = next((v["at_precision"] for v in values.values() if "at_precision" in v), None)
    return PER_CLASS_LABELS[metric] + (precision_label(at) if metric == "recall_at_precision" else "")


def format_per_class_markdown(groups: Sequence[dict[str, Any]]) -> str:
    """One Markdown table per dataset, every class."""
    parts = []
    for group in groups:
        header, cells, _ = per_class_rows(group)
        title = (f"{len(group['runs'])} runs on {len(group['classes'])} classes "
                 f"({', '.join(group['classes'][:5])}{', ...' if len(group['classes']) > 5 else ''}); "
                 "precision / recall (and recall at a fixed precision) in % at the last validated epoch")
        parts.append(title + "\n\n" + markdown_table(cells, header, fmt=str))
    return "\n".join(parts)


def format_per_class_text(groups: Sequence[dict[str, Any]], limit: int = 30) -> str:
    """Aligned tables for a terminal, at most ``limit`` classes each (the lowest recall first)."""
    parts = []
    for group in groups:
        header, cells, cut = per_class_rows(group, limit)
        widths = [max(len(line[i]) for line in [header, *cells]) for i in range(len(header))]
        title = f"per class, {len(group['runs'])} runs on {len(group['classes'])} classes"
        title += f" (the {limit} with the lowest recall shown; all in per_class.md)" if cut else ""
        rows = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in [header, *cells]]
        parts.append("\n".join([title, *rows]) + "\n")
    return "\n".join(parts)


def write_per_class_csv(groups: Sequence[dict[str, Any]], path: str | Path) -> None:
    """Long format, raw fractions: one row per run and class, columns ``PER_CLASS_COLUMNS``."""
    rows = [{"run": run, "class": name, **metrics}
            for group in groups for run, values in group["runs"].items() for name, metrics in values.items()]
    write_table_csv(rows, path, PER_CLASS_COLUMNS)
