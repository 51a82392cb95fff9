"""Callbacks of a training run, one job per module; ``default_callbacks`` is the set every run gets.

- ``report``: per-class precision/recall, confusion matrix, PR curves (``ClassificationReport``)
- ``recall_at_precision``: recall at a fixed precision per class, macro, unreached (``RecallAtPrecisionReport``)
- ``inference``: inference speed of the trained model at the end of training (``InferenceSpeed``)
- ``timing``: time per epoch and images/s (``EpochTimer``); ``throughput``: FLOP/s and MFU (``FlopsUtilization``)
- ``memory``: peak memory per epoch (``MemoryMonitor``, its CUDA and PSS probes)
- ``hparams``: TensorBoard's HParams tab (``HParamsSummary``); ``epoch_line``: a terminal line per epoch
- ``safety``: ``last.ckpt`` every N steps / M minutes / on SIGTERM, and the stop before a NaN backward
- ``loggers``: writing epoch-level scalars; ``figures``: the confusion-matrix figure

Tag names come from ``pvt_lightning.tags``.
"""

from __future__ import annotations

from typing import Sequence

import lightning as L

from pvt_lightning.training.callbacks.epoch_line import EpochLine
from pvt_lightning.training.callbacks.hparams import HParamsSummary
from pvt_lightning.training.callbacks.inference import InferenceSpeed
from pvt_lightning.training.callbacks.memory import MemoryMonitor
from pvt_lightning.training.callbacks.recall_at_precision import RecallAtPrecisionReport
from pvt_lightning.training.callbacks.report import ClassificationReport
from pvt_lightning.training.callbacks.timing import EpochTimer
from pvt_lightning.training.inference_speed import DEFAULT_SECONDS
from pvt_lightning.training.recall_at_precision import DEFAULT_PRECISIONS


def default_callbacks(class_names: Sequence[str], positive_class: str | None = None, threshold: float = 0.5,
                      report_precisions: Sequence[float] = DEFAULT_PRECISIONS, batch_size: int | None = None,
                      inference_seconds: float = DEFAULT_SECONDS, multilabel: bool = False) -> list[L.Callback]:
    """The callbacks ``run.py`` adds to every run: report, recall at fixed precision, timer, memory, HParams, the
    epoch line and the final inference-speed measurement (``inference_seconds`` 0: off). ``multilabel``: no
    ``ClassificationReport`` (its confusion matrix and softmax one-vs-rest figures are single-label; the module
    logs mAP and per-class AP), recall at fixed precision on each class's sigmoid."""
    timer, memory = EpochTimer(), MemoryMonitor()
    return [
        *([] if multilabel else [ClassificationReport(class_names, positive_class, threshold)]),
        RecallAtPrecisionReport(class_names, report_precisions, positive_class, multilabel=multilabel),
        timer,
        memory,
        HParamsSummary(positive_class, threshold, report_precisions),
        EpochLine(timer, memory),
        InferenceSpeed(batch_size, inference_seconds),
    ]
