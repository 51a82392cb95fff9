"""``pvt-lightning evaluate``: a checkpoint on one split of labelled data -> report, per-class CSV, plots,
calibration and operating point, in the checkpoint's own preprocessing unless flags override it."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pvt_lightning.cli.assemble import inference_trainer, make_datamodule, say, with_checkpoint_preprocessing
from pvt_lightning.cli.config import require
from pvt_lightning.cli.limits import check_exported_size
from pvt_lightning.cli.options import EvaluateConfig
from pvt_lightning.data.demo import ensure_demo_dataset
from pvt_lightning.errors import DataError, UsageError
from pvt_lightning.evaluation.explain import write_explanations
from pvt_lightning.evaluation.collect import LogitCollector, gather_predictions
from pvt_lightning.evaluation.multilabel import FILES as MULTILABEL_FILES, multilabel_evaluation_files, \
    multilabel_summary_lines
from pvt_lightning.evaluation.operating_point import OPERATING_POINT_FILE, OperatingPoint
from pvt_lightning.evaluation.report import (check_outputs, evaluation_file_names, evaluation_files, headline_metrics,
                                             summary_lines, write_outputs)
from pvt_lightning.export.runtime import load_predictor
from pvt_lightning.runs.io import check_output, write_file
from pvt_lightning.runs.rundir import version_dir_of

CONFIG = EvaluateConfig


def evaluate(config: EvaluateConfig) -> int:
    """``evaluate --checkpoint CKPT`` (a .ckpt, .onnx or .pt2): logits of ``--split`` through ``trainer.predict``, then the report, per-class CSV,
    predictions, plots and (with a target) ``operating_point.json`` in ``--output-dir``; ``--output`` also gets
    the macro figures as JSON under the tags training logs (``val/acc``...)."""

    require(config, "checkpoint", command="evaluate")
    checkpoint = Path(config.checkpoint).expanduser()
    targeted = config.target_precision is not None or config.target_recall is not None
    explained = ["explanations.png", "explanations/index.csv"] if config.explain else []
    output_dir = check_outputs(config.output_dir or default_evaluation_dir(checkpoint, config.split),
                               evaluation_file_names(targeted) + explained, config.overwrite)
    output = check_output(config.output, config.overwrite) if config.output else None
    module = load_predictor(checkpoint)  # a .ckpt, or an exported .onnx / .pt2 as predict takes them
    check_exported_size(module, config.img_size, checkpoint)
    config, preprocessing = with_checkpoint_preprocessing(config, module)
    data_dir = data_folder(config)
    class_names = list(module.hparams.class_names)
    multilabel = module.hparams.get("task") == "multilabel"
    if multilabel:
        names = list(MULTILABEL_FILES) + ([OPERATING_POINT_FILE] if targeted else [])
        check_outputs(output_dir, names, config.overwrite)
        if config.explain:
            raise UsageError("--explain explains one predicted class per image; this checkpoint is multi-label")
    point = OperatingPoint.load(config.operating_point, class_names) if config.operating_point else None
    # predict_dataloader covers --split of any layout: folders, a held-out fraction, manifests, shards.
    datamodule = make_datamodule(config, data_dir, mean=preprocessing.mean, std=preprocessing.std,
                                 predict_split=config.split)
    check_tasks_match(multilabel, point, config.operating_point, datamodule)
    labels = dict(datamodule.samples(config.split))
    if list(datamodule.class_names) != class_names:
        raise UsageError(f"evaluate: the checkpoint's classes {class_names} differ from {datamodule.data_dir}'s "
                         f"{list(datamodule.class_names)}")
    trainer = inference_trainer(config, devices=1, limit_predict_batches=config.limit_val_batches)
    outputs = trainer.predict(LogitCollector(module, config.tta), datamodule=datamodule)
    logits, paths = gather_predictions(outputs, len(class_names))
    keep = [i for i, path in enumerate(paths) if path in labels]  # files outside the class folders have no class
    if not keep:
        raise DataError(f"no readable image of the {config.split} split of {data_dir} was evaluated")
    paths = [paths[i] for i in keep]
    targets = evaluation_targets(datamodule, config.split, paths, labels, multilabel)
    skipped = sorted(set(datamodule.bad_image_paths()) & set(labels))
    extra = {"data": str(data_dir), "tta": config.tta, "preprocessing": preprocessing.as_dict(),
             "skipped_images": len(skipped), "skipped_paths": skipped[:100]}
    report, files = (multilabel_evaluation_files if multilabel else evaluation_files)(
                                     logits[keep], targets, paths, class_names, calibrate=config.calibrate,
                                     target_precision=config.target_precision, target_recall=config.target_recall,
                                     operating_point=point, split=config.split, checkpoint=str(checkpoint), extra=extra,
                                     report_precisions=config.report_precision)
    replacing = config.overwrite and (output_dir / "report.json").is_file()
    write_outputs(output_dir, files, config.overwrite)
    if replacing:  # an earlier evaluation's files that this one does not write would mix with its report
        remove_stale_files(output_dir, files, keep=config.operating_point)
    if config.explain:
        say(explain(config, output_dir, module, logits[keep], targets, paths, class_names, datamodule))
    if output is not None:
        figures = multilabel_headline(report) if multilabel else headline_metrics(report)
        write_file(output, json.dumps(figures, indent=2) + "\n", overwrite=config.overwrite)
    for line in (multilabel_summary_lines if multilabel else summary_lines)(report):
        say(line)
    say(f"Wrote {', '.join(files)} to {output_dir}" + (f" ({len(skipped)} unreadable images skipped)" if skipped
                                                      else ""))
    if targeted:
        say(f"Apply it: pvt-lightning predict --input DIR --checkpoint {checkpoint} --operating-point "
            f"{output_dir / 'operating_point.json'}")
    return 0

def check_tasks_match(multilabel: bool, point: OperatingPoint | None, point_file: str | None, datamodule) -> None:
    """The checkpoint, the operating point and the data must all be single-label or all multi-label."""
    if point is not None and (point.task == "multilabel") != multilabel:
        raise UsageError(f"--operating-point {point_file} was written for a {point.task or 'single-label'} model; "
                         f"this checkpoint is {'multi-label' if multilabel else 'single-label'}")
    if multilabel and datamodule.task != "multilabel":
        raise UsageError(f"evaluate: the checkpoint is multi-label but {datamodule.data_dir} holds one class per "
                         "image; give the multi-label manifest it was trained on (docs/multilabel.md)")
    if not multilabel and datamodule.task == "multilabel":
        raise UsageError(f"evaluate: {datamodule.data_dir} is multi-label (several labels per image) but the "
                         "checkpoint predicts one class per image; evaluate a model trained with --task multilabel")


def evaluation_targets(datamodule, split: str, paths: list[str], labels: dict, multilabel: bool) -> torch.Tensor:
    """The evaluated images' targets in ``paths`` order: classes (N,), or multi-hot rows (N, C) for multi-label."""
    if not multilabel:
        return torch.tensor([labels[path] for path in paths])
    samples = datamodule.samples(split)
    row = {path: i for i, path in enumerate(samples.paths())}
    return torch.from_numpy(samples.targets[[row[path] for path in paths]]).float()



