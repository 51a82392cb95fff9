"""After training: per-class metrics, temperature scaling, operating points, and the files ``--evaluate`` writes.

Everything starts from the logits (N, C) of one split, the true classes (N,), the image paths and
the class names. Metrics come from torchmetrics (log-loss, which torchmetrics lacks, is the
cross-entropy of the logits). Scores, thresholds and decisions are always on the *calibrated*
probabilities ``softmax(logits / T)`` (T = 1 when not calibrated): temperature changes how the
classes rank against each other per image, so thresholds chosen at one T do not carry to another.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassAveragePrecision,
    MulticlassCalibrationError,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassPrecisionRecallCurve,
    MulticlassRecall,
)

from pvt_lightning.errors import UsageError
from pvt_lightning.errors import DataError
from pvt_lightning.runs.rundir import check_output, write_file
from pvt_lightning.errors import OutputExistsError

ECE_BINS = 15
ABSTAIN = "abstain"
PER_CLASS_COLUMNS = ("class", "precision", "recall", "f1", "support", "average_precision")
MAX_PROBABILITY_COLUMNS = 100
"""predictions.csv gets one probability column per class up to this many classes (top-5 only above)."""
OPERATING_POINT_FILE = "operating_point.json"


def calibrated_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """softmax(logits / T): (N, C) float32 probabilities."""
    return (logits.float() / temperature).softmax(dim=-1)


def log_loss(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true class (nats)."""
    return F.cross_entropy(logits.double() / temperature, targets).item()


def expected_calibration_error(probs: torch.Tensor, targets: torch.Tensor) -> float:
    """Top-label ECE, 15 equal-width confidence bins, L1 (torchmetrics' MulticlassCalibrationError)."""
    return MulticlassCalibrationError(probs.shape[1], n_bins=ECE_BINS, norm="l1")(probs, targets).item()


# --- metrics ---------------------------------------------------------------------------------------------------

def classification_report(logits: torch.Tensor, targets: torch.Tensor, class_names: Sequence[str],
                          temperature: float = 1.0) -> dict[str, Any]:
    """Macro and per-class precision/recall/F1/support/AP, accuracy, top-5, log-loss and ECE.

    Precision/recall/F1 are of the argmax prediction (which temperature does not change); AP, log-loss
    and ECE of ``softmax(logits / temperature)``. A class never predicted has precision 0.
    """
    num_classes = len(class_names)
    probs = calibrated_probs(logits, temperature)
    k = min(5, num_classes)

    def per_class(metric) -> list[float]:
        return metric(probs, targets).tolist()

    precision = per_class(MulticlassPrecision(num_classes, average=None))
    recall = per_class(MulticlassRecall(num_classes, average=None))
    f1 = per_class(MulticlassF1Score(num_classes, average=None))
    ap = [None if math.isnan(v) else v for v in per_class(MulticlassAveragePrecision(num_classes, average=None))]
    support = torch.bincount(targets, minlength=num_classes).tolist()
    confusion = MulticlassConfusionMatrix(num_classes)(probs, targets)
    return {
        "num_images": len(targets),
        "num_classes": num_classes,
        "accuracy": MulticlassAccuracy(num_classes, average="micro")(probs, targets).item(),
        f"top{k}_accuracy": MulticlassAccuracy(num_classes, top_k=k, average="micro")(probs, targets).item(),
        "log_loss": log_loss(logits, targets, temperature),
        "ece": expected_calibration_error(probs, targets),
        "macro": {
            "precision": MulticlassPrecision(num_classes, average="macro")(probs, targets).item(),
            "recall": MulticlassRecall(num_classes, average="macro")(probs, targets).item(),
            "f1": MulticlassF1Score(num_classes, average="macro")(probs, targets).item(),
            "average_precision": _nan_mean(ap),
        },
        "per_class": {name: {"precision": precision[i], "recall": recall[i], "f1": f1[i], "support": support[i],
                             "average_precision": ap[i]} for i, name in enumerate(class_names)},
        "most_confused": most_confused(confusion, class_names),
    }


