"""Callbacks of a training run, one job per module; ``default_callbacks`` is the set every run gets.

- ``report``: per-class precision/recall, confusion matrix, PR curves (``ClassificationReport``)
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
from pvt_lightning.training.callbacks.memory import MemoryMonitor
from pvt_lightning.training.callbacks.report import ClassificationReport
from pvt_lightning.training.callbacks.timing import EpochTimer


def default_callbacks(class_names: Sequence[str], positive_class: str | None = None,
                      threshold: float = 0.5) -> list[L.Callback]:
    """The callbacks ``run.py`` adds to every run: report, timer, memory, HParams and the epoch line."""
    timer, memory = EpochTimer(), MemoryMonitor()
    return [
        ClassificationReport(class_names, positive_class, threshold),
        timer,
        memory,
        HParamsSummary(positive_class, threshold),
        EpochLine(timer, memory),
    ]
