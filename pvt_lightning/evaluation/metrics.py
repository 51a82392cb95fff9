"""Per-class and macro classification metrics of one split's logits (torchmetrics), and the most confused pairs."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

from pvt_lightning.evaluation.calibration import calibrated_probs, expected_calibration_error, log_loss
from pvt_lightning.training.curves import (
    CHUNK_ROWS,
    AveragePrecision,
    curve_method,
    curve_thresholds,
    update_in_chunks,
)


def classification_report(logits: torch.Tensor, targets: torch.Tensor, class_names: Sequence[str],
                          temperature: float = 1.0) -> dict[str, Any]:
    """Macro and per-class precision/recall/F1/support/AP, accuracy, top-5, log-loss and ECE.

    Precision/recall/F1 are of the argmax prediction (which temperature does not change); AP, log-loss
    and ECE of ``softmax(logits / temperature)``. A class never predicted has precision 0. AP is exact up to
    ``curves.EXACT_LIMIT`` images x classes, binned above (``curves``: how, in the report).
    """
    num_classes = len(class_names)
    probs = calibrated_probs(logits, temperature)
    predicted = probs.argmax(dim=-1)  # the counting metrics take the (N,) argmax, not (N, C) copies of the scores
    k = min(5, num_classes)

    def per_class(metric) -> list[float]:
        return metric(predicted, targets).tolist()

    precision = per_class(MulticlassPrecision(num_classes, average=None))
    recall = per_class(MulticlassRecall(num_classes, average=None))
    f1 = per_class(MulticlassF1Score(num_classes, average=None))
    thresholds = curve_thresholds(len(targets), num_classes)
    average_precision = update_in_chunks(AveragePrecision(num_classes, average=None, thresholds=thresholds), probs,
                                         targets)
    ap = [None if math.isnan(v) else v for v in average_precision.compute().tolist()]
    support = torch.bincount(targets, minlength=num_classes).tolist()
    confusion = MulticlassConfusionMatrix(num_classes)(predicted, targets)
    in_top_k = sum(int((probs[i:i + CHUNK_ROWS].topk(k, dim=-1).indices == targets[i:i + CHUNK_ROWS, None]).any(-1)
                       .sum()) for i in range(0, len(targets), CHUNK_ROWS))
    return {
        "num_images": len(targets),
        "num_classes": num_classes,
        "accuracy": MulticlassAccuracy(num_classes, average="micro")(predicted, targets).item(),
        f"top{k}_accuracy": in_top_k / max(1, len(targets)),
        "log_loss": log_loss(logits, targets, temperature),
        "ece": expected_calibration_error(probs, targets),
        "macro": {
            "precision": MulticlassPrecision(num_classes, average="macro")(predicted, targets).item(),
            "recall": MulticlassRecall(num_classes, average="macro")(predicted, targets).item(),
            "f1": MulticlassF1Score(num_classes, average="macro")(predicted, targets).item(),
            "average_precision": _nan_mean(ap),
        },
        "per_class": {name: {"precision": precision[i], "recall": recall[i], "f1": f1[i], "support": support[i],
                             "average_precision": ap[i]} for i, name in enumerate(class_names)},
        "most_confused": most_confused(confusion, class_names),
        "curves": curve_method(len(targets), num_classes, thresholds),
    }


def _nan_mean(values: Sequence[float | None]) -> float | None:
    """Mean of the values that exist (AP is None for a class absent from the split)."""
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def most_confused(confusion: torch.Tensor, class_names: Sequence[str], top: int = 20) -> list[dict[str, Any]]:
    """The ``top`` largest off-diagonal cells of the confusion matrix (rows true, columns predicted)."""
    off = confusion.clone()
    off.fill_diagonal_(0)
    counts, flat = off.flatten().topk(min(top, off.numel()))
    n = len(class_names)
    return [{"true": class_names[i // n], "predicted": class_names[i % n], "count": c}
            for c, i in zip(counts.tolist(), flat.tolist()) if c > 0]
