"""The files ``evaluate`` writes (report, per-class and prediction CSVs, plots, operating point), ``predict``'s rows.

Everything starts from the logits (N, C) of one split, the true classes (N,), the image paths and the
class names; metrics come from ``evaluation.metrics``, temperature scaling from ``evaluation.calibration``
and thresholds from ``evaluation.operating_point``.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Sequence

import torch
from torchmetrics.classification import MulticlassConfusionMatrix

from pvt_lightning.errors import OutputExistsError, UsageError
from pvt_lightning.evaluation.calibration import calibrated_probs, calibration_summary, fit_temperature
from pvt_lightning.evaluation.metrics import classification_report
from pvt_lightning.evaluation.operating_point import (
    ABSTAIN,
    OPERATING_POINT_FILE,
    OperatingPoint,
    choose_thresholds,
    decide,
    operating_point_report,
)
from pvt_lightning.runs.io import check_output, write_file
from pvt_lightning.tags import RECALL_AT_PRECISION, precision_label, recall_at_precision_tag
from pvt_lightning.training.recall_at_precision import DEFAULT_PRECISIONS, method_name, recall_at_precision

PER_CLASS_COLUMNS = ("class", "precision", "recall", "f1", "support", "average_precision")
MAX_PROBABILITY_COLUMNS = 100
"""predictions.csv gets one probability column per class up to this many classes (top-5 only above)."""


def per_class_csv(report: dict[str, Any], operating: dict[str, Any] | None = None) -> str:
    """per_class.csv: ``class,precision,recall,f1,support,average_precision`` (+ threshold columns), then one
    ``recall@precisionP`` column per reported precision, last."""
    extra = ("threshold", "precision_at_threshold", "recall_at_threshold") if operating else ()
    at_precision = [f"{RECALL_AT_PRECISION}{label}" for label in (report.get("recall_at_precision") or {}).get(
        "precisions", {})]
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow([*PER_CLASS_COLUMNS, *extra, *at_precision])
    for name, m in report["per_class"].items():
        row = [name, *(_number(m[key]) for key in PER_CLASS_COLUMNS[1:])]
        if operating:
            at = operating["per_class"][name]
            row += [_number(at["threshold"]), _number(at["precision"]), _number(at["recall"])]
        writer.writerow(row + [_number(m.get(column)) for column in at_precision])
    return out.getvalue()


def add_recall_at_precision(report: dict, probs: torch.Tensor, targets: torch.Tensor, class_names: Sequence[str],
                            precisions: Sequence[float] | None) -> None:
    """``report["recall_at_precision"]`` (``recall_at_precision_report``), and each class's recall at each P as a
    ``recall@precisionP`` column of ``report["per_class"]``."""
    report["recall_at_precision"] = recall_at_precision_report(probs, targets, class_names,
                                                               precisions or DEFAULT_PRECISIONS)
    for label, at in report["recall_at_precision"]["precisions"].items():
        for name, value in at["per_class"].items():
            report["per_class"][name][f"{RECALL_AT_PRECISION}{label}"] = value


def recall_at_precision_report(probs: torch.Tensor, targets: torch.Tensor, class_names: Sequence[str],
                               precisions: Sequence[float]) -> dict[str, Any]:
    """report.json's ``recall_at_precision``: how it was computed and, per P, the macro mean and the classes that
    never reach P (their recall counts as 0); the per-class values go into ``per_class`` as ``recall@precisionP``."""
    results, thresholds = recall_at_precision(probs, targets, class_names, precisions)
    return {"method": method_name(thresholds), "precisions": {
        precision_label(r.precision): {"macro": r.macro, "unreached": r.unreached,
                                       "per_class": dict(zip(class_names, r.per_class))} for r in results}}


def predictions_csv(paths: Sequence[str], probs: torch.Tensor, class_names: Sequence[str],
                    targets: torch.Tensor | None = None, decisions: torch.Tensor | None = None) -> str:
    """One row per image: path, [true_class,] predicted_class, probability, [decision,] top5, [prob_<class>...].

    ``probability`` is that of the predicted class; per-class columns only up to ``MAX_PROBABILITY_COLUMNS``.
    Probabilities are written with 9 significant digits: float32 values read back exactly, so thresholds
    compare the same way in a spreadsheet as they did here.
    """
    k = min(5, len(class_names))
    all_columns = len(class_names) <= MAX_PROBABILITY_COLUMNS
    header = ["path", *(["true_class"] if targets is not None else []), "predicted_class", "probability",
              *(["decision"] if decisions is not None else []), "top5",
              *([f"prob_{name}" for name in class_names] if all_columns else [])]
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    top_p, top_i = (values.tolist() for values in probs.topk(k, dim=-1))
    true = targets.tolist() if targets is not None else None
    decided = decisions.tolist() if decisions is not None else None
    rows = probs.tolist() if all_columns else None
    for n, path in enumerate(paths):
        row = [path]
        if true is not None:
            row.append(class_names[true[n]])
        row += [class_names[top_i[n][0]], f"{top_p[n][0]:.9g}"]
        if decided is not None:
            row.append(ABSTAIN if decided[n] < 0 else class_names[decided[n]])
        row.append(";".join(f"{class_names[c]}:{q:.4f}" for c, q in zip(top_i[n], top_p[n])))
        if rows is not None:
            row += [f"{q:.9g}" for q in rows[n]]
        writer.writerow(row)
    return out.getvalue()


PREDICTION_COLUMNS = ("path", "class", "probability", "top5")
"""``--predict``'s CSV; an operating point adds ``calibrated_probability`` (found next to the checkpoint) or,
applied with ``--operating-point``, ``decision`` and one ``prob_<class>`` column per class (calibrated);
``--topk K`` adds ``top1_class, top1_prob ... topK_class, topK_prob`` last."""


def topk_columns(topk: int) -> list[str]:
    """``top1_class, top1_prob, ..., top<k>_class, top<k>_prob`` (none for 0)."""
    return [column for i in range(1, topk + 1) for column in (f"top{i}_class", f"top{i}_prob")]


def prediction_columns(class_names: Sequence[str], point: OperatingPoint | None = None,
                       apply: bool = False, topk: int = 0) -> list[str]:
    if point is None:
        return [*PREDICTION_COLUMNS, *topk_columns(topk)]
    if not apply:
        return [*PREDICTION_COLUMNS, "calibrated_probability", *topk_columns(topk)]
    per_class = [f"prob_{name}" for name in class_names] if len(class_names) <= MAX_PROBABILITY_COLUMNS else []
    return ["path", "class", "probability", "decision", "top5", *per_class, *topk_columns(topk)]


def prediction_rows(paths: Sequence[str], logits: torch.Tensor, class_names: Sequence[str],
                    point: OperatingPoint | None = None, apply: bool = False, topk: int = 0) -> list[list[str]]:
    """Rows under ``prediction_columns``: softmax probabilities, or with ``apply`` the calibrated ones and decisions;
    ``topk`` classes and probabilities last (of the same probabilities as ``probability``)."""
    temperature = point.temperature if point is not None else 1.0
    probs = calibrated_probs(logits, temperature if apply else 1.0)
    k = min(5, len(class_names))
    top_p, top_i = (values.tolist() for values in probs.topk(max(k, topk), dim=-1))
    number = "{:.9g}" if apply else "{:.6f}"
    ranked = [[cell for c, q in zip(top_i[n][:topk], top_p[n][:topk]) for cell in (class_names[c], number.format(q))]
              for n in range(len(paths))]
    rows = []
    if not apply:
        calibrated = calibrated_probs(logits, temperature).max(dim=-1).values.tolist() if point else None
        for n, path in enumerate(paths):
            row = [path, class_names[top_i[n][0]], f"{top_p[n][0]:.6f}",
                   ";".join(f"{class_names[c]}:{q:.4f}" for c, q in zip(top_i[n][:k], top_p[n][:k]))]
            rows.append((row + [f"{calibrated[n]:.6f}"] if point else row) + ranked[n])
        return rows
    decisions = decide(probs, list(point.thresholds.values())).tolist()
    every = probs.tolist() if len(class_names) <= MAX_PROBABILITY_COLUMNS else None
    for n, path in enumerate(paths):
        row = [path, class_names[top_i[n][0]], f"{top_p[n][0]:.9g}",
               ABSTAIN if decisions[n] < 0 else class_names[decisions[n]],
               ";".join(f"{class_names[c]}:{q:.4f}" for c, q in zip(top_i[n][:k], top_p[n][:k]))]
        rows.append((row + [f"{q:.9g}" for q in every[n]] if every is not None else row) + ranked[n])
    return rows


def _number(value: float | int | None) -> str:
    return "" if value is None else str(value) if isinstance(value, int) else f"{value:.6f}"


def check_outputs(output_dir: str | Path, names: Sequence[str], overwrite: bool = False) -> Path:
    """Fail now, before any work, if a file among ``names`` exists in ``output_dir`` (unless ``overwrite``)."""
    folder = Path(output_dir).expanduser()
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--output-dir {folder} is a file; give a folder")
    existing = [name for name in names if (folder / name).exists()]
    if existing and not overwrite:
        raise OutputExistsError(f"--output-dir {folder} already holds {', '.join(existing)}; choose a new folder or "
                                "pass --overwrite to replace them (pvt-lightning never replaces your files unasked)")
    for name in names:
        check_output(folder / name, overwrite, flag="--output-dir")
    return folder


def write_outputs(output_dir: str | Path, files: dict[str, bytes | str], overwrite: bool = False) -> list[Path]:
    """Write each ``name: content`` into ``output_dir``, atomically; refuses existing files unless ``overwrite``."""
    folder = check_outputs(output_dir, list(files), overwrite)
    return [write_file(folder / name, content, overwrite) for name, content in files.items()]


# --- one evaluation, all files --------------------------------------------------------------------------------

def evaluation_files(logits: torch.Tensor, targets: torch.Tensor, paths: Sequence[str], class_names: Sequence[str],
                     *, calibrate: bool = False, target_precision: float | None = None,
                     target_recall: float | None = None, operating_point: OperatingPoint | None = None,
                     split: str | None = None, checkpoint: str | None = None,
                     extra: dict[str, Any] | None = None, report_precisions: Sequence[float] | None = None
                     ) -> tuple[dict[str, Any], dict[str, bytes | str]]:
    """The report and every file of ``--evaluate`` (name -> content), from the logits (N, C) of one split.

    With ``calibrate`` the temperature is fitted on this split first; with a target, per-class thresholds
    are chosen on the calibrated probabilities and ``operating_point.json`` is among the files. A given
    ``operating_point`` (chosen on another split) is applied instead: its temperature and thresholds are
    measured on this one. Accuracy, AP, log-loss, ECE, PR curves and the recall at each of ``report_precisions``
    (``recall_at_precision``, per class as ``recall@precisionP``) are of the model as is (T = 1);
    ``calibration`` holds NLL and ECE after scaling. ``extra`` (skipped images, TTA) goes into report.json.
    """
    from pvt_lightning.evaluation.plots import confusion_matrix_png, pr_curves_png, reliability_png

    logits, targets = logits.float().cpu(), targets.long().cpu()
    point = operating_point
    temperature = point.temperature if point else fit_temperature(logits, targets) if calibrate else 1.0
    scaled = calibrate or point is not None
    probs = calibrated_probs(logits, temperature)
    report = {"checkpoint": checkpoint, "split": split, **(extra or {}),
              **classification_report(logits, targets, class_names)}
    report["calibration"] = calibration_summary(logits, targets, temperature) if scaled else None
    add_recall_at_precision(report, calibrated_probs(logits), targets, class_names, report_precisions)
    if point is None and (target_precision is not None or target_recall is not None):
        target = {"precision": target_precision} if target_precision is not None else {"recall": target_recall}
        thresholds = choose_thresholds(probs, targets, class_names, target_precision, target_recall)
        point = OperatingPoint(temperature, thresholds, target, split, checkpoint)
    operating = operating_point_report(probs, targets, point) if point else None
    if operating_point is not None:
        operating["chosen_on"] = {"split": point.split, "checkpoint": point.checkpoint}
    report["operating_point"] = operating
    decisions = decide(probs, list(point.thresholds.values())) if point else None
    uncalibrated = calibrated_probs(logits)
    files: dict[str, bytes | str] = {
        "report.json": json.dumps(_json_safe(report), indent=2, allow_nan=False) + "\n",
        "per_class.csv": per_class_csv(report, operating),
        "predictions.csv": predictions_csv(paths, probs, class_names, targets, decisions),
        "confusion_matrix.png": confusion_matrix_png(MulticlassConfusionMatrix(len(class_names))(probs, targets),
                                                     class_names),
        "pr_curves.png": pr_curves_png(uncalibrated, targets, class_names, torch.tensor(
            [_nan_if_none(report["per_class"][name]["average_precision"]) for name in class_names])),
        "reliability.png": reliability_png(uncalibrated, targets, probs if scaled else None,
                                           temperature if scaled else None),
    }
    if point is not None and operating_point is None:
        files[OPERATING_POINT_FILE] = point.to_json()
    return report, files


def _json_safe(value: Any) -> Any:
    """NaN and infinities (e.g. from a model that outputs NaN) as null, so report.json stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


