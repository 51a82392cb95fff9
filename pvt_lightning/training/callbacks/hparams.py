"""The run's hyper-parameters and headline metric tags for TensorBoard's HParams tab."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import lightning as L
from torch.utils.tensorboard.summary import hparams as hparams_summary

from pvt_lightning import tags
from pvt_lightning.training.callbacks.loggers import tensorboard_writers


def hparam_value(value: Any) -> int | float | str:
    """A value as the HParams tab shows it best: booleans and None as words.

    ``torch.utils.tensorboard.summary.hparams`` would store a bool as the number 0/1 and drop None.
    """
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


def scalar_hparams(hparams: Mapping[str, Any]) -> dict[str, int | float | str]:
    """The entries of ``hparams`` the HParams tab can show (lists such as class names are left out)."""
    return {key: hparam_value(value) for key, value in hparams.items()
            if value is None or isinstance(value, (bool, int, float, str))}


class HParamsSummary(L.Callback):
    """Writes the run's hyperparameters for TensorBoard's HParams tab at the start of training.

    The listed metrics are the tags the other callbacks and the module log; the tab shows their
    latest value, so no placeholder scalars are written (``TensorBoardLogger.log_hyperparams`` with
    ``metrics`` would log them as real points, and without them, under ``default_hp_metric=False``,
    it writes no HParams data at all).
    """

    def __init__(self, positive_class: str | None = None, threshold: float = 0.5,
                 report_precisions: Sequence[float] = ()):
        self.positive_class = positive_class
        self.threshold = threshold
        self.report_precisions = list(report_precisions)
        self.params: dict[str, Any] = {}
        self.metric_tags: list[str] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        params = scalar_hparams(pl_module.hparams)
        img_size = pl_module.hparams.get("img_size")
        if img_size is not None:
            params["img_size"] = "x".join(str(int(side)) for side in img_size)
        if hasattr(pl_module, "linear_sra_enabled"):
            params["linear_sra"] = hparam_value(bool(pl_module.linear_sra_enabled))
        batch_size = getattr(trainer.train_dataloader, "batch_size", None)
        params.update(
            batch_size=batch_size if batch_size is not None else "unknown",
            world_size=trainer.world_size,
            precision=str(trainer.precision),
            max_epochs=trainer.max_epochs if trainer.max_epochs is not None else -1,
        )
        if self.positive_class is not None:
            params.update(positive_class=self.positive_class, threshold=self.threshold)
        memory_tags = tags.CUDA_MEMORY_TAGS if pl_module.device.type == "cuda" else tags.CPU_MEMORY_TAGS
        headline = tags.MULTILABEL_HEADLINE_METRICS if getattr(pl_module, "multilabel", False) else tags.HEADLINE_METRICS
        metric_tags = [*headline, *(tags.recall_at_precision_tag(p) for p in self.report_precisions),
                       tags.TIME_TAG, tags.THROUGHPUT_TAG, *memory_tags]
        if self.positive_class is not None:
            metric_tags += tags.positive_class_tags(self.positive_class)
            metric_tags += [tags.recall_at_precision_tag(p, self.positive_class) for p in self.report_precisions]
        self.params, self.metric_tags = params, metric_tags
        for writer in tensorboard_writers(trainer):
            file_writer = writer._get_file_writer()  # what TensorBoardLogger.log_hyperparams writes to as well
            for summary in hparams_summary(params, {tag: 0.0 for tag in metric_tags}):
                file_writer.add_summary(summary)
