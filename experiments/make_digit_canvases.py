"""Write a multi-label image set: canvases of 1-3 of scikit-learn's handwritten digits, labelled with their digits.

    python experiments/make_digit_canvases.py data/digit_canvases --size 48
    pvt-lightning train --data data/digit_canvases/manifest.csv --variant b0 --img-size 48 48

Each canvas is black, ``size`` x ``size``, with 1-3 digit scans (sklearn's 1797 real 8x8 scans, upscaled to
``size // grid`` pixels) pasted into distinct cells of a ``grid`` x ``grid`` layout (so they never overlap); its
``labels`` are the distinct digits on it, ``|``-separated (docs/multilabel.md). The scans are split into train /
val / test first (60/20/20, seeded), so a split's canvases only use that split's scans. ``manifest.csv`` holds
``path,labels,split``; with ``--unlabelled N``, N extra training canvases are empty (no digit, no label).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import cv2
import numpy as np
from sklearn.datasets import load_digits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pvt_lightning.data.demo import write_image  # noqa: E402

SPLITS = {"train": 0.6, "val": 0.2, "test": 0.2}


def write_digit_canvases(out: Path, counts: dict[str, int], size: int = 48, seed: int = 0, classes: int = 10,
                         unlabelled: int = 0, grid: int = 3) -> Path:
    """Canvases per split (``counts``: {split: images}) of digits 0..classes-1 under ``out``, each digit in a cell
    of a ``grid`` x ``grid`` layout (at most 3 digits); returns the manifest."""
    digits = load_digits()
    keep = np.flatnonzero(digits.target < classes)
    rng = np.random.default_rng(seed)
    order = rng.permutation(keep)
    bounds = np.cumsum([0] + [round(share * len(order)) for share in SPLITS.values()])
    pools = {split: order[bounds[k]:bounds[k + 1]] for k, split in enumerate(SPLITS)}
    cell = size // grid
    scans = {i: np.clip(cv2.resize((digits.images[i] * (255.0 / 16.0)).astype(np.float32), (cell, cell),
                                   interpolation=cv2.INTER_CUBIC), 0, 255).astype(np.uint8) for i in keep.tolist()}
    rows = []
    for split, count in counts.items():
        for n in range(count + (unlabelled if split == "train" else 0)):
            canvas = np.zeros((size, size), np.uint8)
            present: set[int] = set()
            if n < count:
                slots = rng.choice(grid * grid, size=int(rng.integers(1, min(3, grid * grid) + 1)), replace=False)
                for slot in slots.tolist():
                    index = int(rng.choice(pools[split]))
                    y, x = divmod(slot, grid)
                    jitter = rng.integers(0, size - grid * cell + 1, size=2)
                    canvas[y * cell + jitter[0]:(y + 1) * cell + jitter[0],
                           x * cell + jitter[1]:(x + 1) * cell + jitter[1]] = scans[index]
                    present.add(int(digits.target[index]))
            name = f"{split}/{n:05d}.png"
            write_image(out / name, canvas)
            rows.append((name, "|".join(str(d) for d in sorted(present)), split))
    manifest = out / "manifest.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "labels", "split"])
        writer.writerows(rows)
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="output folder (manifest.csv and train/, val/, test/ in it)")
    parser.add_argument("--size", type=int, default=48, help="canvas side in pixels (default 48)")
    parser.add_argument("--train", type=int, default=1200)
    parser.add_argument("--val", type=int, default=300)
    parser.add_argument("--test", type=int, default=300)
    parser.add_argument("--classes", type=int, default=10, help="digits 0..N-1 (default 10)")
    parser.add_argument("--grid", type=int, default=3, help="digits sit in cells of a grid x grid layout")
    parser.add_argument("--unlabelled", type=int, default=0, help="extra empty training canvases (default 0)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.out.exists() and any(args.out.iterdir()):
        parser.error(f"{args.out} is not empty; choose a new folder")
    manifest = write_digit_canvases(args.out, {"train": args.train, "val": args.val, "test": args.test}, args.size,
                                    args.seed, args.classes, args.unlabelled, args.grid)
    print(f"wrote {manifest}")


if __name__ == "__main__":
    main()
