"""Multi-label evaluation: each class on its own sigmoid against multi-hot targets (N, C) (docs/multilabel.md).

What ``evaluate`` writes for a multi-label checkpoint: ``report.json`` (macro and per-class precision/recall/F1 at
0.5, AP, mAP, recall at fixed precision), ``per_class.csv`` (the single-label columns, ``average_precision``
included), ``predictions.csv`` (true and predicted label sets, ``|``-separated, and ``prob_<class>``),
``pr_curves.png``, ``cooccurrence.png`` (instead of the confusion matrix, which needs one class per image) and,
with a target, ``operating_point.json`` holding one threshold per class.

Calibration is one temperature over all logits, ``sigmoid(logits / T)``, fitted by binary cross-entropy on the
split. Not one per class: the thresholds are chosen per class on the calibrated probabilities, and a per-class
temperature is a monotone map of that class's scores, so it would move each threshold without changing a single
decision or AP; what calibration adds is probabilities that read as frequencies, and one T fitted on all N x C
logits is stable where a per-class T would be fitted on a rare class's handful of positives.
"""

from __future__ import annotations

import csv
import io
import json
import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torchmetrics.classification import (
    MultilabelAveragePrecision,
    MultilabelF1Score,
    MultilabelPrecision,
    MultilabelPrecisionRecallCurve,
    MultilabelRecall,
)

from pvt_lightning.evaluation.calibration import minimise_over_temperature
from pvt_lightning.evaluation.operating_point import (
    OPERATING_POINT_FILE,
    OperatingPoint,
)
from pvt_lightning.evaluation.plots import DPI, png_bytes, pr_curves_png
from pvt_lightning.evaluation.report import _json_safe, add_recall_at_precision, per_class_csv
from pvt_lightning.training.callbacks.figures import draw_matrix

DEFAULT_THRESHOLD = 0.5
SEPARATOR = "|"
FILES = ("report.json", "per_class.csv", "predictions.csv", "cooccurrence.png", "pr_curves.png")
TEMPERATURE_RANGE = (1e-2, 1e2)


def fit_sigmoid_temperature(logits: torch.Tensor, targets: torch.Tensor, max_iter: int = 100) -> float:
    """The one T minimising the BCE of ``sigmoid(logits / T)`` against multi-hot ``targets`` (LBFGS on log T)."""
    logits, targets = logits.double(), targets.double()
    temperature = minimise_over_temperature(lambda t: F.binary_cross_entropy_with_logits(logits / t, targets),
                                            lr=0.1, max_iter=max_iter)
    low, high = TEMPERATURE_RANGE
    return float(min(max(temperature, low), high))


