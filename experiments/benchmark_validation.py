#!/usr/bin/env python
"""Validation at scale: per-epoch curve metrics on synthetic logits, through the training callbacks' own metric
objects (results: experiments/results/large_datasets.md).

    python experiments/benchmark_validation.py --images 200000 --classes 1000 --batch 256

Each configuration runs in a fresh subprocess (its peak RSS is its own): synthetic logits (a noisy classifier,
generated batch by batch, never all held) are fed batch by batch, as ``validation_step`` outputs, into

- ``RecallAtPrecisionReport``'s collection (``recall_at_precision_metrics``: recall at precision 0.9 and the
  per-class AP, one shared state; exact or binned by ``curves.curve_thresholds``), and
- ``ClassificationReport``'s per-class precision/recall/confusion matrix and its 101-point TensorBoard PR curve,

then computed once (the epoch end). Reported: update and compute seconds, peak RSS minus the RSS before the
first update (``ru_maxrss``), and the bytes of the metric states. ``--evaluate`` also times ``evaluate``'s report
metrics (``classification_report`` + ``recall_at_precision_report``) on all the logits at once, as ``evaluate``
holds them (its predictions.csv and calibration need every row), the logits' own memory included. ``--torchmetrics-update`` times torchmetrics'
own binned update on a slice of the batches (the one-pass update replaces it), scaled to the epoch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pvt_lightning.training.callbacks.report import PR_CURVE_THRESHOLDS, ClassificationReport  # noqa: E402
from pvt_lightning.training.curves import EXACT_LIMIT, curve_thresholds, method_name  # noqa: E402
from pvt_lightning.training.recall_at_precision import (  # noqa: E402
    macro_average_precision,
    recall_at_precision_metrics,
    results_from,
)


def batches(images: int, classes: int, batch: int, seed: int = 0):
    """(logits, targets) of a noisy classifier, ``batch`` images at a time (the same for the same seed)."""
    g = torch.Generator().manual_seed(seed)
    for start in range(0, images, batch):
        n = min(batch, images - start)
        targets = torch.randint(0, classes, (n,), generator=g)
        logits = torch.randn(n, classes, generator=g) * 2
        logits[torch.arange(n), targets] += 4 * torch.rand(n, generator=g)
        yield logits, targets


def state_bytes(metric) -> int:
    total, seen = 0, set()
    for m in ([metric] if not hasattr(metric, "values") else list(metric.values(copy_state=False))):
        for name in m._defaults:
            value = getattr(m, name)
            for t in (value if isinstance(value, list) else [value]):
                if id(t) not in seen:
                    seen.add(id(t))
                    total += t.numel() * t.element_size()
    return total


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_one(images: int, classes: int, batch: int, thresholds: int | None, what: str) -> dict:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    names = [f"c{i}" for i in range(classes)]
    if what == "curves":
        metrics = recall_at_precision_metrics(classes, [0.9], thresholds)
    else:  # ClassificationReport's per-class figures and TensorBoard curve
        report = ClassificationReport(names)
    warm = next(batches(batch, classes, batch, seed=1))  # allocator and kernels warmed outside the measurement
    probs = warm[0].softmax(-1)
    if what == "curves":
        metrics.update(probs, warm[1])
        metrics.reset()
    else:
        report.per_class.update(probs, warm[1])
        report.pr_curve.update(probs, warm[1])
        report.per_class.reset()
        report.pr_curve.reset()
    base, base_peak = rss_mb(), peak_rss_mb()
    started = time.perf_counter()
    for logits, targets in batches(images, classes, batch):
        probs = logits.softmax(-1)  # as the callbacks do with validation_step's logits
        if what == "curves":
            metrics.update(probs, targets)
        else:
            report.per_class.update(probs, targets)
            report.pr_curve.update(probs, targets)
    updated = time.perf_counter()
    if what == "curves":
        computed = metrics.compute()
        [result] = results_from(computed, [0.9], names)
        ap, _ = macro_average_precision(computed)
        values = {"recall@precision0.90": result.macro, "ap": ap}
        size = state_bytes(metrics)
    else:
        per_class = report.per_class.compute()
        report.pr_curve.compute()
        values = {"macro_recall": per_class["recall"].mean().item()}
        size = state_bytes(report.per_class) + state_bytes(report.pr_curve)
    done = time.perf_counter()
    method = method_name(thresholds if what == "curves" else PR_CURVE_THRESHOLDS)
    return {"images": images, "classes": classes, "what": what, "method": method,
            "update_s": round(updated - started, 2), "compute_s": round(done - updated, 2),
            "peak_rss_growth_mb": round(max(peak_rss_mb(), base_peak) - base, 1),
            "state_mb": round(size / 2**20, 2), **{k: round(v, 4) for k, v in values.items() if v is not None}}


def run_evaluate(images: int, classes: int, batch: int) -> dict:
    """``evaluate``'s metric part on every logit at once (the plots and CSVs left out)."""
    from pvt_lightning.evaluation.calibration import calibrated_probs
    from pvt_lightning.evaluation.metrics import classification_report
    from pvt_lightning.evaluation.report import recall_at_precision_report

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    names = [f"c{i}" for i in range(classes)]
    base = rss_mb()
    logits, targets = torch.empty(images, classes), torch.empty(images, dtype=torch.long)
    for start, (chunk, chunk_targets) in zip(range(0, images, batch), batches(images, classes, batch)):
        logits[start:start + len(chunk)], targets[start:start + len(chunk)] = chunk, chunk_targets
    held = rss_mb() - base
    started = time.perf_counter()
    report = classification_report(logits, targets, names)
    at = recall_at_precision_report(calibrated_probs(logits), targets, names, [0.9])
    seconds = time.perf_counter() - started
    return {"images": images, "classes": classes, "what": "evaluate report metrics", "method": report["curves"]["method"],
            "seconds": round(seconds, 1), "logits_mb": round(held, 1), "peak_rss_growth_mb": round(peak_rss_mb() - base, 1),
            "ap": round(report["macro"]["average_precision"], 4), "recall@precision0.90": round(
                at["precisions"]["0.90"]["macro"], 4)}