def multilabel_headline(report) -> dict:
    """``--output`` of a multi-label evaluation: mAP and the macro figures at the threshold, under training's tags."""
    split = report.get("split") or "val"
    return {f"{split}/map": report["map"], f"{split}/precision": report["macro"]["precision"],
            f"{split}/recall": report["macro"]["recall"], f"{split}/f1": report["macro"]["f1"],
            f"{split}/loss": report["log_loss"],
            **{f"{split}/recall@precision{label}": at["macro"]
               for label, at in (report.get("recall_at_precision") or {}).get("precisions", {}).items()}}


def remove_stale_files(output_dir: Path, written, keep: str | None = None) -> list[str]:
    """Remove the files an evaluation writes (known names only) that this evaluation did not write, except ``keep``
    (the --operating-point file being measured may live there)."""
    kept = Path(keep).expanduser().resolve() if keep else None
    removed = []
    for name in dict.fromkeys(evaluation_file_names(True) + list(MULTILABEL_FILES)):
        path = output_dir / name
        if name not in written and path.is_file() and path.resolve() != kept:
            path.unlink()
            removed.append(name)
    if removed:
        say(f"Removed {', '.join(removed)} of the earlier evaluation in {output_dir} (this one does not write them)")
    return removed


def explain(config: EvaluateConfig, output_dir: Path, module, logits, targets, paths, class_names,
            datamodule) -> str:
    """``--explain N``: the Grad-CAM gallery of a checkpoint's model (an exported graph has no gradients to use)."""
    if not hasattr(module, "model"):
        raise UsageError(f"--explain needs a training checkpoint (.ckpt); {config.checkpoint} is an exported file")
    return write_explanations(output_dir, module.model, logits, targets, paths, class_names, config.explain,
                              datamodule, config.overwrite)


def default_evaluation_dir(checkpoint: Path, split: str) -> Path:
    """``eval_<split>_<checkpoint name>`` in the checkpoint's run folder (next to the checkpoint elsewhere)."""
    return (version_dir_of(checkpoint) or checkpoint.parent) / f"eval_{split}_{checkpoint.stem}"


def data_folder(config: EvaluateConfig) -> Path:
    if config.data:
        return Path(config.data).expanduser()
    return ensure_demo_dataset()


run = evaluate
