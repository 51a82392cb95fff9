"""Writing predictions as they come: each rank its CSV part, rank 0 joins them into one CSV or Parquet file at the end.

Parts are hidden files next to the output, ``.<name>.<attempt>.rank<r>.part`` (CSV rows, no header), flushed
after every batch, with ``.<name>.parts.json`` recording the settings that made them. A prediction that stops
early (killed, preempted, Ctrl+C, an error) keeps the parts that hold rows; the same command run again reads
them first, predicts only the images not yet in them, and the join writes every image once. ``--overwrite``
starts over instead (the old parts are ignored, then removed).
"""

from __future__ import annotations

import csv
import glob
import io
import json
import re
from pathlib import Path
from typing import Any, Iterator, Sequence

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter

from pvt_lightning.errors import PATH_ERRORS, UsageError, printable
from pvt_lightning.evaluation.multilabel import multilabel_prediction_columns, multilabel_prediction_rows
from pvt_lightning.evaluation.report import prediction_columns, prediction_rows
from pvt_lightning.runs.io import atomic_open, write_file

OUTPUT_FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
"""``--output``'s format by its extension."""
PARQUET_ROW_GROUP = 65_536
"""Rows per Parquet row group (the join streams: memory holds one group, not the whole output)."""


def output_format(path: str | Path, flag: str = "--output") -> str:
    """"csv" or "parquet" from the file's extension; Parquet needs pyarrow (the ``data`` extra). UsageError else."""
    suffix = Path(path).suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        raise UsageError(f"{flag} {path}: give a .csv or .parquet file (the format follows the extension)")
    if OUTPUT_FORMATS[suffix] == "parquet":
        try:
            import pyarrow.parquet  # noqa: F401
        except ImportError:
            raise UsageError(f"{flag} {path}: writing Parquet needs pyarrow: pip install 'pvt-lightning[data]' "
                             "(or give a .csv path)") from None
    return OUTPUT_FORMATS[suffix]


def is_number_column(column: str) -> bool:
    """Columns that hold probabilities (floats in Parquet; the same digits as text in the CSV)."""
    return column in ("probability", "calibrated_probability") or column.startswith("prob_") or bool(
        re.fullmatch(r"top\d+_prob", column))


