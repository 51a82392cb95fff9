"""What a finished fit measured: summary.json's fields, read from the Trainer, its callbacks and the run.

``build_summary`` is called by ``cli.train`` on rank 0 after ``trainer.fit``; ``runs/rundir.write_summary``
writes the result. The field names are a contract that ``runs/compare.py`` and other tools read back.
"""

from __future__ import annotations

import re
from typing import Any

import lightning as L

from pvt_lightning import tags
from pvt_lightning.training.callbacks.inference import InferenceSpeed
from pvt_lightning.training.callbacks.memory import MemoryMonitor
from pvt_lightning.training.callbacks.recall_at_precision import RecallAtPrecisionReport
from pvt_lightning.training.callbacks.timing import EpochTimer


def run_figures(trainer: L.Trainer) -> dict[str, Any]:
    """summary.json's timing and memory fields: mean epoch time and throughput, peak memory and what it measures."""
    timer = next((c for c in trainer.callbacks if isinstance(c, EpochTimer)), None)
    memory = next((c for c in trainer.callbacks if isinstance(c, MemoryMonitor)), None)

    def mean(values):
        return round(sum(values) / len(values), 3) if values else None

    peak = round(max(memory.peaks_mb), 1) if memory and memory.peaks_mb else None
    device = memory.memory_device if memory else None
    measure = {"cuda": "cuda_peak_reserved", "cpu": "cpu_process_tree_pss"}.get(device)
    figures = {
        "epoch_time_s": mean(timer.epoch_times_s) if timer else None,
        "throughput_img_s": mean(timer.throughputs_img_s) if timer else None,
        "peak_memory_mb": peak,
        "memory_device": device,
        "memory_measure": measure,
    }
    if measure == "cpu_process_tree_pss":
        figures["peak_pss_mb"] = peak
    return figures


def recall_at_precision_figures(trainer: L.Trainer, metrics: dict, best: dict) -> dict[str, Any]:
    """Recall at each fixed precision, macro (and of the positive class), into ``metrics`` (last validated epoch)
    and ``best`` (the best epoch's, where this fit validated it), with the macro AP; returns the
    ``recall_at_precision`` and ``validation_curves`` blocks."""
    report = next((c for c in trainer.callbacks if isinstance(c, RecallAtPrecisionReport)), None)
    if report is None:
        return {}
    kept = report.summary_tags()
    metrics.update({tag: float(v) for tag, v in trainer.callback_metrics.items() if tag in kept})
    at_best = report.history.get(best["epoch"], {})
    best.update({tag: at_best.get(tag) for tag in kept})
    return {"recall_at_precision": report.summary(), "validation_curves": report.curves_summary()}


def inference_figures(trainer: L.Trainer) -> dict[str, Any]:
    """summary.json's ``inference`` block (``training/inference_speed.INFERENCE_FIELDS``; None if not measured)."""
    probe = next((c for c in trainer.callbacks if isinstance(c, InferenceSpeed)), None)
    return {"inference": probe.result if probe is not None else None}


def build_summary(trainer, module, datamodule, checkpoint, complexity, config, recipe) -> dict[str, Any]:
    """summary.json: the run's final figures (field names are a contract other tools read)."""
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k in tags.SUMMARY_METRICS}
    best_path = checkpoint.best_model_path or None
    best_epoch = int(m.group(1)) if best_path and (m := re.search(r"best-epoch(\d+)", best_path)) else None
    best_score = None if checkpoint.best_model_score is None else float(checkpoint.best_model_score)
    best = {"epoch": best_epoch, "metric": config.monitor, "mode": config.monitor_mode, "value": best_score}
    if config.monitor == tags.VAL_ACC:
        best[tags.VAL_ACC] = best_score
    if getattr(module, "multilabel", False) and best_epoch in module.history:  # the best epoch's mAP, P, R, F1
        best.update({tag: value for tag, value in module.history[best_epoch].items() if tag != config.monitor})
    fixed_precision = recall_at_precision_figures(trainer, metrics, best)
    if getattr(module, "multilabel", False):
        fixed_precision["multilabel"] = {"task": "multilabel", "threshold": module.hparams.threshold,
                                         "loss": module.hparams.loss,
                                         "average_precision": {name: float(trainer.callback_metrics[tags.ap_tag(name)])
                                                               for name in module.class_names
                                                               if tags.ap_tag(name) in trainer.callback_metrics}}
    return {
        "variant": config.variant, "linear_sra": module.linear_sra_enabled, "img_size": list(config.img_size),
        "num_classes": datamodule.num_classes, "class_names": list(datamodule.class_names),
        "params_m": round(complexity.params_m, 3), "gmacs": round(complexity.gmacs, 3),
        "attention_gmacs": round(complexity.attention_gmacs, 3),
        "epochs": trainer.current_epoch, "global_step": trainer.global_step, "metrics": metrics, "best": best,
        **run_figures(trainer),
        "bad_images": len(datamodule.bad_image_paths()),
        "checkpoints": {"best": best_path, "last": checkpoint.last_model_path or None},
        "precision": str(trainer.precision), "batch_size": config.batch_size, "world_size": trainer.world_size,
        "accumulate_grad_batches": config.accumulate_grad_batches, "lr": config.lr,
        "recipe": recipe.name, "positive_class": config.positive_class,
        **fixed_precision, **inference_figures(trainer),
    }