def _nan_if_none(value: float | None) -> float:
    return math.nan if value is None else value


def evaluation_file_names(operating_point: bool) -> list[str]:
    """The files ``evaluation_files`` returns (``operating_point``: one is chosen), to check the output folder first."""
    names = ["report.json", "per_class.csv", "predictions.csv", "confusion_matrix.png", "pr_curves.png",
             "reliability.png"]
    return names + [OPERATING_POINT_FILE] if operating_point else names


def headline_metrics(report: dict[str, Any]) -> dict[str, float]:
    """The macro figures under the tags training logs (``val/acc``, ``test/f1``...): what ``--output`` holds."""
    split = report.get("split") or "val"
    k = next(key for key in report if key.startswith("top") and key.endswith("_accuracy"))
    macro = report["macro"]
    at_precision = {recall_at_precision_tag(float(label), stage=split): at["macro"]
                    for label, at in (report.get("recall_at_precision") or {}).get("precisions", {}).items()}
    return {f"{split}/acc": report["accuracy"], f"{split}/acc5": report[k], f"{split}/precision": macro["precision"],
            f"{split}/recall": macro["recall"], f"{split}/f1": macro["f1"], f"{split}/loss": report["log_loss"],
            **at_precision}


def _binned_note(report: dict[str, Any]) -> str:
    """`` (binned (1001 thresholds))`` after the AP when the split was too large for the exact curve."""
    method = (report.get("curves") or {}).get("method", "exact")
    return "" if method == "exact" else f" ({method})"


