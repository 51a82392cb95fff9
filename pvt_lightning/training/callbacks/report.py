"""Per-class validation figures: precision/recall scalars per class, confusion matrix, PR curves, one-vs-rest.

Macro precision/recall/F1/accuracy are logged by ``ImageClassifier`` itself; ``ClassificationReport`` adds
what a macro average hides.
"""

from __future__ import annotations

from typing import Any, Sequence

import lightning as L
import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    BinaryPrecision,
    BinaryRecall,
    MulticlassConfusionMatrix,
    MulticlassPrecision,
    MulticlassRecall,
)

from pvt_lightning import tags
from pvt_lightning.training.callbacks.figures import confusion_matrix_figure
from pvt_lightning.training.callbacks.loggers import log_epoch_scalars, tensorboard_writers
from pvt_lightning.training.curves import PrecisionRecallCurve, counts_from_histogram

PR_CURVE_THRESHOLDS = 101
"""Points of the TensorBoard PR curves (binned at every size: a picture, not a figure read off)."""


class ClassificationReport(L.Callback):
    """Per-class precision/recall, confusion matrix, PR curves and optional one-class-vs-rest figures.

    It reads the ``{"logits", "target"}`` dict that ``validation_step`` returns.
    Tags: ``val/precision/<class>``, ``val/recall/<class>`` (scalars), ``val/confusion_matrix``
    (image), ``val/pr_curve/<class>`` (PR-curve plugin) and, with ``positive_class``,
    ``val/positive/{precision,recall}/<class>`` at ``threshold`` on that class's softmax probability.
    """

    def __init__(self, class_names: Sequence[str], positive_class: str | None = None, threshold: float = 0.5,
                 pr_curve_thresholds: int = PR_CURVE_THRESHOLDS):
        if positive_class is not None and positive_class not in class_names:
            raise ValueError(f"positive class {positive_class!r} is not one of the classes {list(class_names)}; "
                             "pass one of these names to --positive-class")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold {threshold} is not a probability; pass a value in [0, 1] to --threshold")
        self.class_names = list(class_names)
        self.positive_class = positive_class
        self.threshold = threshold
        num_classes = len(self.class_names)
        self.per_class = MetricCollection({
            "precision": MulticlassPrecision(num_classes, average=None),
            "recall": MulticlassRecall(num_classes, average=None),
            "confusion": MulticlassConfusionMatrix(num_classes),
        }, compute_groups=[["precision", "recall"], ["confusion"]])  # explicit: inferred groups can merge wrongly
        # Binned: memory O(thresholds x classes) however large the validation set, one pass per batch (curves.py).
        self.pr_curve = PrecisionRecallCurve(num_classes, thresholds=pr_curve_thresholds)
        self.positive = None
        if positive_class is not None:
            self.positive_index = self.class_names.index(positive_class)
            self.positive = MetricCollection(
                {"precision": BinaryPrecision(threshold), "recall": BinaryRecall(threshold)},
                compute_groups=[["precision", "recall"]],
            )
        self.last_scalars: dict[str, float] = {}
        """Scalars of the latest validation epoch, by tag (the CLI can copy the positive-class ones)."""

    def _metrics(self) -> list:
        return [m for m in (self.per_class, self.pr_curve, self.positive) if m is not None]

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for metric in self._metrics():
            metric.to(pl_module.device)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for metric in self._metrics():
            metric.reset()

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if trainer.sanity_checking or outputs is None:  # None: a batch of unreadable images only, skipped
            return
        logits, target = outputs["logits"], outputs["target"]
        probs = logits.float().softmax(dim=-1)
        self.per_class.update(probs, target)
        self.pr_curve.update(probs, target)
        if self.positive is not None:
            self.positive.update(probs[:, self.positive_index], (target == self.positive_index).long())

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        # compute() is a collective under DDP: every rank calls it, rank 0 logs.
        per_class = self.per_class.compute()
        scalars = {}
        for i, name in enumerate(self.class_names):
            precision_tag, recall_tag = tags.per_class_tags(name)
            scalars[precision_tag] = per_class["precision"][i].item()
            scalars[recall_tag] = per_class["recall"][i].item()
        if self.positive is not None:
            positive = self.positive.compute()
            precision_tag, recall_tag = tags.positive_class_tags(self.positive_class)
            scalars[precision_tag] = positive["precision"].item()
            scalars[recall_tag] = positive["recall"].item()
        precision, recall, _ = self.pr_curve.compute()
        with self.pr_curve.sync_context():
            # Per threshold and class, [[TN, FP], [FN, TP]], summed over ranks: the counts the plugin shows.
            counts = counts_from_histogram(self.pr_curve.histogram)
        self.last_scalars = scalars
        # On every rank (the values are synced), so --monitor val/recall/<class> can pick checkpoints and stop early.
        trainer.callback_metrics.update({tag: torch.tensor(value) for tag, value in scalars.items()})
        log_epoch_scalars(trainer, scalars)
        for writer in tensorboard_writers(trainer):
            self._write_figures(writer, trainer.current_epoch, per_class["confusion"], precision, recall, counts)

    def _write_figures(self, writer, epoch: int, confusion: torch.Tensor, precision: torch.Tensor,
                       recall: torch.Tensor, counts: torch.Tensor) -> None:
        writer.add_figure(tags.CONFUSION_MATRIX, confusion_matrix_figure(confusion, self.class_names),
                          global_step=epoch, close=False)
        num_thresholds = counts.shape[0]
        for i, name in enumerate(self.class_names):
            class_counts = counts[:, i].cpu()
            writer.add_pr_curve_raw(
                tags.pr_curve_tag(name),
                true_positive_counts=class_counts[:, 1, 1], false_positive_counts=class_counts[:, 0, 1],
                true_negative_counts=class_counts[:, 0, 0], false_negative_counts=class_counts[:, 1, 0],
                # torchmetrics appends a final (precision 1, recall 0) point beyond the last threshold.
                precision=precision[i, :num_thresholds].cpu(), recall=recall[i, :num_thresholds].cpu(),
                global_step=epoch, num_thresholds=num_thresholds,
            )
