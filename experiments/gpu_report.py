#!/usr/bin/env python
"""The GPU targets, checked against the tables and runs ``experiments/gpu_benchmarks.sh`` leaves behind.

    python experiments/gpu_report.py OUT_DIR --runs RUNS_DIR

Reads OUT_DIR/<tag>.csv (experiments/benchmark.py tables) and the TensorBoard events of the run.py fits under
RUNS_DIR; writes OUT_DIR/targets.md (one line per target: measured, goal, met) and OUT_DIR/fit_epochs.csv (every
fit's per-epoch throughput). A figure whose step did not run (or failed) reads "not measured".

Targets:
- data: a real b0 fit (bf16-mixed, batch 128, default recipe, generated 500x375 JPEGs) trains at >= 90% of the
  same model's synthetic-batch speed (median of its epochs after the first, where workers and cudnn warm up);
- b5 at 384x224, batch 64: ours with regional compile >= 1.3x timm's eager speed, peak memory <= timm's, MFU;
- b2_li >= b2 (speed ratio >= 1.00) in every row of the batch-1 and batch-16 sweeps (224, 512, 1024; infer, train),
  eager; and, if the script had time for it, with both compiled per block at 224x224, batch 16.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from pathlib import Path

FITS = {"b0_aug_gpu": "augmentation on the GPU", "b0_aug_cpu": "augmentation in CPU workers"}
SWEEPS = ("b2li_vs_b2_bs1", "b2li_vs_b2_bs16", "b2li_vs_b2_bs16_regions")


def read_rows(out: Path, tag: str) -> list[dict[str, str]]:
    path = out / f"{tag}.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def number(row: dict[str, str], key: str) -> float | None:
    value = row.get(key, "")
    return float(value) if value not in ("", None) else None


def epoch_throughputs(run_root: Path) -> list[float]:
    """``throughput/train_img_s`` per epoch from the newest TensorBoard event file under ``run_root``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(run_root.rglob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    if not files:
        return []
    events = EventAccumulator(str(files[-1].parent))
    events.Reload()
    if "throughput/train_img_s" not in events.Tags()["scalars"]:
        return []
    return [e.value for e in sorted(events.Scalars("throughput/train_img_s"), key=lambda e: e.step)]


def steady(throughputs: list[float]) -> float | None:
    """The median epoch after the first (the first also pays for worker start-up and autotuning)."""
    later = throughputs[1:] or throughputs
    return statistics.median(later) if later else None


def verdict(value: float | None, goal: float, higher: bool = True) -> str:
    if value is None:
        return "not measured"
    return "yes" if (value >= goal if higher else value <= goal) else "NO"


def fmt(value: float | None, spec: str = ".3f", unit: str = "") -> str:
    return "not measured" if value is None else format(value, spec) + unit


def interval(row: dict[str, str]) -> str:
    low, high = number(row, "ratio_lo"), number(row, "ratio_hi")
    return "" if low is None or high is None else f" [{low:.3f}, {high:.3f}]"


def report(out: Path, runs: Path | None) -> list[str]:
    lines = ["| target | measured | goal | met |", "|---|---|---|---|"]
    b0 = next((r for r in read_rows(out, "b0_synthetic") if r["mode"] == "train"), {})
    synthetic = number(b0, "ours_img_s")
    b0_setting = f"{b0.get('variant', 'b0')} {b0.get('size', '224x224')} batch {b0.get('batch', 128)}"
    epoch_rows = []
    for name, what in FITS.items():
        throughputs = epoch_throughputs(runs / name) if runs else []
        epoch_rows += [dict(run=name, epoch=i, train_img_s=v) for i, v in enumerate(throughputs)]
        real = steady(throughputs)
        ratio = real / synthetic if real and synthetic else None
        lines.append(f"| {b0_setting} bf16-mixed, real fit ({what}) / synthetic batches | {fmt(ratio)} "
                     f"({fmt(real, '.0f')} / {fmt(synthetic, '.0f')} img/s) | >= 0.90 | "
                     f"{verdict(ratio, 0.9) if name == 'b0_aug_gpu' else 'for comparison'} |")
    with open(out / "fit_epochs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["run", "epoch", "train_img_s"])
        writer.writeheader()
        writer.writerows(epoch_rows)

    b5 = next((r for r in read_rows(out, "b5_regions") if r["mode"] == "train"), {})
    ratio = number(b5, "ratio")
    b5_setting = f"{b5.get('variant', 'b5')} {b5.get('size', '384x224')} batch {b5.get('batch', 64)}"
    lines.append(f"| {b5_setting} bf16-mixed training: ours (regional compile) / timm eager | "
                 f"{fmt(ratio)}{interval(b5)} | >= 1.30 | {verdict(ratio, 1.3)} |")
    ours_mb, ref_mb = number(b5, "ours_peak_mb"), number(b5, "ref_peak_mb")
    mem_ratio = ours_mb / ref_mb if ours_mb and ref_mb else None
    lines.append(f"| {b5_setting} peak training memory, ours / timm | {fmt(mem_ratio)} ({fmt(ours_mb, '.0f')} / "
                 f"{fmt(ref_mb, '.0f')} MB) | <= 1.00 | {verdict(mem_ratio, 1.0, higher=False)} |")
    mfu = number(b5, "mfu")
    lines.append(f"| {b5_setting} MFU (model FLOPs incl. attention / dense datasheet peak) | "
                 f"{fmt(None if mfu is None else 100 * mfu, '.1f', '%')} | reported | "
                 f"{'yes' if mfu else 'not measured'} |")

    for tag in SWEEPS:
        for row in read_rows(out, tag):
            ratio = number(row, "ratio")
            lines.append(f"| b2_li / b2 {row['size']} batch {row['batch']} {row['mode']} ({row['precision']}) | "
                         f"{fmt(ratio)}{interval(row)} | >= 1.00 | "
                         f"{verdict(ratio, 1.0)} |")
        if not read_rows(out, tag):
            lines.append(f"| b2_li / b2 sweep {tag} | not measured | >= 1.00 | not measured |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the folder gpu_benchmarks.sh wrote its tables to")
    parser.add_argument("--runs", type=Path, default=None, help="the --logdir of its run.py fits")
    parser.add_argument("--header", default="", help="a line above the table (machine, load, versions)")
    args = parser.parse_args(argv)
    if not args.out.is_dir():
        parser.error(f"{args.out} is not a folder of benchmark tables")
    lines = report(args.out, args.runs)
    text = "\n".join(([args.header, ""] if args.header else []) + lines) + "\n"
    (args.out / "targets.md").write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
