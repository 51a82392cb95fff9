"""Multi-label end to end on digit canvases: b0 from scratch, mAP, thresholds for precision 0.9 chosen on val and
measured on test; writes a Markdown results file.

    python experiments/multilabel_digits.py /tmp/ml_digits --out experiments/results/multilabel_digits.md

Data: experiments/make_digit_canvases.py (canvases of 1-3 of scikit-learn's digit scans, labels = the digits
present). Everything runs through the CLI (``pvt_lightning.cli.main.main``), as a user would.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from make_digit_canvases import write_digit_canvases  # noqa: E402

from pvt_lightning.cli.main import main  # noqa: E402


def chance_map(manifest: Path, split: str, classes: int) -> float:
    """mAP of random scores: the mean over classes of the share of images carrying the class."""
    import csv

    with open(manifest) as handle:
        rows = [row["labels"] for row in csv.DictReader(handle) if row["split"] == split]
    return float(np.mean([[str(c) in labels.split("|") for c in range(classes)] for labels in rows]))


def run(work: Path, classes: int, size: int, grid: int, epochs: int, counts: dict[str, int], extra: list[str]) -> dict:
    manifest = write_digit_canvases(work / "data", counts, size=size, classes=classes, grid=grid, unlabelled=8)
    common = ["--num-workers", "0", "--accelerator", "cpu", "--precision", "32", "--batch-size", "16"]
    started = time.perf_counter()
    assert main(["train", "--variant", "b0", "--data", str(manifest), "--img-size", str(size), str(size),
                 "--crop-pct", "1.0", "--epochs", str(epochs), "--logdir", str(work / "runs"), "--name", "digits",
                 "--inference-seconds", "0", "--no-progress-bar", *extra, *common]) == 0
    train_s = time.perf_counter() - started
    run_dir = work / "runs" / "digits" / "version_0"
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(manifest), "--split", "val",
                 "--target-precision", "0.9", "--output-dir", str(work / "eval_val"), *common]) == 0
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(manifest), "--split", "test",
                 "--operating-point", str(work / "eval_val" / "operating_point.json"),
                 "--output-dir", str(work / "eval_test"), *common]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    val = json.loads((work / "eval_val" / "report.json").read_text())
    test = json.loads((work / "eval_test" / "report.json").read_text())
    return {"classes": classes, "size": size, "epochs": epochs, "counts": counts, "extra": extra,
            "train_s": train_s, "chance_val": chance_map(manifest, "val", classes),
            "chance_test": chance_map(manifest, "test", classes), "summary": summary, "val": val, "test": test}


def markdown(result: dict) -> str:
    s, val, test = result["summary"], result["val"], result["test"]
    lines = [
        "# Multi-label: b0 from scratch on digit canvases",
        "",
        (f"Machine: shared 2-core CPU VM ({platform.processor() or platform.machine()}), other jobs running; "
         f"python experiments/multilabel_digits.py. Data: {result['size']}x{result['size']} canvases of 1-3 of the "
         f"digits 0-{result['classes'] - 1} (scikit-learn's scans; 8 unlabelled training canvases), "
         f"{result['counts']} images; b0 from scratch, {result['epochs']} epochs, batch 16, loss "
         f"{s['multilabel']['loss']}, extra flags `{' '.join(result['extra'])}`; training took "
         f"{result['train_s']:.0f} s."),
        "",
        "| figure | val | test |",
        "|---|---|---|",
        f"| mAP (model) | {val['map']:.4f} | {test['map']:.4f} |",
        f"| mAP of random scores (share of positives) | {result['chance_val']:.4f} | {result['chance_test']:.4f} |",
        f"| macro F1 at 0.5 | {val['macro']['f1']:.4f} | {test['macro']['f1']:.4f} |",
        f"| exact match at 0.5 | {val['exact_match']:.4f} | {test['exact_match']:.4f} |",
        "",
        ("Per class: AP on test, and the thresholds chosen on val for precision 0.9, with the precision they give on "
         "val and on test (held out; `-`: the class never reaches 0.9 on val, or no test image is over its "
         "threshold)."),
        "",
        "| class | AP (test) | threshold (val) | precision on val | target | precision on test | recall on test |",
        "|---|---|---|---|---|---|---|",
    ]
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    for name, at in test["operating_point"]["per_class"].items():
        on_val = val["operating_point"]["per_class"][name]
        lines.append(f"| {name} | {fmt(test['per_class'][name]['average_precision'])} | {fmt(at['threshold'])} | "
                     f"{fmt(on_val['precision'])} | 0.90 | {fmt(at['precision'])} | {fmt(at['recall'])} |")
    lines += ["", (f"Training's last `val/map`: {s['metrics']['val/map']:.4f} (best {s['best']['value']:.4f} at "
                   f"epoch {s['best']['epoch']})."), ""]
    return "\n".join(lines)


def main_cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work", type=Path, help="an empty working folder")
    parser.add_argument("--out", type=Path, default=None, help="write the Markdown results here")
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--grid", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--train", type=int, default=320)
    parser.add_argument("--val", type=int, default=80)
    parser.add_argument("--test", type=int, default=80)
    args, extra = parser.parse_known_args()
    extra = extra or ["--lr", "1e-3", "--warmup-epochs", "1", "--drop-path", "0", "--weight-decay", "0.01"]
    result = run(args.work, args.classes, args.size, args.grid, args.epochs,
                 {"train": args.train, "val": args.val, "test": args.test}, extra)
    text = markdown(result)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main_cli()
