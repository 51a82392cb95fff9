"""Linear SRA on vs off for one variant: a sweep over input sizes, where it starts paying off, plots.

The reusable part of ``notebooks/linear_sra_ablation.ipynb`` (and of ``compare_runs.ipynb``'s
tiny runs). Speed comes from ``bench.timing`` (the two models measured interleaved, so drift of a
shared machine hits both alike); trainings go through the project's CLI in a subprocess, so they
write ordinary run directories that ``pvt_lightning.runs.compare`` reads back.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from pvt_lightning.models import create_model, measure_complexity
from tools.bench.memory import child_env, measure_peak_memory_here, release_memory, run_worker
from pvt_lightning.runs.tables import markdown_table, write_csv
from tools.bench.timing import compare_step_times, paired_speed_ratio

Size = tuple[int, int]
SIZES: tuple[Size, ...] = ((224, 224), (384, 224), (448, 448), (512, 512), (640, 640), (768, 768), (1024, 1024))
"""The sweep's default input sizes (H, W): 224 up to 1024, plus the seed's non-square 384x224."""

METRICS = {  # metric -> (label with unit, higher is better)
    "gmacs": ("GMACs per image", False),
    "params_m": ("parameters (M)", False),
    "infer_img_s": ("inference throughput (images/s)", True),
    "train_img_s": ("training throughput (images/s)", True),
    "infer_mem_mb": ("inference peak memory above baseline (MB)", False),
    "train_mem_mb": ("training peak memory above baseline (MB)", False),
}
"""The per-size figures of a sweep row; memory is the peak minus what the process held before the steps
(model, gradients, optimizer state), i.e. what the forward/backward pass of the batch itself needs."""


def size_label(size: Size) -> str:
    return f"{size[0]}x{size[1]}"


def default_variant() -> str:
    """b2 (the paper's linear-SRA model is b2_li) when a GPU is there; b0 on a CPU, where b2 is slow."""
    return "b2" if torch.cuda.is_available() else "b0"


def set_threads(threads: int | None) -> int:
    """Use ``threads`` CPU threads here and in the subprocesses this module starts (None: leave as is).

    On a CPU shared with other jobs, fewer threads than cores keeps OpenMP threads from waiting on
    each other while descheduled. Returns the count in use.
    """
    if threads:
        torch.set_num_threads(int(threads))
        os.environ["OMP_NUM_THREADS"] = str(int(threads))
    return torch.get_num_threads()


def build_pair(variant: str, num_classes: int = 1000, seed: int = 0) -> dict[bool, torch.nn.Module]:
    """The variant with linear SRA off (False) and on (True), each randomly initialised from ``seed``."""
    models = {}
    for linear in (False, True):
        torch.manual_seed(seed)
        models[linear] = create_model(variant, num_classes=num_classes, linear_sra=linear)
    return models


# --- the sweep ----------------------------------------------------------------------------------------

def complexity_rows(variant: str, sizes: Sequence[Size]) -> list[dict[str, Any]]:
    """Params and GMACs (FlopCounterMode, attention included) of both models at every size."""
    models = build_pair(variant)
    rows = []
    for size in sizes:
        for linear, model in models.items():
            c = measure_complexity(model, tuple(size))
            rows.append(dict(variant=variant, linear_sra=linear, size=size_label(size), h=size[0], w=size[1],
                             pixels=size[0] * size[1], params_m=c.params_m, gmacs=c.total_gmacs))
    return rows


def throughput(variant: str, sizes: Sequence[Size], batch_size: int, modes: Sequence[str] = ("infer", "train"),
               steps: int = 5, warmup: int = 2, device: str = "cpu", precision: str = "32",
               verbose: bool = True) -> dict[tuple[str, bool, str], float]:
    """Images/s of both models per (size, mode), measured interleaved (off, on, on, off, ...) after warm-up."""
    models = build_pair(variant)
    pair = [models[False].to(device), models[True].to(device)]
    results = {}
    for size in sizes:
        for mode in modes:
            start = time.perf_counter()
            off_times, on_times = compare_step_times(pair, tuple(size), batch_size, mode, device, precision, steps,
                                                     warmup)
            off, on = batch_size / statistics.median(off_times), batch_size / statistics.median(on_times)
            results[(size_label(size), False, mode)], results[(size_label(size), True, mode)] = off, on
            if verbose:
                ratio = paired_speed_ratio(on_times, off_times)
                print(f"{size_label(size):>9} {mode:5}: off {off:8.2f} img/s, on {on:8.2f} img/s "
                      f"(on/off {ratio.median:.2f} [{ratio.low:.2f}, {ratio.high:.2f}] over {steps} step pairs; "
                      f"{time.perf_counter() - start:.0f} s)", flush=True)
            gc.collect()
    return results


def peak_memory(variant: str, sizes: Sequence[Size], batch_size: int, modes: Sequence[str] = ("infer", "train"),
                device: str = "cpu", precision: str = "32", steps: int = 1,
                timeout: float = 3600) -> dict[tuple[str, bool, str], dict[str, float]]:
    """Peak memory of both models per (size, mode), measured in a fresh subprocess.

    Each measurement builds a fresh model; between measurements the worker frees everything and
    returns freed heap pages to the OS (``malloc_trim``), so on CPU the peak RSS above the
    pre-step baseline is this batch's memory, not what an earlier measurement left cached.
    On CUDA it is the allocator's peak above the baseline. ``mem_mb`` is that difference,
    ``peak_mb`` the whole process's peak.
    """
    spec = dict(variant=variant, sizes=[list(s) for s in sizes], batch_size=batch_size, modes=list(modes),
                device=device, precision=precision, steps=steps)
    records = run_worker("tools.bench.ablation", spec, timeout, f"memory measurement of {variant}")
    return {(r["size"], r["linear_sra"], r["mode"]): {"peak_mb": r["peak_mb"], "mem_mb": r["activations_mb"]}
            for r in records}


def memory_worker(spec: dict) -> None:
    """Subprocess side of ``peak_memory``: prints one JSON record per (size, mode, linear SRA)."""
    records = []
    for size in spec["sizes"]:
        for mode in spec["modes"]:
            for linear in (False, True):
                torch.manual_seed(0)
                model = create_model(spec["variant"], linear_sra=linear).to(spec["device"])
                release_memory()
                mem = measure_peak_memory_here(model, tuple(size), spec["batch_size"], mode, spec["device"],
                                               spec["precision"], spec["steps"])
                records.append(dict(size=size_label(size), linear_sra=linear, mode=mode, peak_mb=mem.peak_mb,
                                    activations_mb=mem.activations_mb))
                del model, mem
                release_memory()
    print(json.dumps(records))


def merge_rows(complexity: list[dict[str, Any]], speed: dict, memory: dict, batch_size: int, device: str = "cpu",
               precision: str = "32") -> list[dict[str, Any]]:
    """``complexity_rows`` plus the ``throughput`` and ``peak_memory`` figures: one row per (size, off/on)."""
    rows = []
    for row in complexity:
        row = dict(row)
        for mode in ("infer", "train"):
            key = (row["size"], row["linear_sra"], mode)
            row[f"{mode}_img_s"] = speed.get(key)
            row[f"{mode}_mem_mb"] = memory.get(key, {}).get("mem_mb")
            row[f"{mode}_peak_mb"] = memory.get(key, {}).get("peak_mb")
        row.update(batch_size=batch_size, device=device, precision=precision)
        rows.append(row)
    return rows


def sweep(variant: str, sizes: Sequence[Size] = SIZES, batch_size: int = 8, steps: int = 5, warmup: int = 2,
          device: str = "cpu", precision: str = "32", memory: bool = True, verbose: bool = True) -> list[dict[str, Any]]:
    """One row per (size, linear SRA off/on): params, GMACs, infer/train images/s, infer/train peak memory."""
    sizes = sort_sizes(sizes)
    speed = throughput(variant, sizes, batch_size, steps=steps, warmup=warmup, device=device, precision=precision,
                       verbose=verbose)
    mem = peak_memory(variant, sizes, batch_size, device=device, precision=precision) if memory else {}
    return merge_rows(complexity_rows(variant, sizes), speed, mem, batch_size, device, precision)


def sort_sizes(sizes: Iterable[Sequence[int]]) -> list[Size]:
    """(H, W) tuples in order of pixel count."""
    return sorted((tuple(int(v) for v in s) for s in sizes), key=lambda s: (s[0] * s[1], s))


def save_rows(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """The sweep's raw numbers as CSV (one row per size and off/on)."""
    return write_csv(rows, path)


# --- reading the sweep ------------------------------------------------------------------------------------

def paired(rows: Iterable[dict[str, Any]], metric: str) -> list[tuple[str, int, float, float]]:
    """``(size, pixels, off, on)`` for ``metric``, in order of pixel count (sizes missing either side skipped)."""
    table: dict[str, dict[bool, Any]] = {}
    pixels = {}
    for row in rows:
        table.setdefault(row["size"], {})[row["linear_sra"]] = row.get(metric)
        pixels[row["size"]] = row["pixels"]
    out = [(size, pixels[size], v.get(False), v.get(True)) for size, v in table.items()]
    return sorted((o for o in out if o[2] is not None and o[3] is not None), key=lambda o: (o[1], o[0]))


def gain(off: float, on: float, metric: str) -> float:
    """How many times better linear SRA is on ``metric`` (> 1: it pays off): on/off for speed, off/on for costs."""
    return on / off if METRICS[metric][1] else off / on


def crossover(rows: Iterable[dict[str, Any]], metric: str, margin: float = 0.05) -> str | None:
    """The smallest size from which linear SRA is better by more than ``margin`` at it and every larger size.

    ``margin`` keeps measurement noise from calling a tie a win. None: it never pays off in the sweep.
    """
    points = paired(rows, metric)
    first = None
    for size, _, off, on in reversed(points):
        if gain(off, on, metric) > 1 + margin:
            first = size
        else:
            break
    return first


def ratio_table(rows: Sequence[dict[str, Any]], metrics: Sequence[str] = tuple(METRICS)) -> str:
    """Markdown: per size, each metric off -> on and linear SRA's gain (x > 1 means on is better)."""
    columns = {m: {size: (off, on) for size, _, off, on in paired(rows, m)} for m in metrics}
    table = []
    for size, *_ in paired(rows, "gmacs"):
        cells = [size]
        for m in metrics:
            off, on = columns[m].get(size, (None, None))
            cells.append("-" if off is None else f"{_num(off)} -> {_num(on)} ({gain(off, on, m):.2f}x)")
        table.append(cells)
    return markdown_table(table, ["input"] + [METRICS[m][0] for m in metrics], fmt=str)


def _num(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"


def findings(rows: Sequence[dict[str, Any]], runs: Sequence[dict[str, Any]] = (), margin: float = 0.05) -> list[str]:
    """Sentences stating what the sweep (and the two trainings' table rows, if given) measured."""
    variant = rows[0]["variant"]
    where = f"{rows[0]['device']}, batch {rows[0]['batch_size']}, precision {rows[0]['precision']}"
    lines = []
    params = paired(rows, "params_m")[0]
    lines.append(f"{variant}: linear SRA changes the parameters from {params[2]:.2f} M to {params[3]:.2f} M "
                 f"({100 * (params[3] / params[2] - 1):+.1f}%), at every input size.")
    g = paired(rows, "gmacs")
    lines.append("GMACs per image, off -> on: " + ", ".join(f"{s} {off:.2f} -> {on:.2f} ({gain(off, on, 'gmacs'):.2f}x)"
                                                            for s, _, off, on in g) + ".")
    for metric in ("gmacs", "infer_img_s", "train_img_s", "infer_mem_mb", "train_mem_mb"):
        points = paired(rows, metric)
        if not points:
            continue
        label = METRICS[metric][0]
        at = crossover(rows, metric, margin)
        best = max(points, key=lambda p: gain(p[2], p[3], metric))
        worst = min(points, key=lambda p: gain(p[2], p[3], metric))
        if at is None:
            verdict = f"linear SRA is not better by more than {100 * margin:.0f}% at the largest size measured"
        elif at == points[0][0]:
            verdict = f"linear SRA is better by more than {100 * margin:.0f}% at every size measured, from {at}"
        else:
            verdict = f"linear SRA pays off (> {100 * margin:.0f}% better) from {at} upwards"
        lines.append(f"{label}: {verdict}; its gain ranges from {gain(worst[2], worst[3], metric):.2f}x at {worst[0]} "
                     f"to {gain(best[2], best[3], metric):.2f}x at {best[0]} ({where}).")
    for run in runs:
        lines.append(f"Training {run.get('model')} at {run.get('input')}: final val accuracy "
                     f"{_pct(run.get('accuracy'))}, macro precision {_pct(run.get('precision'))}, recall "
                     f"{_pct(run.get('recall'))}, {run.get('epochs')} epochs, {_sec(run.get('epoch_time_s'))} per epoch.")
    return lines


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _sec(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} s"


# --- plots --------------------------------------------------------------------------------------------------

def plot_sweep(rows: Sequence[dict[str, Any]], metrics: Sequence[str], out_path: str | Path,
               log_y: bool = True, title: str | None = None) -> Path:
    """One panel per metric: off and on against the input's pixel count (log x; log y by default where the
    values span more than 3x), ticked with the sizes; saved as a PNG and returned."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.5 * len(metrics), 4.2), dpi=100)
    for i, metric in enumerate(metrics):
        ax = figure.add_subplot(1, len(metrics), i + 1)
        points = paired(rows, metric)
        if not points:
            ax.set_title(f"{METRICS[metric][0]}: not measured")
            continue
        ax.plot([p[1] for p in points], [p[2] for p in points], marker="o", label="linear SRA off (strided-conv SRA)")
        ax.plot([p[1] for p in points], [p[3] for p in points], marker="s", label="linear SRA on (7x7 pool)")
        _size_axis(ax, points)
        values = [v for p in points for v in p[2:] if v > 0]
        if log_y and values and max(values) / min(values) > 3:  # log scale only where it spans a wide range
            _log_y(ax)
        ax.set_ylabel(METRICS[metric][0] + (" (log scale)" if ax.get_yscale() == "log" else ""))
        _grid_and_legend(ax)
    if title:
        figure.suptitle(title)
    return _save(figure, out_path)


def _grid_and_legend(ax) -> None:
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small")


def _save(figure, out_path: str | Path) -> Path:
    figure.tight_layout()
    figure.savefig(out_path)
    return Path(out_path)


def _size_axis(ax, points: Sequence[tuple[str, int, Any, Any]]) -> None:
    """x: pixel count on a log scale, ticked and labelled at the measured sizes (H x W)."""
    from matplotlib.ticker import NullLocator

    ax.set_xscale("log")
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticks([p[1] for p in points], [p[0] for p in points], rotation=45, ha="right", fontsize=8)
    ax.set_xlabel("input size H x W (pixel count, log scale)")


def _log_y(ax) -> None:
    """Log y with plain numbers (1, 2, 5 per decade) instead of powers of ten."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def plot_gain(rows: Sequence[dict[str, Any]], metrics: Sequence[str], out_path: str | Path,
              title: str | None = None) -> Path:
    """Linear SRA's gain per metric (x > 1: on is better) against pixel count, with the break-even line."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), dpi=100)
    ax = figure.add_subplot(1, 1, 1)
    for metric in metrics:
        points = paired(rows, metric)
        if points:
            ax.plot([p[1] for p in points], [gain(p[2], p[3], metric) for p in points], marker="o",
                    label=METRICS[metric][0])
    ax.axhline(1.0, color="black", linewidth=1, linestyle="--", label="break-even")
    _size_axis(ax, paired(rows, "gmacs"))
    ax.set_ylabel("gain of linear SRA (x; > 1 = better)")
    _grid_and_legend(ax)
    if title:
        ax.set_title(title)
    return _save(figure, out_path)


# --- short trainings through the CLI -------------------------------------------------------------------------

def run_cli(args: Sequence[str], echo: bool = True, timeout: float | None = None) -> Path:
    """Run ``python -m pvt_lightning.cli.main ARGS`` in a fresh process and return the run directory it made.

    A subprocess keeps each run's state (seed, run-version environment, data-loader workers) apart
    from the caller's. With ``echo``, prints the log, keeping only the final state of progress bars.
    The run directory is read from the files the run wrote (``run_dir_written``), not parsed from its log.
    """
    started = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "pvt_lightning.cli.main", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=child_env())
    log = []
    deadline = None if timeout is None else time.monotonic() + timeout
    for line in proc.stdout:  # progress bars redraw with \r: keep what the line ends as
        line = line.rstrip("\n").split("\r")[-1]
        log.append(line)
        if echo and line.strip():
            print(line, flush=True)
        if deadline is not None and time.monotonic() > deadline:
            proc.kill()
            raise TimeoutError(f"training {' '.join(args)} took longer than {timeout} s")
    if proc.wait() != 0:
        tail = "\n".join(log[-30:])
        raise RuntimeError(f"training failed (exit {proc.returncode}): pvt-lightning {' '.join(args)}\n{tail}")
    run_dir = run_dir_written(args, since=started)
    if run_dir is None:
        raise RuntimeError("the run finished without writing summary.json under its --logdir/--name:\n"
                           + "\n".join(log[-30:]))
    return run_dir


def _flag_value(args: Sequence[str], name: str) -> str | None:
    """The value of ``--name V`` or ``--name=V`` in ``args`` (the last one wins), or None."""
    value = None
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def run_dir_written(args: Sequence[str], since: float) -> Path | None:
    """The newest version folder with a summary.json written since ``since`` under the ``--logdir`` (default
    ``runs``) and ``--name`` (if given) in ``args``."""
    root = Path(_flag_value(args, "--logdir") or "runs")
    name = _flag_value(args, "--name")
    root = root / name if name else root
    written = [(path.stat().st_mtime, path.parent) for path in root.rglob("summary.json")
               if path.stat().st_mtime >= since - 1]
    return max(written)[1] if written else None


def train_pair(variant: str, logdir: str | Path, data_dir: str | Path | None = None, epochs: int | None = None,
               batch_size: int | None = None, img_size: Size | None = None, limit_train_batches: int | None = None,
               limit_val_batches: int | None = None, num_workers: int | None = None,
               extra: Sequence[str] = (), echo: bool = True, progress_bar: bool = False) -> dict[bool, Path]:
    """Train ``variant`` with linear SRA off, then on, same recipe and seed; returns {linear: run dir}.

    Unset arguments keep the CLI's defaults (on the demo data: its own small images and short recipe).
    Without ``progress_bar`` the log holds one line per epoch (``--no-progress-bar``), as notebooks show it.
    """
    common = ["--variant", variant, "--logdir", str(logdir), *([] if progress_bar else ["--no-progress-bar"]), *extra]
    for flag, value in (("--data", data_dir), ("--epochs", epochs), ("--batch-size", batch_size),
                        ("--limit-train-batches", limit_train_batches), ("--limit-val-batches", limit_val_batches),
                        ("--num-workers", num_workers)):
        if value is not None:
            common += [flag, str(value)]
    if img_size is not None:
        common += ["--img-size", str(img_size[0]), str(img_size[1])]
    runs = {}
    for linear in (False, True):
        runs[linear] = run_cli([*common, "--linear-sra" if linear else "--no-linear-sra"], echo=echo)
    return runs


__all__ = [
    "METRICS", "SIZES", "build_pair", "complexity_rows", "crossover", "default_variant", "findings", "gain",
    "merge_rows", "paired", "peak_memory", "plot_gain", "plot_sweep", "ratio_table", "run_cli", "run_dir_written",
    "save_rows", "set_threads", "size_label", "sort_sizes", "sweep", "throughput", "train_pair",
]