def _nan_mean(values: Sequence[float | None]) -> float | None:
    """Mean of the values that exist (AP is None for a class absent from the split)."""
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def most_confused(confusion: torch.Tensor, class_names: Sequence[str], top: int = 20) -> list[dict[str, Any]]:
    """The ``top`` largest off-diagonal cells of the confusion matrix (rows true, columns predicted)."""
    off = confusion.clone()
    off.fill_diagonal_(0)
    counts, flat = off.flatten().topk(min(top, off.numel()))
    n = len(class_names)
    return [{"true": class_names[i // n], "predicted": class_names[i % n], "count": c}
            for c, i in zip(counts.tolist(), flat.tolist()) if c > 0]


# --- temperature scaling -------------------------------------------------------------------------------------

def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, max_iter: int = 100) -> float:
    """The one scalar T minimising NLL(softmax(logits / T)), by LBFGS on log T (so T stays positive)."""
    logits = logits.detach().double()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), targets)
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature = log_t.exp().item()
    if not math.isfinite(temperature) or log_loss(logits, targets, temperature) > log_loss(logits, targets):
        return 1.0  # never worse than not calibrating
    return temperature


def calibration_summary(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> dict[str, float]:
    """NLL and ECE before (T = 1) and after scaling by ``temperature``."""
    return {
        "temperature": temperature,
        "nll_before": log_loss(logits, targets), "nll_after": log_loss(logits, targets, temperature),
        "ece_before": expected_calibration_error(calibrated_probs(logits), targets),
        "ece_after": expected_calibration_error(calibrated_probs(logits, temperature), targets),
    }


# --- operating points ----------------------------------------------------------------------------------------

@dataclass
class OperatingPoint:
    """Temperature and one probability threshold per class (None: the class never reaches the target).

    Saved as ``operating_point.json``: ``{"temperature", "thresholds", "target", "split", "checkpoint"}``.
    """

    temperature: float
    thresholds: dict[str, float | None]
    target: dict[str, float] = field(default_factory=dict)
    split: str | None = None
    checkpoint: str | None = None

    @property
    def unreachable(self) -> list[str]:
        return [name for name, t in self.thresholds.items() if t is None]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def load(cls, path: str | Path, class_names: Sequence[str] | None = None) -> "OperatingPoint":
        """Read and check a file written by ``--evaluate``; with ``class_names``, they must match its classes."""
        path = Path(path).expanduser()
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise DataError(f"operating point file {path} not found; write one with --evaluate ... "
                            "--target-precision P (or --target-recall R)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataError(f"operating point file {path} is not valid JSON ({err})") from None
        ok = isinstance(raw, dict) and isinstance(raw.get("thresholds"), dict) and all(
            t is None or isinstance(t, (int, float)) for t in raw["thresholds"].values())
        temperature = raw.get("temperature") if isinstance(raw, dict) else None
        if not ok or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise DataError(f"{path} is not an operating point: expected {{\"temperature\": T > 0, \"thresholds\": "
                            f"{{class: number or null}}, ...}} as written by --evaluate --target-precision")
        point = cls(float(temperature), {str(k): None if v is None else float(v) for k, v in raw["thresholds"].items()},
                    raw.get("target") or {}, raw.get("split"), raw.get("checkpoint"))
        if class_names is not None and list(point.thresholds) != list(class_names):
            raise DataError(f"{path} has thresholds for the classes {list(point.thresholds)[:10]}, the checkpoint "
                            f"predicts {list(class_names)[:10]}; use the operating point made for this checkpoint")
        return point


def choose_thresholds(probs: torch.Tensor, targets: torch.Tensor, class_names: Sequence[str],
                      target_precision: float | None = None,
                      target_recall: float | None = None) -> dict[str, float | None]:
    """Per class, on one-vs-rest scores ``probs[:, c]``: the lowest threshold whose precision is at least
    ``target_precision``, or the highest whose recall is at least ``target_recall`` (None if none does).

    An image counts as predicted positive for class c when ``probs[:, c] >= threshold``.
    """
    if (target_precision is None) == (target_recall is None):
        raise ValueError("give exactly one of target_precision and target_recall")
    curve = MulticlassPrecisionRecallCurve(len(class_names))  # exact: thresholds are the distinct scores
    precision, recall, thresholds = curve(probs, targets)
    chosen: dict[str, float | None] = {}
    for i, name in enumerate(class_names):
        # Ascending thresholds; precision/recall[j] hold for score >= thresholds[j] (one extra final point).
        scores = thresholds[i]
        p, r = precision[i][: len(scores)], recall[i][: len(scores)]
        support = int((targets == i).sum())
        if target_precision is not None:
            ok = (p >= target_precision).nonzero().flatten()
            index = ok[0] if len(ok) and support else None
        else:
            ok = (r >= target_recall).nonzero().flatten()
            index = ok[-1] if len(ok) and support else None
        chosen[name] = None if index is None else scores[index].item()
    return chosen


def decide(probs: torch.Tensor, thresholds: Sequence[float | None]) -> torch.Tensor:
    """Per image, the most probable class among those at or above their threshold, else -1 (abstain): (N,)."""
    limits = torch.tensor([math.inf if t is None else t for t in thresholds], dtype=probs.dtype)
    cleared = probs >= limits  # (N, C)
    best = probs.masked_fill(~cleared, -1.0).argmax(dim=-1)
    return torch.where(cleared.any(dim=-1), best, torch.full_like(best, -1))


def operating_point_report(probs: torch.Tensor, targets: torch.Tensor, point: OperatingPoint) -> dict[str, Any]:
    """What the thresholds give on this split: one-vs-rest precision/recall per class, and the decisions'
    coverage (fraction not abstained) and accuracy among the decided images."""
    names = list(point.thresholds)
    per_class = {}
    for i, (name, t) in enumerate(point.thresholds.items()):
        positive = probs[:, i] >= (math.inf if t is None else t)
        true = targets == i
        tp = int((positive & true).sum())
        per_class[name] = {"threshold": t, "precision": tp / int(positive.sum()) if positive.any() else None,
                           "recall": tp / int(true.sum()) if true.any() else None}
    decisions = decide(probs, [point.thresholds[n] for n in names])
    decided = decisions >= 0
    return {
        "target": point.target, "temperature": point.temperature, "unreachable": point.unreachable,
        "per_class": per_class,
        "coverage": decided.float().mean().item() if len(decided) else 0.0,
        "decided_accuracy": (decisions[decided] == targets[decided]).float().mean().item() if decided.any() else None,
    }


# --- collecting logits through the Trainer ---------------------------------------------------------------------

class LogitCollector(L.LightningModule):
    """A trained classifier for ``trainer.predict``: batches ``(images, paths)`` -> logits and paths.

    With ``tta`` the logits are the mean of those of the images and of their horizontal flips. Logits,
    not softmax probabilities, are averaged: temperature scaling, log-loss and thresholds then apply to
    the averaged logits exactly as to a single pass.
    """

    def __init__(self, classifier: torch.nn.Module, tta: bool = False):
        super().__init__()
        self.classifier = classifier
        self.tta = tta

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(images)  # (B, C)
        if self.tta:
            logits = (logits + self.classifier(images.flip(-1))) / 2
        return logits

    def predict_step(self, batch, batch_idx: int) -> dict[str, Any] | None:
        if batch is None:  # every image of the batch was unreadable (skipped by the data module)
            return None
        images, paths = batch
        return {"logits": self(images).float().cpu(), "paths": list(paths)}


def gather_predictions(outputs: Sequence[dict[str, Any]], num_classes: int) -> tuple[torch.Tensor, list[str]]:
    """``trainer.predict``'s list of batch outputs -> logits (N, C) and the N paths (empty batches allowed)."""
    outputs = [out for out in outputs if out is not None and len(out["paths"])]
    logits = [out["logits"] for out in outputs]
    paths = [path for out in outputs for path in out["paths"]]
    return (torch.cat(logits) if logits else torch.empty(0, num_classes)), paths


# --- files ----------------------------------------------------------------------------------------------------

def per_class_csv(report: dict[str, Any], operating: dict[str, Any] | None = None) -> str:
    """per_class.csv: ``class,precision,recall,f1,support,average_precision`` (+ threshold columns)."""
    extra = ("threshold", "precision_at_threshold", "recall_at_threshold") if operating else ()
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow([*PER_CLASS_COLUMNS, *extra])
    for name, m in report["per_class"].items():
        row = [name, *(_number(m[key]) for key in PER_CLASS_COLUMNS[1:])]
        if operating:
            at = operating["per_class"][name]
            row += [_number(at["threshold"]), _number(at["precision"]), _number(at["recall"])]
        writer.writerow(row)
    return out.getvalue()


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
applied with ``--operating-point``, ``decision`` and one ``prob_<class>`` column per class (calibrated)."""


def prediction_columns(class_names: Sequence[str], point: OperatingPoint | None = None,
                       apply: bool = False) -> list[str]:
    if point is None:
        return list(PREDICTION_COLUMNS)
    if not apply:
        return [*PREDICTION_COLUMNS, "calibrated_probability"]
    per_class = [f"prob_{name}" for name in class_names] if len(class_names) <= MAX_PROBABILITY_COLUMNS else []
    return ["path", "class", "probability", "decision", "top5", *per_class]


def prediction_rows(paths: Sequence[str], logits: torch.Tensor, class_names: Sequence[str],
                    point: OperatingPoint | None = None, apply: bool = False) -> list[list[str]]:
    """Rows under ``prediction_columns``: softmax probabilities, or with ``apply`` the calibrated ones and decisions."""
    temperature = point.temperature if point is not None else 1.0
    probs = calibrated_probs(logits, temperature if apply else 1.0)
    k = min(5, len(class_names))
    top_p, top_i = (values.tolist() for values in probs.topk(k, dim=-1))
    rows = []
    if not apply:
        calibrated = calibrated_probs(logits, temperature).max(dim=-1).values.tolist() if point else None
        for n, path in enumerate(paths):
            row = [path, class_names[top_i[n][0]], f"{top_p[n][0]:.6f}",
                   ";".join(f"{class_names[c]}:{q:.4f}" for c, q in zip(top_i[n], top_p[n]))]
            rows.append(row + [f"{calibrated[n]:.6f}"] if point else row)
        return rows
    decisions = decide(probs, list(point.thresholds.values())).tolist()
    every = probs.tolist() if len(class_names) <= MAX_PROBABILITY_COLUMNS else None
    for n, path in enumerate(paths):
        row = [path, class_names[top_i[n][0]], f"{top_p[n][0]:.9g}",
               ABSTAIN if decisions[n] < 0 else class_names[decisions[n]],
               ";".join(f"{class_names[c]}:{q:.4f}" for c, q in zip(top_i[n], top_p[n]))]
        rows.append(row + [f"{q:.9g}" for q in every[n]] if every is not None else row)
    return rows


def find_operating_point(checkpoint: str | Path) -> Path | None:
    """``operating_point.json`` next to ``checkpoint``, if there is one."""
    candidate = Path(checkpoint).expanduser().parent / OPERATING_POINT_FILE
    return candidate if candidate.is_file() else None


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
                     extra: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, bytes | str]]:
    """The report and every file of ``--evaluate`` (name -> content), from the logits (N, C) of one split.

    With ``calibrate`` the temperature is fitted on this split first; with a target, per-class thresholds
    are chosen on the calibrated probabilities and ``operating_point.json`` is among the files. A given
    ``operating_point`` (chosen on another split) is applied instead: its temperature and thresholds are
    measured on this one. Accuracy, AP, log-loss, ECE and PR curves are of the model as is (T = 1);
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
    return {f"{split}/acc": report["accuracy"], f"{split}/acc5": report[k], f"{split}/precision": macro["precision"],
            f"{split}/recall": macro["recall"], f"{split}/f1": macro["f1"], f"{split}/loss": report["log_loss"]}


def summary_lines(report: dict[str, Any]) -> list[str]:
    """A few lines for the terminal: macro figures, calibration, the operating point's reach."""
    k = next(key for key in report if key.startswith("top") and key.endswith("_accuracy"))
    macro = report["macro"]
    lines = [f"{report['num_images']} images | acc {report['accuracy']:.4f} {k.split('_')[0]} {report[k]:.4f} | "
             f"macro P {macro['precision']:.4f} R {macro['recall']:.4f} F1 {macro['f1']:.4f} AP "
             f"{_number(macro['average_precision']) or '-'} | log-loss {report['log_loss']:.4f} ECE {report['ece']:.4f}"]
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
