"""Time and memory of ``pvt-lightning audit`` on many small generated images (experiments/results/audit.md).

    python experiments/audit_scale.py /tmp/audit_scale --images 100000

Writes the built-in demo's pattern classes as 32x32 JPEGs (train 90%, val 10%), copies ``--leaks`` val
images re-encoded (JPEG quality 70) into train, trains b0 at 32x32 for two steps (a real checkpoint; the
figures are about scale, not about what the model learnt), runs the audit and prints its timings, peak
memory and how many of the re-encoded copies it found.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pvt_lightning.cli.main import main as cli  # noqa: E402
from pvt_lightning.data.demo import DEMO_CLASSES, draw_demo_image, write_image_folder  # noqa: E402


def generate(root: Path, images: int, size: int, leaks: int) -> list[tuple[str, str]]:
    per_class = images // len(DEMO_CLASSES)
    val = per_class // 10
    write_image_folder(root, DEMO_CLASSES, {"train": per_class - val, "val": val},
                       lambda label, rng: draw_demo_image(label, rng, size), name="{index:05d}.jpg", quality=90)
    copies = []
    rng = np.random.default_rng(0)
    for k in rng.choice(val * len(DEMO_CLASSES), leaks, replace=False).tolist():
        name = DEMO_CLASSES[k % len(DEMO_CLASSES)]
        source = root / "val" / name / f"{k // len(DEMO_CLASSES):05d}.jpg"
        target = root / "train" / name / f"leak_{source.stem}.jpg"
        cv2.imwrite(str(target), cv2.imread(str(source)), [cv2.IMWRITE_JPEG_QUALITY, 70])
        copies.append((str(source), str(target)))
    return copies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--leaks", type=int, default=200)
    parser.add_argument("--num-workers", type=int, default=2)
    args = parser.parse_args()
    data, start = args.out / "data", time.perf_counter()
    if not data.exists():
        copies = generate(data, args.images, args.size, args.leaks)
        (args.out / "leaks.json").write_text(json.dumps(copies))
    copies = {frozenset(pair) for pair in json.loads((args.out / "leaks.json").read_text())}
    print(f"data ready in {time.perf_counter() - start:.0f} s", flush=True)
    checkpoint = args.out / "runs" / "b0" / "version_0" / "checkpoints" / "last.ckpt"
    if not checkpoint.exists():
        assert cli(["--variant", "b0", "--img-size", str(args.size), str(args.size), "--data", str(data),
                    "--epochs", "1", "--limit-train-batches", "2", "--limit-val-batches", "1", "--batch-size", "64",
                    "--num-workers", "0", "--accelerator", "cpu", "--precision", "32", "--logdir",
                    str(args.out / "runs"), "--name", "b0"]) == 0
    out = args.out / "audit"
    start = time.perf_counter()
    assert cli(["audit", "--data", str(data), "--checkpoint", str(checkpoint), "--output-dir", str(out),
                "--num-workers", str(args.num_workers), "--overwrite"]) == 0
    wall = time.perf_counter() - start
    report = json.loads((out / "audit_report.json").read_text())
    import csv

    with open(out / "duplicates.csv", newline="") as handle:
        found = {frozenset((row["path_a"], row["path_b"])) for row in csv.DictReader(handle)}
    print(json.dumps({"images": report["images"], "wall_s": round(wall, 1), "seconds": report["seconds"],
                      "memory_bound_mb": report["memory"]["bound_bytes"] / 2**20,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "pairs": report["duplicates"]["pairs"], "leaks_found": len(copies & found),
                      "leaks": len(copies)}, indent=1))


if __name__ == "__main__":
    main()
