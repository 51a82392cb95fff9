"""Evaluation and prediction entry points: a checkpoint plus a RunConfig -> metrics, or a CSV of predictions.

Both run through a Lightning Trainer (progress bar, ``--precision``, ``--devices``), with the
checkpoint's own class names, input size and normalisation.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from pvt_lightning.cli.assemble import checked_trainer, make_datamodule, resolve_precision, say
from pvt_lightning.cli.config import RunConfig, parse_devices
from pvt_lightning.errors import UsageError
from pvt_lightning.errors import DataError
from pvt_lightning.models.weights import read_state_dict_file
from pvt_lightning.errors import CheckpointError
from pvt_lightning.runs.rundir import atomic_open, check_output, write_file


def load_classifier(path: str | Path):
    """An ImageClassifier from one of our .ckpt files, read with weights_only=True."""
    from pvt_lightning.training.module import ImageClassifier

    checkpoint = read_state_dict_file(path)  # refuses unsafe pickles with a clear message
    if not isinstance(checkpoint, dict) or "hyper_parameters" not in checkpoint:
        raise CheckpointError(f"{path} is not a pvt-lightning training checkpoint (.ckpt from runs/.../checkpoints)")
    hparams = {**checkpoint["hyper_parameters"], "pretrained": None}  # the weights are in the checkpoint
    module = ImageClassifier(**hparams)
    module.load_state_dict(checkpoint["state_dict"])
    return module.eval()


def load_predictor(path: str | Path):
    """A ``.ckpt`` as ImageClassifier, or an exported ``.onnx`` / ``.pt2`` file (onnxruntime / torch.export) as a
    classifier module with the same ``hparams`` names (class_names, img_size; mean/std from the file)."""
    from pvt_lightning.export.exporting import is_exported_file, load_exported

    if is_exported_file(path):
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return load_exported(path, device=device)
    return load_classifier(path)


def inference_trainer(config: RunConfig, **kwargs: Any) -> L.Trainer:
    settings = {"accelerator": config.accelerator, "devices": parse_devices(config.devices), "logger": False,
                "precision": resolve_precision(config.precision, config.accelerator), "num_nodes": config.num_nodes,
                "strategy": config.strategy, **kwargs}
    return checked_trainer(config, **settings)


def evaluate(config: RunConfig) -> int:
    """``--evaluate CKPT``: logits of ``--split`` through ``trainer.predict``, then the report, per-class CSV,
    predictions, plots and (with a target) ``operating_point.json`` in ``--output-dir``; ``--output`` also gets
    the macro figures as JSON under the tags training logs (``val/acc``...)."""
    from pvt_lightning.evaluation.collect import LogitCollector, gather_predictions
    from pvt_lightning.evaluation.operating_point import OperatingPoint
    from pvt_lightning.evaluation.report import check_outputs, evaluation_file_names, evaluation_files, \
        headline_metrics, summary_lines, write_outputs

    checkpoint = Path(config.evaluate).expanduser()
    targeted = config.target_precision is not None or config.target_recall is not None
    output_dir = check_outputs(config.output_dir or default_evaluation_dir(checkpoint, config.split),
                               evaluation_file_names(targeted), config.overwrite)
    output = check_output(config.output, config.overwrite) if config.output else None
    module = load_classifier(checkpoint)
    config = with_checkpoint_input(config, module)
    data_dir = data_folder(config)
    class_names = list(module.hparams.class_names)
    point = OperatingPoint.load(config.operating_point, class_names) if config.operating_point else None
    # test/ is a folder of its own; val may be a held-out fraction of one folder, which predict_dataloader covers.
    datamodule = make_datamodule(config, data_dir, predict_dir=data_dir / "test" if config.split == "test" else None)
    labels = dict(datamodule.samples(config.split))
    if list(datamodule.class_names) != class_names:
        raise UsageError(f"--evaluate: the checkpoint's classes {class_names} differ from {datamodule.data_dir}'s "
                         f"{list(datamodule.class_names)}")
    trainer = inference_trainer(config, devices=1, limit_predict_batches=config.limit_val_batches)
    outputs = trainer.predict(LogitCollector(module, config.tta), datamodule=datamodule)
    logits, paths = gather_predictions(outputs, len(class_names))
    keep = [i for i, path in enumerate(paths) if path in labels]  # files outside the class folders have no class
    if not keep:
        raise DataError(f"no readable image of the {config.split} split of {data_dir} was evaluated")
    paths = [paths[i] for i in keep]
    targets = torch.tensor([labels[path] for path in paths])
    skipped = sorted(set(datamodule.bad_image_paths()) & set(labels))
    extra = {"data": str(data_dir), "tta": config.tta, "skipped_images": len(skipped), "skipped_paths": skipped[:100]}
    report, files = evaluation_files(logits[keep], targets, paths, class_names, calibrate=config.calibrate,
                                     target_precision=config.target_precision, target_recall=config.target_recall,
                                     operating_point=point, split=config.split, checkpoint=str(checkpoint), extra=extra)
    write_outputs(output_dir, files, config.overwrite)
    if output is not None:
        write_file(output, json.dumps(headline_metrics(report), indent=2) + "\n", overwrite=config.overwrite)
    for line in summary_lines(report):
        say(line)
    say(f"Wrote {', '.join(files)} to {output_dir}" + (f" ({len(skipped)} unreadable images skipped)" if skipped
                                                      else ""))
    if targeted:
        say(f"Apply it: --predict DIR --checkpoint {checkpoint} --operating-point "
            f"{output_dir / 'operating_point.json'}")
    return 0


def default_evaluation_dir(checkpoint: Path, split: str) -> Path:
    """``eval_<split>_<checkpoint name>`` in the checkpoint's run folder (next to the checkpoint elsewhere)."""
    from pvt_lightning.runs.rundir import version_dir_of

    return (version_dir_of(checkpoint) or checkpoint.parent) / f"eval_{split}_{checkpoint.stem}"


