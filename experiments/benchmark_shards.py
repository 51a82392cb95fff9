#!/usr/bin/env python
"""Shards vs files on the digits data: training-loader throughput and the accuracy each reaches
(results: experiments/results/large_datasets.md).

    python experiments/benchmark_shards.py --rounds 6 --epochs 3

1. Writes scikit-learn's digits as an ImageFolder of 32x32 PNGs (experiments/make_digits.py) and converts it
   with the real command, ``pvt-lightning shards --data DIGITS --output SHARDS``.
2. Loader throughput: the project's ``ImageFolderDataModule`` on each (same decode, same ``basic``
   augmentation, same batch size and workers), one full training epoch per timed step, files and shards
   interleaved A B, B A, ... after one untimed warm-up epoch each (worker start, LitData reader opened);
   the ratio is the median of the paired per-round ratios (tools/bench/timing.py).
3. Trains b0 from scratch on each through the real CLI (``pvt_lightning.cli.main.main``) with the same seed
   and settings, and reads both runs' summary.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from make_digits import write_digits  # noqa: E402
from pvt_lightning.cli.main import main as cli  # noqa: E402
from pvt_lightning.data import ImageFolderDataModule  # noqa: E402
from tools.bench.timing import interleaved_times, paired_speed_ratio, timed  # noqa: E402


def epoch_step(data: Path, args) -> tuple[callable, int]:
    """A callable that runs one training epoch of the real loader (persistent workers); and its image count."""
    dm = ImageFolderDataModule(data, img_size=args.img_size, batch_size=args.batch_size, num_workers=args.workers,
                               seed=args.seed, augment="basic", pin_memory=False, index_cache=False)
    dm.setup("fit")
    loader = dm.train_dataloader()

    def epoch() -> None:
        for _ in loader:
            pass

    return timed(epoch), dm.split_sizes()["train"]


def throughput(digits: Path, shards: Path, args) -> dict:
    (files_step, n_files), (shards_step, n_shards) = epoch_step(digits, args), epoch_step(shards, args)
    assert n_files == n_shards
    files_s, shards_s = interleaved_times([files_step, shards_step], repeats=args.rounds, warmup=1)
    ratio = paired_speed_ratio(shards_s, files_s)  # > 1: shards faster
    return {"images": n_files, "files_s": files_s, "shards_s": shards_s, "ratio": ratio}


def train(data: Path, name: str, args) -> dict:
    code = cli(["train", "--variant", "b0", "--data", str(data), "--img-size", str(args.img_size), str(args.img_size),
                "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--num-workers", str(args.workers),
                "--seed", str(args.seed), "--accelerator", "cpu", "--devices", "1", "--logdir", str(args.logdir),
                "--name", name, "--no-progress-bar", "--inference-seconds", "0"])
    assert code == 0, f"training on {data} exited with {code}"
    summary = json.loads(next((args.logdir / name).glob("version_*/summary.json")).read_text())
    return summary


def report(args, speed: dict, runs: dict) -> str:
    files_rate, shards_rate = ([speed["images"] / t for t in speed[key]] for key in ("files_s", "shards_s"))
    r = speed["ratio"]
    lines = [
        f"Command: `python experiments/benchmark_shards.py {' '.join(sys.argv[1:])}`. Machine: "
        f"{platform.machine()}, {os.cpu_count()} cores shared with other agents, Python {platform.python_version()}, "
        f"torch {torch.__version__}, load average at the end {' / '.join(f'{x:.1f}' for x in os.getloadavg())}.", "",
        "| measure | files | shards |", "|---|---|---|",
        f"| loader images/s, {args.rounds} interleaved epochs of {speed['images']} images (median; min-max) | "
        f"{statistics.median(files_rate):.0f} ({min(files_rate):.0f}-{max(files_rate):.0f}) | "
        f"{statistics.median(shards_rate):.0f} ({min(shards_rate):.0f}-{max(shards_rate):.0f}) |",
        f"| throughput ratio shards / files (median of paired rounds; {r.confidence:.0%} interval) | | "
        f"**{r.median:.2f}x** ({r.low:.2f}-{r.high:.2f}) |",
    ]
    for key, label in (("val/acc", "final val accuracy"), ("val/recall@precision0.90", "val recall @ precision 0.90"),
                       ("val/loss", "final val loss")):
        values = [runs[name]["metrics"].get(key) for name in ("files", "shards")]
        lines.append(f"| b0 {args.img_size}x{args.img_size}, {args.epochs} epochs, seed {args.seed}: {label} | "
                     + " | ".join("n/a" if v is None else f"{v:.4f}" for v in values) + " |")
    times = [runs[name].get("epoch_time_s") for name in ("files", "shards")]
    lines.append("| mean training epoch time (summary.json) | "
                 + " | ".join("n/a" if t is None else f"{t:.1f} s" for t in times) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None, help="where data, shards and runs go (default: a "
                        "temporary folder, deleted afterwards)")
    parser.add_argument("--rounds", type=int, default=6, help="timed loader epochs per side")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs per run")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="loader workers (both sides)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None, help="write the markdown table here")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="pvt_benchmark_shards_"))
    digits, shards, args.logdir = work / "digits", work / "shards", work / "runs"
    try:
        print(write_digits(digits, size=32), flush=True)
        assert cli(["shards", "--data", str(digits), "--output", str(shards)]) == 0
        speed = throughput(digits, shards, args)
        print(speed, flush=True)
        runs = {name: train(data, name, args) for name, data in (("files", digits), ("shards", shards))}
        text = report(args, speed, runs)
        print(text)
        if args.output:
            args.output.write_text(text)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
