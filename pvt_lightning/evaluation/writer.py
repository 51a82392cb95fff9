"""Writing predictions as they come: each rank its CSV part, rank 0 joins them into one file at the end."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter

from pvt_lightning.evaluation.multilabel import (
    multilabel_prediction_columns,
    multilabel_prediction_rows,
)
from pvt_lightning.evaluation.report import prediction_columns, prediction_rows
from pvt_lightning.runs.io import atomic_open


class PredictionCsvWriter(BasePredictionWriter):
    """Writes each predicted batch as CSV rows as it comes; every rank writes its own part, rank 0 joins them.

    The CSV appears at ``path`` only when every image is done (one rename), so an interrupted run
    leaves nothing half-written. Paths are written as the OS gave them (undecodable bytes kept).
    """

    def __init__(self, path: Path, class_names: Sequence[str], overwrite: bool = False, operating_point=None,
                 apply: bool = False, multilabel: bool = False, threshold: float = 0.5):
        """``operating_point`` (an ``evaluation.OperatingPoint``): with ``apply``, decisions and calibrated
        probabilities; without, one extra calibrated-probability column. ``multilabel``: a ``labels`` column (every
        class over ``threshold``, or over its own threshold of an applied point) and the ``prob_<class>`` columns
        (evaluation/multilabel.py)."""
        super().__init__(write_interval="batch")
        self.path, self.class_names, self.overwrite = Path(path), list(class_names), overwrite
        self.operating_point, self.apply = operating_point, apply
        self.multilabel, self.threshold = multilabel, threshold
        self._file = self._csv = None
        self.rows = 0

    def part(self, rank: int) -> Path:
        return self.path.with_name(f".{self.path.name}.rank{rank}.part")

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.part(trainer.global_rank), "w", newline="", encoding="utf-8",
                          errors="surrogateescape")
        self._csv = csv.writer(self._file)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx: int,
                           dataloader_idx: int = 0) -> None:

        if prediction is None:  # every image of the batch was unreadable
            return
        if self.multilabel:
            rows = multilabel_prediction_rows(prediction["paths"], prediction["logits"], self.class_names,
                                              self.operating_point, self.apply, self.threshold)
        else:
            rows = prediction_rows(prediction["paths"], prediction["logits"], self.class_names, self.operating_point,
                                   self.apply)
        self._csv.writerows(rows)
        self.rows += len(prediction["paths"])

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._file.close()
        trainer.strategy.barrier("prediction parts written")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """A failed prediction leaves no part behind (this rank's; ``discard`` removes every rank's)."""
        self._close()
        self.part(trainer.global_rank).unlink(missing_ok=True)

    def discard(self, world_size: int) -> None:
        """Remove every rank's part: the prediction failed, no CSV is written."""
        self._close()
        for rank in range(world_size):
            self.part(rank).unlink(missing_ok=True)

    def _close(self) -> None:
        if self._file is not None and not self._file.closed:
            self._file.close()

    def finish(self, world_size: int) -> int:
        """Join the ranks' parts (dropping the duplicates a distributed sampler pads with) into the CSV."""

        seen, rows = set(), 0
        try:
            with atomic_open(self.path, "w", self.overwrite, newline="", encoding="utf-8",
                             errors="surrogateescape") as f:
                out = csv.writer(f)
                out.writerow(multilabel_prediction_columns(self.class_names) if self.multilabel
                             else prediction_columns(self.class_names, self.operating_point, self.apply))
                for rank in range(world_size):
                    with open(self.part(rank), newline="", encoding="utf-8", errors="surrogateescape") as rows_in:
                        for row in csv.reader(rows_in):
                            if row[0] not in seen:
                                seen.add(row[0])
                                out.writerow(row)
                                rows += 1
        finally:
            self.discard(world_size)
        return rows
