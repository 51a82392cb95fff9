"""Building a job's parts from its configuration: data module, callbacks, logger and Trainer.

Shared by the training and inference entry points, so a flag means the same thing in both.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from pvt_lightning.cli.config import parse_devices
from pvt_lightning.cli.limits import check_devices
from pvt_lightning.data.datamodule import default_num_workers
from pvt_lightning.models.registry import Preprocessing
from pvt_lightning.cli.options import TrainConfig
from pvt_lightning.errors import UsageError
from pvt_lightning.runs.rundir import RunPaths


def say(message: str) -> None:
    print(message, flush=True)


def make_datamodule(config: Any, data_dir: Path, **overrides: Any):
    """The one way a job builds its data module: from the option groups its configuration has."""
    from pvt_lightning.data import ImageFolderDataModule

    options = {"img_size": tuple(config.img_size), "batch_size": config.batch_size,
               "num_workers": config.num_workers, "crop_pct": config.crop_pct, "bad_images": config.bad_images,
               "max_image_pixels": config.max_image_pixels, "augment": getattr(config, "augment", None) or "basic"}
    optional = ("val_split", "seed", "verify_images", "augment_device", "classes", "task")
    options.update({name: getattr(config, name) for name in optional if hasattr(config, name)})
    return ImageFolderDataModule(data_dir, **{**options, **overrides})


def resolve_precision(precision: str, accelerator: str) -> str:
    """``auto``: bf16-mixed on a GPU that supports it, else 32."""
    import torch

    if precision != "auto":
        return precision
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    return "bf16-mixed" if on_gpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32"


def checkpoint_filename(monitor: str) -> str:
    """``best-epoch007-acc0.9312`` for val/acc; other metrics by their path, e.g. ``-recall_cat0.8000`` for
    val/recall/cat, ``-recall_at_p0.90_0.8125`` for val/recall@precision0.90 (a name ending in a digit gets a ``_``
    before the value)."""
    short = re.sub(r"[^A-Za-z0-9_.-]+", "_", monitor.removeprefix("val/").replace("@precision", "_at_p"))
    if short[-1:].isdigit():
        short += "_"
    return f"best-epoch{{epoch:03d}}-{short}{{{monitor}:.4f}}"


def make_callbacks(config: TrainConfig, paths: RunPaths, class_names: list[str]) -> tuple[list[L.Callback], Any]:
    """The run's callbacks and its ModelCheckpoint (best by --monitor, plus last.ckpt)."""
    from lightning.pytorch.callbacks import EarlyStopping, EMAWeightAveraging, ModelCheckpoint

    from pvt_lightning.training.callbacks import default_callbacks
    from pvt_lightning.training.recall_at_precision import DEFAULT_PRECISIONS
    from pvt_lightning.training.callbacks.safety import LastCheckpointSaver, StopOnNonFiniteLoss
    from pvt_lightning.training.callbacks.throughput import FlopsUtilization

    checkpoint = ModelCheckpoint(
        dirpath=paths.checkpoints, filename=checkpoint_filename(config.monitor), auto_insert_metric_name=False,
        monitor=config.monitor, mode=config.monitor_mode, save_last=True, save_top_k=1,
    )
    callbacks = [checkpoint, StopOnNonFiniteLoss(),
                 LastCheckpointSaver(checkpoint, config.checkpoint_every_steps, config.checkpoint_every_minutes),
                 *default_callbacks(class_names, positive_class=config.positive_class, threshold=config.threshold,
                                    report_precisions=config.report_precision or DEFAULT_PRECISIONS,
                                    batch_size=config.batch_size, inference_seconds=config.inference_seconds,
                                    multilabel=getattr(config, "task", None) == "multilabel"),
                 FlopsUtilization()]
    if config.early_stopping:
        callbacks.append(EarlyStopping(config.monitor, patience=config.early_stopping, mode=config.monitor_mode))
    if config.ema:
        callbacks.append(EMAWeightAveraging(decay=config.ema_decay))
    return callbacks, checkpoint


def make_logger(config: TrainConfig, paths: RunPaths):
    """TensorBoard (default) or CSV, writing into the run's version folder."""
    where = {"save_dir": str(paths.run_dir.parent.parent), "name": paths.name, "version": paths.version}
    if config.logger == "csv":
        warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
        return RunCsvLogger(**where)
    return TensorBoardLogger(**where, default_hp_metric=False)


