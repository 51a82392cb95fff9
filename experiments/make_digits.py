"""Write scikit-learn's handwritten digits (1797 real 8x8 scans, 10 classes) as an ImageFolder.

    python experiments/make_digits.py data/digits --size 32
    python experiments/run.py --variant b0 --data data/digits --img-size 32 32

The 8x8 images (16 grey levels) are upscaled with bicubic interpolation and saved as PNG into
``<out>/train/<digit>/`` and ``<out>/val/<digit>/``, holding out a stratified, seeded fraction.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pvt_lightning.data.demo import write_image  # noqa: E402


def write_digits(out: Path, size: int = 32, val_fraction: float = 0.2, seed: int = 0) -> dict[str, int]:
    """Write the ImageFolder; returns the number of images per split."""
    digits = load_digits()
    images = digits.images  # float (1797, 8, 8), 0..16
    indices = np.arange(len(images))
    train_idx, val_idx = train_test_split(indices, test_size=val_fraction, stratify=digits.target, random_state=seed)
    for split, chosen in (("train", train_idx), ("val", val_idx)):
        for index in sorted(chosen):
            gray = (images[index] * (255.0 / 16.0)).astype(np.float32)
            big = np.clip(cv2.resize(gray, (size, size), interpolation=cv2.INTER_CUBIC), 0, 255).astype(np.uint8)
            write_image(out / split / str(digits.target[index]) / f"{index:04d}.png", big)
    return {"train": len(train_idx), "val": len(val_idx)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="output folder (train/ and val/ are created in it)")
    parser.add_argument("--size", type=int, default=32, help="side of the saved square images (default 32)")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="held-out fraction per class (default 0.2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/val split (default 0)")
    args = parser.parse_args()
    if args.out.exists() and any(args.out.iterdir()):
        parser.error(f"{args.out} is not empty; choose a new folder")
    counts = write_digits(args.out, args.size, args.val_fraction, args.seed)
    print(f"wrote {counts['train']} train and {counts['val']} val images of 10 digit classes to {args.out}")


if __name__ == "__main__":
    main()