class PredictionCsvWriter(BasePredictionWriter):
    """Writes each predicted batch as CSV rows as it comes; every rank writes its own part, rank 0 joins them.

    The output appears at ``path`` only when every image is done (one rename), as CSV or Parquet by its
    extension, with the same columns. Paths are written as the OS gave them (undecodable bytes kept in the
    CSV; Parquet strings must be UTF-8, so there they appear as ``\\xNN``).

    Restart: call ``resume(settings)`` on every process before ``trainer.predict``; it returns the paths that
    kept parts already hold (skip them), so nothing is predicted or written twice.
    """

    def __init__(self, path: Path, class_names: Sequence[str], overwrite: bool = False, operating_point=None,
                 apply: bool = False, topk: int = 0, multilabel: bool = False, threshold: float = 0.5):
        """``operating_point`` (an ``evaluation.OperatingPoint``): with ``apply``, decisions and calibrated
        probabilities; without, one extra calibrated-probability column. ``topk``: that many class/probability
        column pairs. ``multilabel``: a ``labels`` column (every class over ``threshold``, or over its own threshold
        of an applied point) and the ``prob_<class>`` columns (evaluation/multilabel.py); no top-k."""
        super().__init__(write_interval="batch")
        self.path, self.class_names, self.overwrite = Path(path), list(class_names), overwrite
        self.operating_point, self.apply, self.topk = operating_point, apply, topk
        self.multilabel, self.threshold = multilabel, threshold
        self.columns = (multilabel_prediction_columns(self.class_names) if multilabel
                        else prediction_columns(self.class_names, operating_point, apply, topk))
        self.format = output_format(self.path)
        self._file = self._csv = None
        self.rows = 0
        self.attempt = 0
        self.settings: dict[str, Any] = {}
        self.resumed = 0
        """Images earlier attempts had written (and this one skips)."""
        self.joined: dict[str, int] = {}
        """After ``finish``: rows taken from each part, as ``{"run 1 rank 0": rows}`` (runs: this and earlier attempts)."""

    # --- files ------------------------------------------------------------------------------------------------

    def part(self, rank: int, attempt: int | None = None) -> Path:
        return self.path.with_name(f".{self.path.name}.{self.attempt if attempt is None else attempt}.rank{rank}.part")

    def _numbers(self, part: Path) -> tuple[int, int] | None:
        """(attempt, rank) of one of this output's part files (``part``'s naming), None for any other file."""
        match = re.fullmatch(rf"\.{re.escape(self.path.name)}\.(\d+)\.rank(\d+)\.part", part.name)
        return (int(match[1]), int(match[2])) if match else None

    def parts(self) -> list[Path]:
        """Every part on disk for this output, any attempt and rank, by attempt then rank."""
        found = [p for p in self.path.parent.glob(f".{glob.escape(self.path.name)}.*.part") if self._numbers(p)]
        return sorted(found, key=self._numbers)

    def _attempt_of(self, part: Path) -> int:
        return self._numbers(part)[0]

    @property
    def settings_file(self) -> Path:
        return self.path.with_name(f".{self.path.name}.parts.json")

    # --- restart ----------------------------------------------------------------------------------------------

    def resume(self, settings: dict[str, Any]) -> set[str]:
        """The paths already written by kept parts (empty with ``overwrite``), and this attempt's number.

        ``settings`` (checkpoint, input, options) must equal those the parts were made with: parts from another
        command are a UsageError (rather than a file mixing two models). Called on every process before any
        writes, it returns the same set on each, so all ranks split the same remaining images.
        """
        self.settings = {**settings, "columns": self.columns}
        parts = self.parts()
        self.attempt = max((self._attempt_of(p) for p in parts), default=-1) + 1
        if self.overwrite or not parts:
            return set()
        saved = self._saved_settings()
        if saved is not None and saved != self.settings:
            changed = sorted(key for key in {*saved, *self.settings} if saved.get(key) != self.settings.get(key))
            raise UsageError(f"{self.path}: an earlier, unfinished predict left its parts ({len(parts)} "
                             f".{self.path.name}.*.part files) made with other settings ({', '.join(changed)}); "
                             "re-run it with the same options to finish it, or pass --overwrite to start over")
        done = {row[0] for part in parts for row in read_part(part, len(self.columns))}
        self.resumed = len(done)
        return done

    def _saved_settings(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.settings_file.read_text(encoding="utf-8", errors=PATH_ERRORS))
        except (OSError, ValueError):
            return None

    # --- Lightning hooks --------------------------------------------------------------------------------------

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if trainer.is_global_zero and self.settings:
            write_file(self.settings_file, json.dumps(self.settings, indent=1), overwrite=True)
        self._file = open(self.part(trainer.global_rank), "w", newline="", encoding="utf-8", errors=PATH_ERRORS)
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
                                   self.apply, self.topk)
        self._csv.writerows(rows)
        self._file.flush()  # a kill loses at most the batch being written (its partial row is ignored on restart)
        self.rows += len(prediction["paths"])

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._file.close()
        trainer.strategy.barrier("prediction parts written")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """A stopped prediction keeps this rank's part if it holds rows (the next run resumes from it)."""
        self.stop(trainer.global_rank)

    def stop(self, rank: int) -> int:
        """Close this rank's part, removing it if it holds no row (and the settings file if no part is left).
        Returns the images the kept parts hold (those a re-run skips)."""
        self._close()
        if self.rows == 0:
            self.part(rank).unlink(missing_ok=True)
        if not any(_size(part) > 0 for part in self.parts()):
            self.settings_file.unlink(missing_ok=True)
        return self.resumed + self.rows

    def _close(self) -> None:
        if self._file is not None and not self._file.closed:
            self._file.close()

    def discard(self) -> None:
        """Remove every part and the settings file (after the join)."""
        self._close()
        for part in self.parts():
            part.unlink(missing_ok=True)
        self.settings_file.unlink(missing_ok=True)

    # --- the join ---------------------------------------------------------------------------------------------

    def finish(self) -> int:
        """Join the parts (all attempts' unless ``overwrite`` started over; a path written twice is kept once)
        into the output, then remove them. Returns the number of rows."""
        parts = self.parts() if not self.overwrite else [p for p in self.parts() if self._attempt_of(p) == self.attempt]
        labels = {part.name: "run {} rank {}".format(self._numbers(part)[0] + 1, self._numbers(part)[1])
                  for part in parts}
        counts: dict[str, int] = {}
        rows = _unique_rows(parts, len(self.columns), counts)
        with atomic_open(self.path, "w" if self.format == "csv" else "wb", self.overwrite,
                         **({"newline": "", "encoding": "utf-8", "errors": PATH_ERRORS} if self.format == "csv"
                            else {})) as f:
            count = (_write_csv if self.format == "csv" else _write_parquet)(f, self.columns, rows)
        self.joined = {labels[name]: n for name, n in counts.items()}
        self.discard()
        return count