def bce(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean binary cross-entropy per (image, class)."""
    return F.binary_cross_entropy_with_logits(logits.double() / temperature, targets.double()).item()


def label_sets(rows: torch.Tensor, class_names: Sequence[str]) -> list[str]:
    """Boolean (N, C) -> per image the ``|``-joined names of its true entries ("" for none)."""
    return [SEPARATOR.join(class_names[c] for c in row.nonzero().flatten().tolist()) for row in rows]


def over_thresholds(probs: torch.Tensor, thresholds: Sequence[float | None] | float) -> torch.Tensor:
    """Boolean (N, C): each class's probability at or above its threshold (None: never)."""
    if isinstance(thresholds, (int, float)):
        return probs >= thresholds
    limits = torch.tensor([math.inf if t is None else t for t in thresholds], dtype=probs.dtype)
    return probs >= limits


def choose_multilabel_thresholds(probs: torch.Tensor, targets: torch.Tensor, class_names: Sequence[str],
                                 target_precision: float | None = None,
                                 target_recall: float | None = None) -> dict[str, float | None]:
    """Per class on its own sigmoid: the lowest threshold with precision >= ``target_precision``, or the highest with
    recall >= ``target_recall`` (None where none does or the class has no positive). As the single-label
    ``choose_thresholds``, on ``MultilabelPrecisionRecallCurve`` (exact: every distinct score a threshold)."""
    if (target_precision is None) == (target_recall is None):
        raise ValueError("give exactly one of target_precision and target_recall")
    precision, recall, thresholds = MultilabelPrecisionRecallCurve(len(class_names))(probs, targets.long())
    chosen: dict[str, float | None] = {}
    for i, name in enumerate(class_names):
        scores = thresholds[i]
        p, r = precision[i][: len(scores)], recall[i][: len(scores)]
        support = int(targets[:, i].sum())
        ok = ((p >= target_precision) if target_precision is not None else (r >= target_recall)).nonzero().flatten()
        index = (ok[0] if target_precision is not None else ok[-1]) if len(ok) and support else None
        chosen[name] = None if index is None else scores[index].item()
    return chosen


def multilabel_operating_report(probs: torch.Tensor, targets: torch.Tensor, point: OperatingPoint) -> dict[str, Any]:
    """What the per-class thresholds give on this split: per class precision and recall (next to the target), and
    the label sets' exact-match ratio and mean size."""
    decided = over_thresholds(probs, list(point.thresholds.values()))
    truth = targets.bool()
    per_class = {}
    for i, (name, t) in enumerate(point.thresholds.items()):
        tp = int((decided[:, i] & truth[:, i]).sum())
        per_class[name] = {"threshold": t,
                           "precision": tp / int(decided[:, i].sum()) if decided[:, i].any() else None,
                           "recall": tp / int(truth[:, i].sum()) if truth[:, i].any() else None}
    return {
        "target": point.target, "temperature": point.temperature, "unreachable": point.unreachable,
        "per_class": per_class,
        "exact_match": (decided == truth).all(dim=1).float().mean().item() if len(truth) else None,
        "labels_per_image": decided.sum(dim=1).float().mean().item() if len(truth) else None,
    }


def multilabel_report(probs: torch.Tensor, targets: torch.Tensor, class_names: Sequence[str],
                      threshold: float = DEFAULT_THRESHOLD) -> dict[str, Any]:
    """Macro and per-class precision/recall/F1 at ``threshold`` (each class's sigmoid), support (positive images),
    average precision (scikit-learn's ``average_precision_score``; None for a class without a positive) and mAP."""
    n, hard = len(class_names), targets.long()
    precision = MultilabelPrecision(n, threshold=threshold, average=None)(probs, hard).tolist()
    recall = MultilabelRecall(n, threshold=threshold, average=None)(probs, hard).tolist()
    f1 = MultilabelF1Score(n, threshold=threshold, average=None)(probs, hard).tolist()
    support = hard.sum(dim=0).tolist()
    ap = MultilabelAveragePrecision(n, average=None)(probs, hard).tolist()
    ap = [None if support[i] == 0 or math.isnan(v) else v for i, v in enumerate(ap)]
    kept = [v for v in ap if v is not None]
    decided = probs >= threshold
    return {
        "task": "multilabel",
        "num_images": len(targets), "num_classes": n, "threshold": threshold,
        "unlabelled_images": int((hard.sum(dim=1) == 0).sum()),
        "labels_per_image": hard.sum(dim=1).float().mean().item() if len(hard) else 0.0,
        "exact_match": (decided == hard.bool()).all(dim=1).float().mean().item() if len(hard) else 0.0,
        "map": sum(kept) / len(kept) if kept else None,
        "macro": {"precision": sum(precision) / n, "recall": sum(recall) / n, "f1": sum(f1) / n,
                  "average_precision": sum(kept) / len(kept) if kept else None},
        "per_class": {name: {"precision": precision[i], "recall": recall[i], "f1": f1[i], "support": support[i],
                             "average_precision": ap[i]} for i, name in enumerate(class_names)},
    }


def multilabel_predictions_csv(paths: Sequence[str], probs: torch.Tensor, class_names: Sequence[str],
                               thresholds: Sequence[float | None] | float = DEFAULT_THRESHOLD,
                               targets: torch.Tensor | None = None) -> str:
    """One row per image: path, [true_labels,] labels (every class at or above its threshold), prob_<class>...;
    probabilities with 9 significant digits (float32 values read back exactly)."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["path", *(["true_labels"] if targets is not None else []), "labels",
                     *(f"prob_{name}" for name in class_names)])
    labels = label_sets(over_thresholds(probs, thresholds), class_names)
    true = label_sets(targets.bool(), class_names) if targets is not None else None
    for n, (path, row) in enumerate(zip(paths, probs.tolist())):
        writer.writerow([path, *([true[n]] if true is not None else []), labels[n], *(f"{q:.9g}" for q in row)])
    return out.getvalue()


def cooccurrence_png(targets: torch.Tensor, decided: torch.Tensor, class_names: Sequence[str]) -> bytes:
    """Label co-occurrence, true (left) and predicted (right): cell (i, j) counts images labelled both i and j (the
    diagonal: images labelled i). Multi-label's counterpart of the confusion matrix."""
    true, predicted = targets.double(), decided.double()
    side = min(max(4.0, 1.5 + 0.45 * len(class_names)), 14.0)
    figure = Figure(figsize=(2 * side + 1.5, side + 1.0), dpi=DPI)
    for k, (matrix, title) in enumerate(((true.T @ true, "true labels"), (predicted.T @ predicted, "predicted"))):
        ax = figure.add_subplot(1, 2, k + 1)
        draw_matrix(ax, matrix, list(class_names), title, ".0f")
        ax.set_xlabel("label")
        ax.set_ylabel("label")
    figure.suptitle("label co-occurrence: images labelled both row and column (diagonal: images per label)")
    figure.tight_layout()
    return png_bytes(figure)


def multilabel_evaluation_files(logits: torch.Tensor, targets: torch.Tensor, paths: Sequence[str],
                                class_names: Sequence[str], *, calibrate: bool = False,
                                target_precision: float | None = None, target_recall: float | None = None,
                                operating_point: OperatingPoint | None = None, split: str | None = None,
                                checkpoint: str | None = None, extra: dict[str, Any] | None = None,
                                report_precisions: Sequence[float] | None = None,
                                ) -> tuple[dict[str, Any], dict[str, bytes | str]]:
    """``evaluation_files`` for multi-hot ``targets`` (N, C): the report and every file (name -> content).

    Metrics are of the model as is (T = 1; AP does not depend on T); with ``calibrate`` one temperature is fitted
    (module docstring) and thresholds, decisions and the written probabilities use ``sigmoid(logits / T)``.
    A given ``operating_point`` (chosen on another split) is measured here instead of choosing one.
    """
    logits, targets = logits.float().cpu(), targets.float().cpu()
    point = operating_point
    temperature = point.temperature if point else fit_sigmoid_temperature(logits, targets) if calibrate else 1.0
    scaled = calibrate or point is not None
    raw = logits.sigmoid()
    probs = (logits / temperature).sigmoid()
    report = {"checkpoint": checkpoint, "split": split, **(extra or {}), **multilabel_report(raw, targets, class_names)}
    report["log_loss"] = bce(logits, targets)
    report["calibration"] = ({"temperature": temperature, "scope": "one temperature over all classes",
                              "bce_before": bce(logits, targets), "bce_after": bce(logits, targets, temperature)}
                             if scaled else None)
    add_recall_at_precision(report, raw, targets.long(), class_names, report_precisions)
    if point is None and (target_precision is not None or target_recall is not None):
        target = {"precision": target_precision} if target_precision is not None else {"recall": target_recall}
        thresholds = choose_multilabel_thresholds(probs, targets, class_names, target_precision, target_recall)
        point = OperatingPoint(temperature, thresholds, target, split, checkpoint, task="multilabel")
    operating = multilabel_operating_report(probs, targets, point) if point else None
    if operating_point is not None:
        operating["chosen_on"] = {"split": point.split, "checkpoint": point.checkpoint}
    report["operating_point"] = operating
    limits = list(point.thresholds.values()) if point else DEFAULT_THRESHOLD
    ap = torch.tensor([math.nan if v is None else v for v in
                       (report["per_class"][name]["average_precision"] for name in class_names)])
    files: dict[str, bytes | str] = {
        "report.json": json.dumps(_json_safe(report), indent=2, allow_nan=False) + "\n",
        "per_class.csv": per_class_csv(report, operating),
        "predictions.csv": multilabel_predictions_csv(paths, probs, class_names, limits, targets),
        "cooccurrence.png": cooccurrence_png(targets, over_thresholds(probs, limits), class_names),
        "pr_curves.png": pr_curves_png(raw, targets.long(), class_names, ap),
    }
    if point is not None and operating_point is None:
        files[OPERATING_POINT_FILE] = point.to_json()
    return report, files


def multilabel_summary_lines(report: dict[str, Any]) -> list[str]:
    """The terminal lines of a multi-label evaluation."""
    macro = report["macro"]
    lines = [f"{report['num_images']} images ({report['unlabelled_images']} unlabelled) | mAP "
             f"{_fmt(report['map'])} | at {report['threshold']:g}: macro P {macro['precision']:.4f} R "
             f"{macro['recall']:.4f} F1 {macro['f1']:.4f}, exact match {report['exact_match']:.4f} | BCE "
             f"{report['log_loss']:.4f}"]
    for label, at in (report.get("recall_at_precision") or {}).get("precisions", {}).items():
        lines.append(f"recall at precision {label}: macro {at['macro']:.4f}"
                     + (f"; never reached by {', '.join(at['unreached'][:10])}" if at["unreached"] else ""))
    if report.get("calibration"):
        c = report["calibration"]
        lines.append(f"calibration ({c['scope']}): T {c['temperature']:.3f} | BCE {c['bce_before']:.4f} -> "
                     f"{c['bce_after']:.4f}")
    op = report.get("operating_point")
    if op:
        (metric, value), = op["target"].items() if op["target"] else (("precision", float("nan")),)
        where = f"chosen on {op['chosen_on']['split']}, measured here" if "chosen_on" in op else "chosen here"
        measured = ", ".join(f"{name} {_fmt(m[metric])}" for name, m in op["per_class"].items())
        lines.append(f"operating point ({metric} >= {value}, {where}): per-class {metric} {measured}; exact match "
                     f"{_fmt(op['exact_match'])}")
    return lines


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def multilabel_prediction_columns(class_names: Sequence[str]) -> list[str]:
    """``predict``'s CSV for a multi-label model: path, labels (``|``-separated), one ``prob_<class>`` per class."""
    return ["path", "labels", *(f"prob_{name}" for name in class_names)]


def multilabel_prediction_rows(paths: Sequence[str], logits: torch.Tensor, class_names: Sequence[str],
                               point: OperatingPoint | None = None, apply: bool = False,
                               threshold: float = DEFAULT_THRESHOLD) -> list[list[str]]:
    """Rows under ``multilabel_prediction_columns``: ``sigmoid(logits)`` and every label at or above ``threshold``;
    with an applied ``point``, ``sigmoid(logits / T)`` and every label at or above its class's threshold."""
    applied = point is not None and apply
    probs = (logits.float() / (point.temperature if applied else 1.0)).sigmoid()
    labels = label_sets(over_thresholds(probs, list(point.thresholds.values()) if applied else threshold), class_names)
    return [[path, labels[n], *(f"{q:.9g}" for q in row)] for n, (path, row) in enumerate(zip(paths, probs.tolist()))]
