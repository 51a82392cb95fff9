"""Operating points: per-class probability thresholds for a target precision or recall, and the decisions they give.

Thresholds are chosen and applied on the calibrated probabilities ``softmax(logits / T)`` of the
point's temperature; an image no class clears is abstained on (``ABSTAIN`` in the CSVs).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
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


def find_operating_point(checkpoint: str | Path) -> Path | None:
    """``operating_point.json`` next to ``checkpoint``, if there is one."""
    candidate = Path(checkpoint).expanduser().parent / OPERATING_POINT_FILE
    return candidate if candidate.is_file() else None
