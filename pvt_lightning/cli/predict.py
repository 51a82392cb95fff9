"""``pvt-lightning predict``: every image under a folder -> one row each (top-1, its probability, the top 5, optionally
the top K as columns) in a CSV or Parquet file, with a checkpoint or an exported file, in the model's own
preprocessing unless flags override it. On several devices (``--devices N --strategy ddp``) each rank predicts its
share (Lightning's distributed sampler) and rank 0 joins the parts; a stopped run keeps its parts and the same
command run again predicts only the images not yet written (evaluation/writer.py)."""

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
from pvt_lightning.evaluation.writer import PredictionCsvWriter, output_format
from pvt_lightning.export.runtime import is_exported_file, load_predictor
from pvt_lightning.runs.io import check_output

CONFIG = PredictConfig


def predict(config: PredictConfig) -> int:
    """Top-1 class, its probability and the top 5 for every image under ``--input`` (a folder, searched
    recursively, or one image file), as a CSV or Parquet file (``--output``'s extension); ``--topk K`` adds
    ``top1_class, top1_prob ... topK_class, topK_prob``.

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
    output_format(output)
    module = load_predictor(checkpoint)
    class_names = list(module.hparams.class_names)
    if config.topk > len(class_names):
        raise UsageError(f"--topk {config.topk}: the model has {len(class_names)} classes; give at most "
                         f"{len(class_names)}")
    multilabel = module.hparams.get("task") == "multilabel"
    if multilabel and config.topk:
        raise UsageError(f"--topk {config.topk}: {checkpoint} is multi-label; its `labels` column lists every class "
                         "over its threshold (drop --topk)")
    point_file, point = operating_point_for(config, checkpoint, class_names, multilabel)
    check_exported_size(module, config.img_size, checkpoint)
    config, preprocessing = with_checkpoint_preprocessing(config, module)
    datamodule = make_datamodule(config, None, mean=preprocessing.mean, std=preprocessing.std, predict_dir=source)
    writer = PredictionCsvWriter(output, class_names, overwrite=config.overwrite, operating_point=point,
                                 apply=bool(config.operating_point), topk=config.topk, multilabel=multilabel,
                                 threshold=float(module.hparams.get("threshold", 0.5)))
    # Every process reads the kept parts before any writes (ranks meet first in trainer.predict), so all skip
    # the same images and the distributed sampler splits the same remainder.
    datamodule.predict_skip = writer.resume(restart_settings(config, checkpoint, source, point_file))
    if writer.resumed:
        say(f"Resuming: {writer.resumed} images already predicted in the parts of an earlier run of this command "
            f"(.{output.name}.*.part); predicting the rest")
    if len(datamodule.predict_samples()) == 0:  # an earlier run predicted them all (it stopped while joining)
        rows = writer.finish()
        say(f"Predicted {rows} images -> {output}")
        return 0
    trainer = inference_trainer(config, callbacks=[writer])
    try:
        trainer.predict(LogitCollector(module, config.tta), datamodule=datamodule, return_predictions=False)
    except BaseException:
        kept = writer.stop(trainer.global_rank)  # parts holding rows stay: the same command resumes from them
        if kept and trainer.is_global_zero:
            say(f"Prediction stopped; {kept} images written so far are kept in .{output.name}.*.part next to "
                f"{output}: run the same command again to predict the rest (--overwrite starts over)")
        raise
    if trainer.is_global_zero:
        rows = writer.finish()
        joined = ", ".join(f"{label}: {n}" for label, n in writer.joined.items())
        say(f"Predicted {rows} images -> {output}" + (f" (joined from {joined})" if len(writer.joined) > 1 else ""))
        if (skipped := datamodule.bad_images_report()) is not None:
            say(skipped)
    return 0


def restart_settings(config: PredictConfig, checkpoint: Path, source: Path, point_file: Path | None) -> dict:
    """What must be the same for a re-run to go on from a stopped run's parts: the model, the images, the options
    that change the rows (devices, batch size and workers may differ)."""
    return {"checkpoint": str(checkpoint.resolve()), "input": str(source.resolve()), "tta": config.tta,
            "operating_point": str(Path(point_file).resolve()) if point_file else None,
            "apply_operating_point": bool(config.operating_point), "img_size": list(config.img_size),
            "crop_pct": config.crop_pct}


run = predict


def operating_point_for(config: PredictConfig, checkpoint: Path, class_names: list[str],
                        multilabel: bool) -> tuple[Path | None, OperatingPoint | None]:
    """The operating point file and its contents: ``--operating-point``, else one found next to the checkpoint
    (single-label: only its calibrated probability is added; multi-label: not used until passed), said aloud."""
    point_file = (Path(config.operating_point).expanduser() if config.operating_point
                  else find_operating_point(checkpoint))
    point = OperatingPoint.load(point_file, class_names) if point_file else None
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
    return point_file, point
