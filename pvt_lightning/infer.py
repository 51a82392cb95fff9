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

from .assembly import checked_trainer, make_datamodule, resolve_precision, say
from .config import RunConfig, UsageError, parse_devices
from .models.checkpoints import CheckpointError, read_state_dict_file
from .rundir import atomic_open, check_output, write_file


def load_classifier(path: str | Path):
    """An ImageClassifier from one of our .ckpt files, read with weights_only=True."""
    from .module import ImageClassifier

    checkpoint = read_state_dict_file(path)  # refuses unsafe pickles with a clear message
    if not isinstance(checkpoint, dict) or "hyper_parameters" not in checkpoint:
        raise CheckpointError(f"{path} is not a pvt-lightning training checkpoint (.ckpt from runs/.../checkpoints)")
    hparams = {**checkpoint["hyper_parameters"], "pretrained": None}  # the weights are in the checkpoint
    module = ImageClassifier(**hparams)
    module.load_state_dict(checkpoint["state_dict"])
    return module.eval()


def inference_trainer(config: RunConfig, **kwargs: Any) -> L.Trainer:
    settings = {"accelerator": config.accelerator, "devices": parse_devices(config.devices), "logger": False,
                "precision": resolve_precision(config.precision, config.accelerator), "num_nodes": config.num_nodes,
                "strategy": config.strategy, **kwargs}
    return checked_trainer(config, **settings)


def evaluate(config: RunConfig) -> int:
    """Metrics of ``--evaluate CKPT`` on ``--split`` of ``--data``; ``--output`` also writes them as JSON."""
    output = check_output(config.output, config.overwrite) if config.output else None
    module = load_classifier(config.evaluate)
    config = with_checkpoint_input(config, module)
    datamodule = make_datamodule(config, data_folder(config))
    datamodule.setup("validate" if config.split == "val" else "test")
    if list(datamodule.class_names) != list(module.hparams.class_names):
        raise UsageError(f"--evaluate: the checkpoint's classes {list(module.hparams.class_names)} differ from "
                         f"{datamodule.data_dir}'s {list(datamodule.class_names)}")
    trainer = inference_trainer(config, devices=1, limit_val_batches=config.limit_val_batches,
                                limit_test_batches=config.limit_val_batches)
    run = trainer.validate if config.split == "val" else trainer.test
    results = {k: float(v) for k, v in run(module, datamodule=datamodule, verbose=False)[0].items()}
    if output is not None:
        write_file(output, json.dumps(results, indent=2) + "\n", overwrite=config.overwrite)
    say(" | ".join(f"{k} {v:.4f}" for k, v in sorted(results.items())))
    return 0


def predict(config: RunConfig) -> int:
    """Top-1 class, its probability and the top 5 for every image under ``--predict``, as a CSV."""
    from .data import ImageFolderDataModule

    checkpoint = Path(config.checkpoint).expanduser()
    output = check_output(config.output or checkpoint.parent.parent / "predictions.csv", config.overwrite)
    module = load_classifier(checkpoint)
    config = with_checkpoint_input(config, module)
    datamodule = ImageFolderDataModule.for_prediction(
        Path(config.predict).expanduser(), img_size=tuple(config.img_size), batch_size=config.batch_size,
        num_workers=config.num_workers, crop_pct=config.crop_pct, bad_images=config.bad_images,
    )
    writer = PredictionCsvWriter(output, list(module.hparams.class_names), overwrite=config.overwrite)
    trainer = inference_trainer(config, callbacks=[writer])
    trainer.predict(module, datamodule=datamodule, return_predictions=False)
    if trainer.is_global_zero:
        rows = writer.finish(trainer.world_size)
        say(f"Predicted {rows} images -> {output}")
    return 0


def with_checkpoint_input(config: RunConfig, module) -> RunConfig:
    """The checkpoint's input size unless ``--img-size`` was given; workers from the CPU count."""
    from .config import default_num_workers

    img_size = config.img_size or list(module.hparams.img_size)
    workers = default_num_workers() if config.num_workers is None else config.num_workers
    return dataclasses.replace(config, img_size=[int(s) for s in img_size], num_workers=workers)


def data_folder(config: RunConfig) -> Path:
    if config.data:
        return Path(config.data).expanduser()
    from .data.demo import ensure_demo_dataset

    return ensure_demo_dataset()


PREDICTION_COLUMNS = ("path", "class", "probability", "top5")


class PredictionCsvWriter(BasePredictionWriter):
    """Writes each predicted batch as CSV rows as it comes; every rank writes its own part, rank 0 joins them.

    The CSV appears at ``path`` only when every image is done (one rename), so an interrupted run
    leaves nothing half-written. Paths are written as the OS gave them (undecodable bytes kept).
    """

    def __init__(self, path: Path, class_names: Sequence[str], overwrite: bool = False):
        super().__init__(write_interval="batch")
        self.path, self.class_names, self.overwrite = Path(path), list(class_names), overwrite
        self._file = self._csv = None
        self.rows = 0

    def part(self, rank: int) -> Path:
        return self.path.with_name(f".{self.path.name}.rank{rank}.part")

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.part(trainer.global_rank), "w", newline="", encoding="utf-8",
                          errors="surrogateescape")
        self._csv = csv.writer(self._file)

    def write_on_batch_end(self, trainer, pl_module, prediction: torch.Tensor, batch_indices, batch, batch_idx: int,
                           dataloader_idx: int = 0) -> None:
        _, paths = batch
        probs = prediction.float().cpu()
        top_p, top_i = probs.topk(min(5, len(self.class_names)), dim=-1)
        names = self.class_names
        for path, p, i in zip(paths, top_p.tolist(), top_i.tolist()):
            self._csv.writerow([path, names[i[0]], f"{p[0]:.6f}", ";".join(f"{names[c]}:{q:.4f}" for c, q in zip(i, p))])
        self.rows += len(paths)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._file.close()
        trainer.strategy.barrier("prediction parts written")

    def finish(self, world_size: int) -> int:
        """Join the ranks' parts (dropping the duplicates a distributed sampler pads with) into the CSV."""
        seen, rows = set(), 0
        with atomic_open(self.path, "w", self.overwrite, newline="", encoding="utf-8", errors="surrogateescape") as f:
            out = csv.writer(f)
            out.writerow(PREDICTION_COLUMNS)
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