def _size(path: Path) -> int:
    """The file's size; 0 if another rank removed it meanwhile."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def read_part(part: Path, width: int) -> Iterator[list[str]]:
    """A part's complete rows: a last row cut off by a kill (no final newline, or the wrong field count) is left
    out, so its image is predicted again."""
    text = part.read_text(encoding="utf-8", errors=PATH_ERRORS)
    if not text.endswith("\n"):
        text = text[:text.rfind("\n") + 1]
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        for row in reader:
            if len(row) == width:
                yield row
    except csv.Error:  # a quoted field left open by the cut: the rows before it stand
        return


def _unique_rows(parts: Sequence[Path], width: int, counts: dict[str, int]) -> Iterator[list[str]]:
    """Every part's rows, each path once (the first row written for it), counting the rows taken per part."""
    seen: set[str] = set()
    for part in parts:
        counts[part.name] = 0
        for row in read_part(part, width):
            if row[0] not in seen:
                seen.add(row[0])
                counts[part.name] += 1
                yield row


def _write_csv(f, columns: list[str], rows: Iterator[list[str]]) -> int:
    out = csv.writer(f)
    out.writerow(columns)
    count = 0
    for row in rows:
        out.writerow(row)
        count += 1
    return count


def _write_parquet(f, columns: list[str], rows: Iterator[list[str]]) -> int:
    """The CSV's columns and values: probabilities as float64 (the same rounded digits), the rest as strings."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    numeric = [is_number_column(c) for c in columns]
    schema = pa.schema([(c, pa.float64() if n else pa.string()) for c, n in zip(columns, numeric)])
    count = 0
    with pq.ParquetWriter(f, schema) as out:
        batch: list[list[str]] = []

        def flush() -> None:
            cells = list(zip(*batch)) if batch else [[] for _ in columns]
            arrays = [pa.array([float(v) if v != "" else None for v in col] if n else
                               [printable(v) if i == 0 else v for v in col], type=schema.field(i).type)
                      for i, (col, n) in enumerate(zip(cells, numeric))]
            out.write_table(pa.Table.from_arrays(arrays, schema=schema))
            batch.clear()

        for row in rows:
            batch.append(row)
            count += 1
            if len(batch) >= PARQUET_ROW_GROUP:
                flush()
        if batch or count == 0:
            flush()
    return count


def output_rows(path: str | Path) -> list[dict[str, Any]]:
    """A predictions file (CSV or Parquet) as dicts, values as written (for tests and tools)."""
    if output_format(path) == "parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    with open(path, newline="", encoding="utf-8", errors=PATH_ERRORS) as f:
        return list(csv.DictReader(f))