def summary_lines(report: dict[str, Any]) -> list[str]:
    """A few lines for the terminal: macro figures, calibration, the operating point's reach."""
    k = next(key for key in report if key.startswith("top") and key.endswith("_accuracy"))
    macro = report["macro"]
    lines = [f"{report['num_images']} images | acc {report['accuracy']:.4f} {k.split('_')[0]} {report[k]:.4f} | "
             f"macro P {macro['precision']:.4f} R {macro['recall']:.4f} F1 {macro['f1']:.4f} AP "
             f"{_number(macro['average_precision']) or '-'}{_binned_note(report)} | log-loss {report['log_loss']:.4f} ECE {report['ece']:.4f}"]
    at_precision = report.get("recall_at_precision")
    for label, at in (at_precision or {}).get("precisions", {}).items():
        unreached = at["unreached"]
        lines.append(f"recall at precision {label}: macro {at['macro']:.4f} ({at_precision['method']})"
                     + (f"; {len(unreached)} classes never reach it (counted as 0): {', '.join(unreached[:10])}"
                        + (" ..." if len(unreached) > 10 else "") if unreached else ""))
    worst = sorted(report["per_class"].items(), key=lambda item: item[1]["recall"])[:3]
    lines.append("lowest recall: " + ", ".join(f"{name} {m['recall']:.3f} (n={m['support']})" for name, m in worst))
    if report.get("calibration"):
        c = report["calibration"]
        lines.append(f"calibration: T {c['temperature']:.3f} | NLL {c['nll_before']:.4f} -> {c['nll_after']:.4f} | "
                     f"ECE {c['ece_before']:.4f} -> {c['ece_after']:.4f}")
    if report.get("operating_point"):
        op = report["operating_point"]
        (metric, value), = op["target"].items() if op["target"] else (("precision", float("nan")),)
        held = [name for name, m in op["per_class"].items() if m[metric] is not None and m[metric] >= value]
        if "chosen_on" in op:  # thresholds from another split, measured on this one
            lines.append(f"operating point chosen on {op['chosen_on']['split']}: {len(held)}/{len(op['per_class'])} "
                         f"classes have {metric} >= {value} here, coverage {op['coverage']:.3f}, accuracy on "
                         f"decided {_number(op['decided_accuracy']) or '-'}")
            return lines
        reached = len(op["per_class"]) - len(op["unreachable"])
        lines.append(f"operating point ({metric} >= {value}): {reached}/{len(op['per_class'])} classes reach it, "
                     f"coverage {op['coverage']:.3f}, accuracy on decided {_number(op['decided_accuracy']) or '-'}")
        if op["unreachable"]:
            lines.append(f"cannot reach {metric} {value}: {', '.join(op['unreachable'][:20])}"
                         + (f" and {len(op['unreachable']) - 20} more" if len(op["unreachable"]) > 20 else ""))
    return lines
