"""Operating points: per-class probability thresholds for a target precision or recall, and the decisions they give.

Thresholds are chosen and applied on the calibrated probabilities ``softmax(logits / T)`` of the
point's temperature; an image no class clears is abstained on (``ABSTAIN`` in the CSVs).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch
from torchmetrics.classification import MulticlassPrecisionRecallCurve

from pvt_lightning.errors import DataError

ABSTAIN = "abstain"
OPERATING_POINT_FILE = "operating_point.json"


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
    task: str | None = None
    """``multilabel``: each threshold applies to its class's own sigmoid and an image takes every label over its
    threshold (evaluation/multilabel.py); None (not written): single-label, softmax and one decision per image."""

    @property
    def unreachable(self) -> list[str]:
        return [name for name, t in self.thresholds.items() if t is None]

    def to_json(self) -> str:
        fields = asdict(self)
        if fields["task"] is None:  # single-label files stay as they were
            del fields["task"]
        return json.dumps(fields, indent=2) + "\n"

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
        except OSError as err:  # a folder, no permission
            raise DataError(f"cannot read operating point file {path}: {err.strerror}") from None
        target = raw.get("target") if isinstance(raw, dict) else None
        point = cls(check_temperature(raw, path), check_thresholds(raw, path),
                    target if isinstance(target, dict) else {}, raw.get("split"), raw.get("checkpoint"),
                    raw.get("task") if raw.get("task") in ("multilabel",) else None)
        return point if class_names is None else point.for_classes(class_names, path)

    def for_classes(self, class_names: Sequence[str], path: str | Path = "operating point") -> "OperatingPoint":
        """The same point with its thresholds in the order of ``class_names`` (the model's); DataError, naming the
        missing and extra classes, if the two sets differ."""
        names = [str(name) for name in class_names]
        missing = [name for name in names if name not in self.thresholds]
        extra = [name for name in self.thresholds if name not in set(names)]
        if missing or extra:
            parts = ([f"missing {_names(missing)}"] if missing else []) + ([f"extra {_names(extra)}"] if extra else [])
            raise DataError(f"{path} does not fit this model's {len(names)} classes: {'; '.join(parts)}; use the "
                            "operating point written for this checkpoint")
        return replace(self, thresholds={name: self.thresholds[name] for name in names})


TEMPERATURE_RANGE = (1e-3, 1e3)
"""Temperatures ``--calibrate`` can fit; outside it the probabilities are all 0/1 or all equal: a broken file."""


def _shape_error(path: Path, detail: str) -> DataError:
    return DataError(f"{path} is not an operating point: {detail}; expected {{\"temperature\": T, \"thresholds\": "
                     "{class: probability in [0, 1] or null}, ...}} as written by evaluate --target-precision")


def check_temperature(raw: Any, path: Path) -> float:
    """The file's temperature: a real number (not a bool) within ``TEMPERATURE_RANGE``."""
    if not isinstance(raw, dict):
        raise _shape_error(path, f"it holds a {type(raw).__name__}, not an object")
    temperature = raw.get("temperature")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise _shape_error(path, f"temperature is {json.dumps(temperature)}, not a number")
    low, high = TEMPERATURE_RANGE
    if not (math.isfinite(temperature) and low <= temperature <= high):
        raise _shape_error(path, f"temperature {temperature} is outside [{low:g}, {high:g}]")
    return float(temperature)


def check_thresholds(raw: dict, path: Path) -> dict[str, float | None]:
    """The file's thresholds: one per class, each a probability in [0, 1] or null (never decided)."""
    thresholds = raw.get("thresholds")
    if not isinstance(thresholds, dict) or not thresholds:
        raise _shape_error(path, "thresholds is not an object of class: threshold")
    checked: dict[str, float | None] = {}
    for name, value in thresholds.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not (math.isfinite(value) and 0 <= value <= 1)):
            raise _shape_error(path, f"the threshold of {name!r} is {json.dumps(value)}, not a probability in "
                                     "[0, 1] or null")
        checked[str(name)] = None if value is None else float(value)
    return checked


def _names(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


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


def find_operating_point(checkpoint: str | Path) -> Path | None:
    """``operating_point.json`` next to ``checkpoint``, if there is one."""
    candidate = Path(checkpoint).expanduser().parent / OPERATING_POINT_FILE
    return candidate if candidate.is_file() else None