class RunCsvLogger(CSVLogger):
    """Lightning's CSVLogger (``metrics.csv``), minus its hparams.yaml, which would replace the resolved configuration."""

    def log_hyperparams(self, params: Any = None, *args: Any, **kwargs: Any) -> None:
        """Nothing to do: hparams.yaml holds the configuration, every checkpoint the module's hyper-parameters."""


def make_trainer(config: TrainConfig, paths: RunPaths, callbacks: list[L.Callback]) -> L.Trainer:
    """The Trainer for a fit; a device or strategy Lightning cannot provide is a usage error, not a traceback."""
    from pvt_lightning.runs.checkpoint_io import AtomicCheckpointIO

    return checked_trainer(
        config,
        max_epochs=config.epochs, max_steps=config.max_steps, max_time=config.max_time,
        accelerator=config.accelerator, devices=parse_devices(config.devices), num_nodes=config.num_nodes,
        strategy=config.strategy, precision=resolve_precision(config.precision, config.accelerator),
        logger=make_logger(config, paths), callbacks=callbacks, plugins=[AtomicCheckpointIO()],
        default_root_dir=str(paths.run_dir), gradient_clip_val=config.grad_clip or None,
        accumulate_grad_batches=config.accumulate_grad_batches, deterministic=config.deterministic,
        fast_dev_run=config.fast_dev_run or False, val_check_interval=config.val_check_interval,
        limit_train_batches=config.limit_train_batches, limit_val_batches=config.limit_val_batches,
        log_every_n_steps=config.log_every_n_steps, benchmark=None, enable_progress_bar=config.progress_bar,
    )


def checked_trainer(config: TrainConfig, **kwargs: Any) -> L.Trainer:
    """``L.Trainer(**kwargs)``; a device, strategy or precision Lightning cannot provide is a usage error. Its
    terminal output is the same with or without ``rich`` (``training/terminal.py``)."""
    from pvt_lightning.training.terminal import plain_output_callbacks, quiet_lightning

    check_devices(kwargs.get("devices", "auto"), kwargs.get("accelerator", "auto"))
    quiet_lightning()
    kwargs["callbacks"] = plain_output_callbacks(kwargs.get("callbacks") or [],
                                                 progress_bar=kwargs.get("enable_progress_bar") is not False,
                                                 model_summary=kwargs.get("enable_model_summary") is not False)
    try:
        return L.Trainer(**kwargs)
    except (MisconfigurationException, ValueError, RuntimeError, ImportError, TypeError) as err:
        raise UsageError(f"--accelerator {config.accelerator} --devices {config.devices} --strategy "
                         f"{config.strategy} --precision {config.precision}: {err}") from None


def inference_trainer(config: Any, **kwargs: Any) -> L.Trainer:
    """The Trainer evaluate and predict run ``trainer.predict`` with: no logger, the hardware options."""
    settings = {"accelerator": config.accelerator, "devices": parse_devices(config.devices), "logger": False,
                "precision": resolve_precision(config.precision, config.accelerator), "num_nodes": config.num_nodes,
                "strategy": config.strategy, **kwargs}
    return checked_trainer(config, **settings)


def with_checkpoint_preprocessing(config: Any, module: Any) -> tuple[Any, Preprocessing]:
    """The model's own preprocessing (saved in its checkpoint or export), with ``--img-size`` / ``--crop-pct``
    overriding it where given; loader workers from the CPU count where unset."""
    preprocessing = Preprocessing.from_dict(dict(module.hparams)).replace(img_size=config.img_size,
                                                                          crop_pct=config.crop_pct)
    workers = default_num_workers() if config.num_workers is None else config.num_workers
    config = dataclasses.replace(config, img_size=list(preprocessing.img_size), crop_pct=preprocessing.crop_pct,
                                 num_workers=workers)
    h, w = preprocessing.img_size
    say(f"Preprocessing: {h}x{w}, resize to size/{preprocessing.crop_pct:g} then centre crop, mean "
        f"{tuple(round(m, 3) for m in preprocessing.mean)}, std {tuple(round(s, 3) for s in preprocessing.std)}")
    return config, preprocessing
