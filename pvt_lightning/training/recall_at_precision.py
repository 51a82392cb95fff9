"""Recall at a fixed precision: per class (one-vs-rest), the highest recall whose precision is at least P.

The practitioner's figure for "how much of a class do we catch when we may be wrong at most 1 - P of the
time". Computed with torchmetrics' ``MulticlassRecallAtFixedPrecision`` on softmax probabilities, exact
(every distinct score is a threshold, as scikit-learn's ``precision_recall_curve``) while the scores it keeps,
images x classes, number at most ``EXACT_LIMIT``; binned on ``BINNED_THRESHOLDS`` evenly spaced thresholds
above that (constant memory, recall read at thresholds 0.001 apart; ``curves.py``). A class whose precision
never reaches P has recall 0 and counts as *unreached*. The same state gives the average precision per class
(``AP_KEY``). Used by the training callback (``callbacks/recall_at_precision.py``) and by ``evaluate``'s report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import MultilabelRecallAtFixedPrecision

from pvt_lightning.tags import precision_label
from pvt_lightning.training.curves import (  # noqa: F401 (the size rule, re-exported)
    BINNED_THRESHOLDS,
    EXACT_LIMIT,
    AveragePrecision,
    RecallAtFixedPrecision,
    curve_thresholds,
    method_name,
    update_in_chunks,
)

DEFAULT_PRECISIONS = (0.9,)
AP_KEY = "ap"
"""The per-class average precision in ``recall_at_precision_metrics``' collection."""


def check_precisions(precisions: Sequence[float]) -> list[float]:
    """The P values as floats: each in (0, 1], with at most two decimals (tags name P with two), no repeats."""
    values = [float(p) for p in precisions]
    for p in values:
        if not 0 < p <= 1:
            raise ValueError(f"precision {p} is not in (0, 1]")
        if abs(round(p, 2) - p) > 1e-9:
            raise ValueError(f"precision {p} has more than two decimals; tags name P with two (e.g. 0.95)")
    if len({precision_label(p) for p in values}) != len(values):
        raise ValueError(f"precision values {values} repeat")
    return values


def metric_key(precision: float) -> str:
    """A metric's name in the collection (module names cannot hold a dot): ``0.9`` -> ``p0_90``."""
    return "p" + precision_label(precision).replace(".", "_")


def recall_at_precision_metrics(num_classes: int, precisions: Sequence[float],
                                thresholds: int | None, multilabel: bool = False) -> MetricCollection:
    """One ``MulticlassRecallAtFixedPrecision`` per P, keyed by ``metric_key``, and the per-class average
    precision (``AP_KEY``), sharing one state (the scores, or the binned counts): all read off the same
    precision-recall curve. ``multilabel``: torchmetrics' multilabel metrics (each class on its own sigmoid,
    multi-hot targets; their binned update is torchmetrics' own; no ``AP_KEY``: the module logs ``val/map``)."""
    if multilabel:
        metrics = {metric_key(p): MultilabelRecallAtFixedPrecision(num_classes, min_precision=float(p),
                                                                   thresholds=thresholds) for p in precisions}
    else:
        metrics = {metric_key(p): RecallAtFixedPrecision(num_classes, min_precision=float(p), thresholds=thresholds)
                   for p in precisions}
        metrics[AP_KEY] = AveragePrecision(num_classes, average=None, thresholds=thresholds)
    return MetricCollection(metrics, compute_groups=[list(metrics)])  # explicit: the state is shared on purpose


def macro_average_precision(computed: dict[str, Any]) -> tuple[float | None, list[float | None]]:
    """The macro AP (mean over classes present) and the per-class APs (None: class absent) of a computed collection
    (None and [] for a multi-label one, which holds no AP)."""
    if AP_KEY not in computed:
        return None, []
    per_class = [None if math.isnan(v) else float(v) for v in computed[AP_KEY].float().cpu().tolist()]
    present = [v for v in per_class if v is not None]
    return (sum(present) / len(present) if present else None), per_class


@dataclass(frozen=True)
class RecallAtPrecision:
    """Recall at precision ``precision``, per class (0 where unreached), their macro mean and the unreached."""

    precision: float
    per_class: list[float]
    thresholds: list[float | None]
    """Per class, the lowest probability threshold that gives the recall (None where unreached)."""
    class_names: list[str]

    @property
    def macro(self) -> float:
        return sum(self.per_class) / len(self.per_class) if self.per_class else 0.0

    @property
    def unreached(self) -> list[str]:
        return [name for name, recall in zip(self.class_names, self.per_class) if recall == 0]

    def of(self, class_name: str) -> float:
        return self.per_class[self.class_names.index(class_name)]


def results_from(computed: dict[str, Any], precisions: Sequence[float],
                 class_names: Sequence[str]) -> list[RecallAtPrecision]:
    """``recall_at_precision_metrics(...).compute()`` as one ``RecallAtPrecision`` per P, in the order given."""
    results = []
    for p in precisions:
        recall, threshold = computed[metric_key(p)]
        recall = [float(r) for r in recall.float().cpu().tolist()]
        threshold = [None if r == 0 or t != t else float(t) for r, t in zip(recall, threshold.float().cpu().tolist())]
        results.append(RecallAtPrecision(float(p), recall, threshold, list(class_names)))
    return results


def recall_at_precision(probs: torch.Tensor, targets: torch.Tensor, class_names: Sequence[str],
                        precisions: Sequence[float] = DEFAULT_PRECISIONS,
                        thresholds: int | None | str = "auto") -> tuple[list[RecallAtPrecision], int | None]:
    """Recall at each precision in ``precisions`` of probabilities (N, C) against classes (N,), or multi-hot
    targets (N, C) for multi-label; ``thresholds`` "auto" chooses exact or binned by size (``curve_thresholds``).
    Returns the results and the thresholds used."""
    precisions = check_precisions(precisions)
    if thresholds == "auto":
        thresholds = curve_thresholds(len(targets), len(class_names))
    metrics = recall_at_precision_metrics(len(class_names), precisions, thresholds, multilabel=targets.ndim == 2)
    update_in_chunks(metrics, probs.float(), targets.long())
    return results_from(metrics.compute(), precisions, class_names), thresholds
