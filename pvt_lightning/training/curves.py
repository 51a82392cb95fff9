"""Precision-recall curves and what is read off them (AP, recall at a fixed precision), exact or binned by size.

Exact (torchmetrics' ``thresholds=None``: every distinct score is a threshold, as scikit-learn's
``precision_recall_curve`` and ``average_precision_score``) keeps every probability, images x classes, on
every DDP rank and gathers them: fine for a small split, gigabytes for a large one. So the exact curve is used
while images x classes is at most ``EXACT_LIMIT``; above it the curve is binned (torchmetrics' ``thresholds=
BINNED_THRESHOLDS``: counts at 1001 evenly spaced thresholds 0, 0.001, ..., 1), whose state is a fixed
thresholds x classes x 2 x 2 int64 count table whatever the number of images.

torchmetrics' binned update compares every score with every threshold (images x classes x thresholds
operations: minutes at 200k images x 1000 classes). The classes here give the same count table in one pass
(``binned_counts``: each score's bin by binary search, then one ``bincount``), so binned validation stays in
seconds; the exact path is torchmetrics' own.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics.classification import (
    MulticlassAveragePrecision,
    MulticlassPrecisionRecallCurve,
    MulticlassRecallAtFixedPrecision,
)

EXACT_LIMIT = 5_000_000
"""Largest images x classes computed exactly (e.g. 50,000 images of 100 classes: 20 MB of float32 scores per
process, gathered across DDP ranks); above it the binned curve is used."""
BINNED_THRESHOLDS = 1001
"""Thresholds 0, 0.001, ..., 1 of the binned curve (memory: thresholds x classes x 4 int64 counts, 32 MB at
1000 classes)."""


def curve_thresholds(num_images: int, num_classes: int, exact_limit: int | None = None) -> int | None:
    """None (exact) when ``num_images x num_classes <= exact_limit`` (default ``EXACT_LIMIT``), else
    ``BINNED_THRESHOLDS``."""
    limit = EXACT_LIMIT if exact_limit is None else exact_limit
    return None if num_images * num_classes <= limit else BINNED_THRESHOLDS


def method_name(thresholds: int | None) -> str:
    """How a report names the computation: ``exact`` or ``binned (1001 thresholds)``."""
    return "exact" if thresholds is None else f"binned ({thresholds} thresholds)"


def curve_method(num_images: int, num_classes: int, thresholds: int | None, exact_limit: int | None = None) -> dict:
    """The reports' statement of how curves, AP and recall at precision were computed, and why."""
    exact_limit = EXACT_LIMIT if exact_limit is None else exact_limit
    return {"method": method_name(thresholds), "thresholds": thresholds, "images": num_images,
            "classes": num_classes, "exact_limit": exact_limit,
            "rule": f"exact while images x classes <= {exact_limit:,}, else binned at {BINNED_THRESHOLDS} "
                    "evenly spaced thresholds"}


def score_histogram(probs: Tensor, target: Tensor, thresholds: Tensor) -> Tensor:
    """``(T + 1, C, 2)`` int64: per class, how many negatives ([..., 0]) and positives ([..., 1]) have exactly ``b``
    thresholds at or below their score (``probs >= thresholds[j]`` exactly when ``j < b``), from probabilities
    (N, C) and classes (N,); one binary search and one ``bincount``. Histograms add up over batches and ranks."""
    num_thresholds, num_classes = len(thresholds), probs.shape[1]
    probs = probs.to(thresholds.dtype).contiguous()
    above = torch.searchsorted(thresholds, probs, right=True)
    above[probs.isnan()] = 0  # NaN >= t is False for every t, as in torchmetrics
    key = (above * num_classes + torch.arange(num_classes, device=probs.device)) * 2
    key[torch.arange(len(target), device=target.device), target] += 1  # the true class: a positive
    hist = torch.bincount(key.flatten(), minlength=(num_thresholds + 1) * num_classes * 2)
    return hist.reshape(num_thresholds + 1, num_classes, 2)


def counts_from_histogram(hist: Tensor) -> Tensor:
    """torchmetrics' multiclass binned state, ``(T, C, 2, 2)`` int64 ``[[TN, FP], [FN, TP]]`` per threshold and
    class for ``probs >= threshold``, from a ``score_histogram``."""
    at_or_above = hist.flip(0).cumsum(0).flip(0)[1:]  # (T, C, [negatives, positives]) with score >= threshold
    total = hist.sum(0)
    fp, tp = at_or_above[..., 0], at_or_above[..., 1]
    tn, fn = total[:, 0] - fp, total[:, 1] - tp
    return torch.stack([torch.stack([tn, fp], -1), torch.stack([fn, tp], -1)], -2)


def binned_counts(probs: Tensor, target: Tensor, thresholds: Tensor) -> Tensor:
    """Equal to torchmetrics' ``_multiclass_precision_recall_curve_update`` with the same (ascending)
    ``thresholds``, in O(N x C log T) rather than O(N x C x T)."""
    return counts_from_histogram(score_histogram(probs, target, thresholds))


CHUNK_ROWS = 4096
"""Rows per update when a whole split is measured at once (``update_in_chunks``): bounded temporaries."""


def update_in_chunks(metric, probs: Tensor, target: Tensor, rows: int = CHUNK_ROWS):
    """``metric.update`` over ``rows`` images at a time (a binned update's temporaries are rows x classes int64,
    not the whole split's); returns ``metric`` for chaining."""
    for start in range(0, len(target), rows):
        metric.update(probs[start:start + rows], target[start:start + rows])
    return metric


class _FastBinned:
    """A torchmetrics multiclass PR-curve metric whose binned update adds a ``score_histogram`` (one pass over the
    batch, a fixed (T + 1) x C x 2 state summed across DDP ranks) and whose compute turns it into torchmetrics'
    own counts first; its input must be probabilities (N, C). The exact path (``thresholds=None``) is unchanged."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.thresholds is not None:
            self.add_state("histogram", default=torch.zeros(len(self.thresholds) + 1, self.num_classes, 2,
                                                            dtype=torch.long), dist_reduce_fx="sum")
            for table in (self._defaults, self._reductions, self._persistent):  # the counts are derived, not kept
                table.pop("confmat", None)
            self.confmat = None

    def update(self, preds: Tensor, target: Tensor) -> None:
        if self.thresholds is None:
            return super().update(preds, target)
        if preds.ndim != 2 or target.ndim != 1 or len(preds) != len(target):
            raise ValueError(f"expected probabilities (N, C) and classes (N,), got {tuple(preds.shape)} and "
                             f"{tuple(target.shape)}")
        self.histogram += score_histogram(preds.detach(), target.detach().long(), self.thresholds)
        return None

    def compute(self):
        if self.thresholds is not None:
            self.confmat = counts_from_histogram(self.histogram)
        return super().compute()


class PrecisionRecallCurve(_FastBinned, MulticlassPrecisionRecallCurve):
    """``MulticlassPrecisionRecallCurve`` with the one-pass binned update."""


class AveragePrecision(_FastBinned, MulticlassAveragePrecision):
    """``MulticlassAveragePrecision`` with the one-pass binned update."""


class RecallAtFixedPrecision(_FastBinned, MulticlassRecallAtFixedPrecision):
    """``MulticlassRecallAtFixedPrecision`` with the one-pass binned update."""
