"""Minority-class recall on a 10:1 imbalanced dataset, with and without the imbalance options.

    python experiments/imbalance.py --out runs/imbalance --table experiments/results/recipes_imbalance.md

The data: scikit-learn's handwritten digits (``make_digits.py``), with the training images of the
minority digits (8 and 9 by default) cut to a tenth of the others' (about 14 against 144); the
validation set keeps every class whole (36 images each). Each configuration trains b0 at 32x32
through ``experiments/run.py`` with default flags otherwise, and the table reports the recall of
each minority class and the macro recall over all classes (best epoch by val accuracy, and last).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from make_digits import write_digits  # noqa: E402

from pvt_lightning.runs.compare import load_scalars  # noqa: E402

RUN = Path(__file__).resolve().parent / "run.py"
CONFIGURATIONS = {
    "none": [],
    "class-weights balanced": ["--class-weights", "balanced"],
    "sampler balanced": ["--sampler", "balanced"],
    "sampler sqrt": ["--sampler", "sqrt"],
}


def make_imbalanced(out: Path, minority: list[str], ratio: int = 10) -> Path:
    """Digits at 32x32 with each minority class keeping 1/ratio of its training images (the first ones)."""
    if (out / "val").is_dir():
        return out
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    write_digits(staging, size=32)
    for digit in minority:
        files = sorted((staging / "train" / digit).iterdir())
        for file in files[len(files) // ratio:]:
            file.unlink()
    staging.rename(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/imbalance"))
    parser.add_argument("--minority", nargs="+", default=["8", "9"])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--only", nargs="*", help="run only these configurations (names as in the table)")
    parser.add_argument("--table", type=Path, help="also write the markdown table here")
    args = parser.parse_args()

    data = make_imbalanced(args.out / "data", args.minority)
    counts = {d.name: len(list(d.iterdir())) for d in sorted((data / "train").iterdir())}
    rows = []
    for label, flags in CONFIGURATIONS.items():
        if args.only and label not in args.only:
            continue
        name = label.replace(" ", "_")
        runs = sorted((args.out / "runs" / name).glob("version_*/summary.json"))
        started = time.time()
        if not runs:
            subprocess.run([sys.executable, str(RUN), "--data", str(data), "--variant", "b0", "--img-size", "32", "32",
                            "--epochs", str(args.epochs), "--num-workers", str(args.num_workers), "--logdir",
                            str(args.out / "runs"), "--name", name, *flags], check=True)
            runs = sorted((args.out / "runs" / name).glob("version_*/summary.json"))
        scalars = load_scalars(runs[-1].parent)
        best = max(range(len(scalars["val/acc"])), key=lambda i: scalars["val/acc"][i][1])
        cells = []
        for digit in args.minority:
            series = scalars[f"val/recall/{digit}"]
            cells.append(f"{series[best][1]:.3f} / {series[-1][1]:.3f}")
        cells.append(f"{scalars['val/recall'][best][1]:.3f} / {scalars['val/recall'][-1][1]:.3f}")
        cells.append(f"{scalars['val/acc'][best][1]:.3f} / {scalars['val/acc'][-1][1]:.3f}")
        rows.append(f"| {label} | " + " | ".join(cells) + f" | {time.time() - started:.0f} |")
    header = (["| configuration | " + " | ".join(f"recall of {d}" for d in args.minority)
               + " | macro recall | accuracy | wall s |", "|---|" + "---:|" * (len(args.minority) + 3)])
    table = "\n".join([*header, *rows]) + (
        f"\n\nTraining images per class: {counts}; validation: 36 per class. Each cell: best epoch (by val "
        f"accuracy) / last epoch. Load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs at the end.\n")
    print(table)
    if args.table:
        args.table.write_text(table)


if __name__ == "__main__":
    main()
