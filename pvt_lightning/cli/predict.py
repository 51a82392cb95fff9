"""``pvt-lightning predict``: every image under a folder -> one CSV row each (top-1, its probability, the top 5),
with a checkpoint or an exported file, in the model's own preprocessing unless flags override it."""

from __future__ import annotations

from pathlib import Path

from pvt_lightning.cli.assemble import inference_trainer, make_datamodule, say, with_checkpoint_preprocessing
from pvt_lightning.cli.config import require
from pvt_lightning.cli.limits import check_exported_size
from pvt_lightning.cli.options import PredictConfig
from pvt_lightning.data.decode import IMAGE_EXTENSIONS
from pvt_lightning.errors import UsageError
from pvt_lightning.evaluation.collect import LogitCollector
from pvt_lightning.evaluation.operating_point import OperatingPoint, find_operating_point
from pvt_lightning.evaluation.writer import PredictionCsvWriter
from pvt_lightning.export.runtime import is_exported_file, load_predictor
from pvt_lightning.runs.io import check_output

CONFIG = PredictConfig


def predict(config: PredictConfig) -> int:
    """Top-1 class, its probability and the top 5 for every image under ``--input`` (a folder, searched
    recursively, or one image file), as a CSV.

    ``--operating-point FILE`` applies its temperature and thresholds (probabilities become calibrated, a
    ``decision`` column is added); without it, an ``operating_point.json`` next to the checkpoint only adds
    the calibrated probability of the top class.
    """
    require(config, "checkpoint", "input", command="predict")
    checkpoint = Path(config.checkpoint).expanduser()
    source = Path(config.input).expanduser()
    if source.is_file() and source.suffix.lower() not in IMAGE_EXTENSIONS:
        raise UsageError(f"--input {config.input} is a {source.suffix or 'suffix-less'} file, not an image; give an "
                         f"image file ({', '.join(sorted(IMAGE_EXTENSIONS))}) or a folder of images")
    run_dir = checkpoint.parent if is_exported_file(checkpoint) else checkpoint.parent.parent  # .ckpt: the run
    output = check_output(config.output or run_dir / "predictions.csv", config.overwrite)
    module = load_predictor(checkpoint)
    class_names = list(module.hparams.class_names)
    point_file = (Path(config.operating_point).expanduser() if config.operating_point
                  else find_operating_point(checkpoint))
    point = OperatingPoint.load(point_file, class_names) if point_file else None
    multilabel = module.hparams.get("task") == "multilabel"
    if point is not None and (point.task == "multilabel") != multilabel:
        raise UsageError(f"operating point {point_file} was written for a {point.task or 'single-label'} model; "
                         f"{checkpoint} is {'multi-label' if multilabel else 'single-label'}")
    if multilabel and point is not None and not config.operating_point:
        say(f"Found {point_file} next to the checkpoint; labels use 0.5 until you pass --operating-point "
            f"{point_file} (its per-class thresholds)")
        point = None
    elif point is not None and not config.operating_point:
        say(f"Found {point_file} next to the checkpoint: adding calibrated_probability (temperature "
            f"{point.temperature:.3f}); pass --operating-point {point_file} to also apply its thresholds")
    elif point is not None:
        say(f"Applying {point_file}: temperature {point.temperature:.3f}, thresholds for "
            f"{len(point.thresholds) - len(point.unreachable)}/{len(point.thresholds)} classes (target "
            f"{point.target}); the others are never decided")
    check_exported_size(module, config.img_size, checkpoint)
    config, preprocessing = with_checkpoint_preprocessing(config, module)
    datamodule = make_datamodule(config, None, mean=preprocessing.mean, std=preprocessing.std, predict_dir=source)
    writer = PredictionCsvWriter(output, class_names, overwrite=config.overwrite, operating_point=point,
                                 apply=bool(config.operating_point), multilabel=multilabel,
                                 threshold=float(module.hparams.get("threshold", 0.5)))
    trainer = inference_trainer(config, callbacks=[writer])
    try:
        trainer.predict(LogitCollector(module, config.tta), datamodule=datamodule, return_predictions=False)
    except BaseException:
        writer.discard(trainer.world_size)  # no hidden .part files left behind
        raise
    if trainer.is_global_zero:
        rows = writer.finish(trainer.world_size)
        say(f"Predicted {rows} images -> {output}")
        if (skipped := datamodule.bad_images_report()) is not None:
            say(skipped)
    return 0


run = predict
