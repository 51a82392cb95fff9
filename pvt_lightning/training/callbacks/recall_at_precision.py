"""Recall at a fixed precision every validation epoch: per class, its macro mean, and the classes that never reach P;
and the macro average precision, read off the same curve.

Tags (``pvt_lightning.tags``): ``val/recall@precision0.90`` (macro), ``val/recall@precision0.90/<class>`` and
``val/unreached@precision0.90`` (how many classes never reach P), one set per ``--report-precision``; ``val/ap``.
The values also go into ``trainer.callback_metrics``, so ``--monitor val/recall@precision0.90`` (or ``val/ap``)
picks checkpoints. The curve is exact or binned by the validation set's size (``training/curves.py``); summary.json's
``validation_curves`` says which.
"""

from __future__ import annotations

from typing import Any, Sequence

import lightning as L
import torch

from pvt_lightning import tags
from pvt_lightning.training.callbacks.loggers import log_epoch_scalars
from pvt_lightning.training.callbacks.report import PR_CURVE_THRESHOLDS
from pvt_lightning.training.curves import curve_method
from pvt_lightning.training.recall_at_precision import (
    DEFAULT_PRECISIONS,
    EXACT_LIMIT,
    RecallAtPrecision,
    check_precisions,
    curve_thresholds,
    macro_average_precision,
    method_name,
    recall_at_precision_metrics,
    results_from,
)


class RecallAtPrecisionReport(L.Callback):
    """Per validation epoch, one-vs-rest recall at each precision in ``precisions`` (exact or binned, see
    ``training/recall_at_precision.py``); reads the ``{"logits", "target"}`` dict ``validation_step`` returns.

    ``history`` keeps each validated epoch's scalars (the summary reads the best and the last epoch's).
    """

    def __init__(self, class_names: Sequence[str], precisions: Sequence[float] = DEFAULT_PRECISIONS,
                 positive_class: str | None = None, exact_limit: int = EXACT_LIMIT, multilabel: bool = False):
        self.class_names = list(class_names)
        self.multilabel = multilabel  # each class on its own sigmoid against multi-hot targets
        self.precisions = check_precisions(precisions)
        self.positive_class = positive_class
        self.exact_limit = exact_limit
        self.metrics = None
        self.thresholds: int | None = None
        self.results: list[RecallAtPrecision] = []
        """The latest validation epoch's results, one per precision."""
        self.average_precision: float | None = None
        """The latest validation epoch's macro AP (mean over the classes present)."""
        self.validation_images = 0
        self.history: dict[int, dict[str, float]] = {}
        self.updated = False

    @property
    def method(self) -> str:
        """``exact`` or ``binned (N thresholds)``, once the first validation chose."""
        return method_name(self.thresholds)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.metrics is None:  # the validation set's size decides exact or binned (the same on every rank)
            self.validation_images = validation_size(trainer)
            self.thresholds = curve_thresholds(self.validation_images, len(self.class_names), self.exact_limit)
            self.metrics = recall_at_precision_metrics(len(self.class_names), self.precisions, self.thresholds,
                                                       self.multilabel)
        self.metrics.to(pl_module.device)
        self.metrics.reset()
        self.updated = False

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if trainer.sanity_checking or outputs is None:  # None: a batch of unreadable images only, skipped
            return
        if self.multilabel:
            self.metrics.update(outputs["logits"].float().sigmoid(), outputs["target"].round().long())
        else:
            self.metrics.update(outputs["logits"].float().softmax(dim=-1), outputs["target"])
        self.updated = True

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not self.updated:
            return
        # compute() is a collective under DDP: every rank calls it, rank 0 logs.
        computed = self.metrics.compute()
        self.results = results_from(computed, self.precisions, self.class_names)
        self.average_precision, _ = macro_average_precision(computed)
        scalars = self.scalars()
        self.history[trainer.current_epoch] = scalars
        # float64: summary.json's last and best values are the same numbers
        trainer.callback_metrics.update({tag: torch.tensor(value, dtype=torch.float64)
                                         for tag, value in scalars.items()})
        log_epoch_scalars(trainer, scalars)

    def scalars(self) -> dict[str, float]:
        """The latest results by tag: macro, per class and the unreached count, for every precision."""
        scalars = {} if self.average_precision is None else {tags.VAL_AP: self.average_precision}
        for result in self.results:
            scalars[tags.recall_at_precision_tag(result.precision)] = result.macro
            scalars[tags.unreached_tag(result.precision)] = float(len(result.unreached))
            for name, value in zip(result.class_names, result.per_class):
                scalars[tags.recall_at_precision_tag(result.precision, name)] = value
        return scalars

    def summary_tags(self) -> list[str]:
        """The tags summary.json keeps: the macro figure per precision, and the positive class's."""
        kept = [tags.VAL_AP, *(tags.recall_at_precision_tag(p) for p in self.precisions)]
        if self.positive_class is not None:
            kept += [tags.recall_at_precision_tag(p, self.positive_class) for p in self.precisions]
        return kept

    def summary(self) -> dict[str, Any]:
        """summary.json's ``recall_at_precision`` block: how it was computed and, per P, the classes never
        reaching it at the last validated epoch."""
        return {
            "precisions": self.precisions,
            "method": "exact" if self.thresholds is None else "binned",
            "thresholds": self.thresholds,
            "positive_class": self.positive_class,
            "unreached": {tags.precision_label(r.precision): len(r.unreached) for r in self.results},
            "unreached_classes": {tags.precision_label(r.precision): r.unreached[:50] for r in self.results},
        }

    def curves_summary(self) -> dict[str, Any]:
        """summary.json's ``validation_curves`` block: how ``val/ap`` and recall at precision were computed (exact or
        binned, and the rule), and the TensorBoard PR curves' resolution."""
        return {**curve_method(self.validation_images, len(self.class_names), self.thresholds, self.exact_limit),
                "metrics": [tags.VAL_AP, *(tags.recall_at_precision_tag(p) for p in self.precisions)],
                "tensorboard_pr_curves": method_name(PR_CURVE_THRESHOLDS)}


def validation_size(trainer: L.Trainer) -> int:
    """Images in the validation set (all ranks): what the exact curve would keep a score per class of."""
    loaders = trainer.val_dataloaders
    loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
    total = 0
    for loader in loaders:
        dataset = getattr(loader, "dataset", None)
        try:
            total += len(dataset)
        except TypeError:  # an iterable dataset without a length: assume large
            return 2 ** 62
    return total