def predict(config: RunConfig) -> int:
    """Top-1 class, its probability and the top 5 for every image under ``--predict``, as a CSV.

    ``--operating-point FILE`` applies its temperature and thresholds (probabilities become calibrated, a
    ``decision`` column is added); without it, an ``operating_point.json`` next to the checkpoint only adds
    the calibrated probability of the top class.
    """
    from pvt_lightning.data import ImageFolderDataModule
    from pvt_lightning.evaluation.collect import LogitCollector
    from pvt_lightning.evaluation.operating_point import OperatingPoint, find_operating_point
    from pvt_lightning.export.exporting import is_exported_file

    checkpoint = Path(config.checkpoint).expanduser()
    run_dir = checkpoint.parent if is_exported_file(checkpoint) else checkpoint.parent.parent  # .ckpt: the run
    output = check_output(config.output or run_dir / "predictions.csv", config.overwrite)
    module = load_predictor(checkpoint)
    class_names = list(module.hparams.class_names)
    point_file = (Path(config.operating_point).expanduser() if config.operating_point
                  else find_operating_point(checkpoint))
    point = OperatingPoint.load(point_file, class_names) if point_file else None
    if point is not None and not config.operating_point:
        say(f"Found {point_file} next to the checkpoint: adding calibrated_probability (temperature "
            f"{point.temperature:.3f}); pass --operating-point {point_file} to also apply its thresholds")
    elif point is not None:
        say(f"Applying {point_file}: temperature {point.temperature:.3f}, thresholds for "
            f"{len(point.thresholds) - len(point.unreachable)}/{len(point.thresholds)} classes (target "
            f"{point.target}); the others are never decided")
    config = with_checkpoint_input(config, module)
    datamodule = ImageFolderDataModule.for_prediction(
        Path(config.predict).expanduser(), img_size=tuple(config.img_size), batch_size=config.batch_size,
        num_workers=config.num_workers, crop_pct=config.crop_pct, bad_images=config.bad_images,
        max_image_pixels=config.max_image_pixels,
        **{key: tuple(module.hparams[key]) for key in ("mean", "std") if key in module.hparams},
    )
    writer = PredictionCsvWriter(output, class_names, overwrite=config.overwrite, operating_point=point,
                                 apply=bool(config.operating_point))
    trainer = inference_trainer(config, callbacks=[writer])
    trainer.predict(LogitCollector(module, config.tta), datamodule=datamodule, return_predictions=False)
    if trainer.is_global_zero:
        rows = writer.finish(trainer.world_size)
        say(f"Predicted {rows} images -> {output}")
        if (skipped := datamodule.bad_images_report()) is not None:
            say(skipped)
    return 0


def with_checkpoint_input(config: RunConfig, module) -> RunConfig:
    """The checkpoint's input size unless ``--img-size`` was given; workers from the CPU count."""
    from pvt_lightning.cli.config import default_num_workers

    img_size = config.img_size or list(module.hparams.img_size)
    workers = default_num_workers() if config.num_workers is None else config.num_workers
    return dataclasses.replace(config, img_size=[int(s) for s in img_size], num_workers=workers)


def data_folder(config: RunConfig) -> Path:
    if config.data:
        return Path(config.data).expanduser()
    from pvt_lightning.data.demo import ensure_demo_dataset

    return ensure_demo_dataset()


class PredictionCsvWriter(BasePredictionWriter):
    """Writes each predicted batch as CSV rows as it comes; every rank writes its own part, rank 0 joins them.

    The CSV appears at ``path`` only when every image is done (one rename), so an interrupted run
    leaves nothing half-written. Paths are written as the OS gave them (undecodable bytes kept).
    """

    def __init__(self, path: Path, class_names: Sequence[str], overwrite: bool = False, operating_point=None,
                 apply: bool = False):
        """``operating_point`` (an ``evaluation.OperatingPoint``): with ``apply``, decisions and calibrated
        probabilities; without, one extra calibrated-probability column."""
        super().__init__(write_interval="batch")
        self.path, self.class_names, self.overwrite = Path(path), list(class_names), overwrite
        self.operating_point, self.apply = operating_point, apply
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
        from pvt_lightning.evaluation.report import prediction_rows

        if prediction is None:  # every image of the batch was unreadable
            return
        self._csv.writerows(prediction_rows(prediction["paths"], prediction["logits"], self.class_names,
                                            self.operating_point, self.apply))
        self.rows += len(prediction["paths"])

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._file.close()
        trainer.strategy.barrier("prediction parts written")

    def finish(self, world_size: int) -> int:
        """Join the ranks' parts (dropping the duplicates a distributed sampler pads with) into the CSV."""
        from pvt_lightning.evaluation.report import prediction_columns

        seen, rows = set(), 0
        with atomic_open(self.path, "w", self.overwrite, newline="", encoding="utf-8", errors="surrogateescape") as f:
            out = csv.writer(f)
            out.writerow(prediction_columns(self.class_names, self.operating_point, self.apply))
            for rank in range(world_size):
                part = self.part(rank)
                with open(part, newline="", encoding="utf-8", errors="surrogateescape") as rows_in:
                    for row in csv.reader(rows_in):
                        if row[0] not in seen:
                            seen.add(row[0])
                            out.writerow(row)
                            rows += 1
                part.unlink()
        return rows
