"""Do thresholds chosen on val hold on data the model and the thresholds never saw? Digits, val and test halves.

    python experiments/evaluation_holdout.py --out /tmp/holdout --epochs 10 --target-precision 0.95

Writes scikit-learn's digits (make_digits.py) with half of the held-out images in val/ and half in test/,
trains b0 through the entry point, then, as a user would:
``--evaluate --split val --calibrate --target-precision P`` chooses temperature and thresholds on val, and
``--evaluate --split test --operating-point <val's operating_point.json>`` measures them on test.
Prints a Markdown table (per class: threshold, precision on val and on test) and the calibration figures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from make_digits import write_digits

from pvt_lightning.cli.main import main as run


def split_val_in_halves(data: Path) -> None:
    """Move every second image of each val/<class>/ into test/<class>/ (the digits' order is random)."""
    for folder in sorted((data / "val").iterdir()):
        target = data / "test" / folder.name
        target.mkdir(parents=True)
        for image in sorted(folder.iterdir())[1::2]:
            shutil.move(str(image), target / image.name)


def table(val: dict, test: dict, target: float) -> str:
    lines = ["| class | threshold | precision val | precision test | recall test |", "|---|---|---|---|---|"]
    for name, chosen in val["operating_point"]["per_class"].items():
        measured = test["operating_point"]["per_class"][name]
        cells = [name] + ["-" if v is None else f"{v:.3f}" for v in
                          (chosen["threshold"], chosen["precision"], measured["precision"], measured["recall"])]
        lines.append("| " + " | ".join(cells) + " |")
    held = [m["precision"] for m in test["operating_point"]["per_class"].values() if m["precision"] is not None]
    lines.append(f"\nclasses with precision >= {target} on test: {sum(p >= target for p in held)}/{len(held)}; "
                 f"lowest {min(held):.3f}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="new folder for the data, the run and the reports")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--target-precision", type=float, default=0.95)
    parser.add_argument("--held-out", type=float, default=0.5, help="fraction of the digits held out (val + test)")
    parser.add_argument("--num-workers", default="2")
    args = parser.parse_args()
    if args.out.exists():
        parser.error(f"{args.out} exists; choose a new folder")
    data = args.out / "digits"
    write_digits(data, size=32, val_fraction=args.held_out, seed=0)
    split_val_in_halves(data)
    common = ["--num-workers", args.num_workers, "--accelerator", "cpu", "--precision", "32"]
    status = run(["--variant", "b0", "--data", str(data), "--img-size", "32", "32", "--epochs", str(args.epochs),
                  "--batch-size", "64", "--logdir", str(args.out / "runs"), "--name", "digits_b0", *common])
    if status:
        return status
    checkpoint = next((args.out / "runs" / "digits_b0" / "version_0" / "checkpoints").glob("best-*.ckpt"))
    val_dir, test_dir = args.out / "eval_val", args.out / "eval_test"
    status = run(["--evaluate", str(checkpoint), "--data", str(data), "--split", "val", "--calibrate",
                  "--target-precision", str(args.target_precision), "--output-dir", str(val_dir), *common])
    status = status or run(["--evaluate", str(checkpoint), "--data", str(data), "--split", "test",
                            "--operating-point", str(val_dir / "operating_point.json"), "--output-dir", str(test_dir),
                            *common])
    if status:
        return status
    val = json.loads((val_dir / "report.json").read_text())
    test = json.loads((test_dir / "report.json").read_text())
    print(f"\n{checkpoint}\nval {val['num_images']} images, test {test['num_images']} images; "
          f"accuracy val {val['accuracy']:.4f}, test {test['accuracy']:.4f}")
    for name, report in (("val (fitted here)", val), ("test (T from val)", test)):
        c = report["calibration"]
        print(f"{name}: T {c['temperature']:.3f} | ECE {c['ece_before']:.4f} -> {c['ece_after']:.4f} | "
              f"NLL {c['nll_before']:.4f} -> {c['nll_after']:.4f}")
    op = test["operating_point"]
    print(f"test: coverage {op['coverage']:.3f}, accuracy of the decisions {op['decided_accuracy']}\n")
    print(table(val, test, args.target_precision))
    return 0


if __name__ == "__main__":
    sys.exit(main())