def torchmetrics_update(images: int, classes: int, batch: int, thresholds: int, slices: int) -> dict:
    """torchmetrics' own binned update (``MulticlassPrecisionRecallCurve``) on ``slices`` batches, scaled."""
    from torchmetrics.classification import MulticlassPrecisionRecallCurve

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    metric = MulticlassPrecisionRecallCurve(classes, thresholds=thresholds)
    started = time.perf_counter()
    for i, (logits, targets) in enumerate(batches(images, classes, batch)):
        if i == slices:
            break
        metric.update(logits.softmax(-1), targets)
    seconds = time.perf_counter() - started
    return {"what": "torchmetrics binned update", "batches_timed": slices, "seconds": round(seconds, 2),
            "epoch_estimate_s": round(seconds * -(-images // batch) / slices, 1)}


def child(args: argparse.Namespace, thresholds: int | None, what: str) -> dict:
    cmd = [sys.executable, __file__, "--child", what, "--images", str(args.images), "--classes", str(args.classes),
           "--batch", str(args.batch), "--thresholds", "exact" if thresholds is None else str(thresholds)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200_000)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--exact-images", type=int, default=5000,
                        help="also run the exact path at this many images (images x classes = the limit)")
    parser.add_argument("--torchmetrics-update", type=int, default=4, metavar="BATCHES",
                        help="time torchmetrics' own binned update on this many batches (0: skip)")
    parser.add_argument("--evaluate", action="store_true", help="also time evaluate's report metrics (all logits held)")
    parser.add_argument("--child", choices=("curves", "report", "evaluate"))
    parser.add_argument("--thresholds", default="auto")
    args = parser.parse_args()
    if args.child == "evaluate":
        print(json.dumps(run_evaluate(args.images, args.classes, args.batch)))
        return
    if args.child:
        thresholds = None if args.thresholds == "exact" else int(args.thresholds)
        print(json.dumps(run_one(args.images, args.classes, args.batch, thresholds, args.child)))
        return
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
          f"{torch.__version__}, threads {os.environ.get('BENCH_THREADS', '1')}; exact limit {EXACT_LIMIT:,} scores")
    binned = curve_thresholds(args.images, args.classes)
    rows = [child(args, binned, "curves"), child(args, None, "report")]
    if args.exact_images:
        small = argparse.Namespace(**{**vars(args), "images": args.exact_images})
        rows.append(child(small, curve_thresholds(args.exact_images, args.classes), "curves"))
    if args.evaluate:
        rows.append(child(args, binned, "evaluate"))
    for row in rows:
        print(json.dumps(row))
    if args.torchmetrics_update and binned:
        print(json.dumps(torchmetrics_update(args.images, args.classes, args.batch, binned,
                                             args.torchmetrics_update)))


if __name__ == "__main__":
    main()
