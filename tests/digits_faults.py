"""Digits with injected faults for the audit tests: leaked near-copies of val images in train, flipped val labels."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

from make_digits import write_digits  # noqa: E402

LEAK_KINDS = ("jpeg", "resize", "crop")


def leak_copy(source: Path, target_dir: Path, kind: str, rng: np.random.Generator) -> Path:
    """A near-copy of ``source`` in ``target_dir``: re-encoded as JPEG (quality 70), resized by 1.25-1.5x, or
    with 1-2 pixel rows/columns cropped off two sides."""
    image = cv2.imread(str(source), cv2.IMREAD_UNCHANGED)
    if kind == "jpeg":
        target = target_dir / f"leak_{source.stem}.jpg"
        cv2.imwrite(str(target), image, [cv2.IMWRITE_JPEG_QUALITY, 70])
        return target
    if kind == "resize":
        side = int(image.shape[0] * rng.uniform(1.25, 1.5))
        image = cv2.resize(image, (side, side), interpolation=cv2.INTER_LINEAR)
    else:
        top, left = (int(v) for v in rng.integers(1, 3, size=2))
        image = image[top:, left:] if rng.random() < 0.5 else image[:-top, :-left]
    target = target_dir / f"leak_{source.stem}.png"
    cv2.imwrite(str(target), image)
    return target


def digits_with_faults(root: Path, leak_fraction: float = 0.1, flip_fraction: float = 0.05,
                       seed: int = 0) -> dict[str, list]:
    """scikit-learn digits as 32x32 PNGs (make_digits), then faults: ``leak_fraction`` of the val images copied
    (altered, see ``leak_copy``) into train under their class; ``flip_fraction`` of the other val images moved to
    another class folder. Returns {"leaks": [[val path, train path]...], "flipped": [new val path...]}."""
    write_digits(root, size=32)
    rng = np.random.default_rng(seed)
    val = sorted((root / "val").glob("*/*.png"))
    order = rng.permutation(len(val))
    n_leak, n_flip = round(leak_fraction * len(val)), round(flip_fraction * len(val))
    leaks = []
    for k, i in enumerate(order[:n_leak]):
        source = val[i]
        copy = leak_copy(source, root / "train" / source.parent.name, LEAK_KINDS[k % len(LEAK_KINDS)], rng)
        leaks.append([str(source), str(copy)])
    flipped = []
    classes = sorted(p.name for p in (root / "val").iterdir())
    for i in order[n_leak:n_leak + n_flip]:
        source = val[i]
        other = rng.choice([c for c in classes if c != source.parent.name])
        target = root / "val" / other / source.name
        shutil.move(source, target)
        flipped.append(str(target))
    return {"leaks": leaks, "flipped": flipped}
