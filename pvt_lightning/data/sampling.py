"""Class imbalance: class counts, loss weights per class, and a class-rebalancing sampler that works under DDP.

``--class-weights balanced`` weighs each class by its inverse frequency, ``w_c = N / (C * n_c)`` (the
weights average 1 over the training samples, so the loss keeps its scale). ``--sampler balanced``
draws every class equally often (each sample with probability proportional to ``1 / n_c``); ``sqrt``
goes half-way (``1 / sqrt(n_c)``), a milder correction that repeats rare images less.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DistributedSampler

from pvt_lightning.errors import DataError
from pvt_lightning.data.index import Sample, SampleIndex
from pvt_lightning.data.resume import ResumableEpoch

SAMPLERS = ("none", "balanced", "sqrt")
CLASS_WEIGHTS = ("none", "balanced")
"""Built-in ``--class-weights`` choices; any other value is the path of a JSON file ``{class: weight}``."""


def class_counts(samples: Sequence[Sample], num_classes: int) -> list[int]:
    """Images per class index, 0..num_classes-1 (classes with no image count 0); multi-label: images labelled
    with each class."""
    if isinstance(samples, SampleIndex) and samples.targets is not None:
        return samples.targets.sum(axis=0, dtype=np.int64)[:num_classes].tolist()
    if isinstance(samples, SampleIndex):
        return np.bincount(samples.labels[samples.labels >= 0], minlength=num_classes)[:num_classes].tolist()
    counts = Counter(label for _, label in samples)
    return [counts.get(index, 0) for index in range(num_classes)]


def imbalance_ratio(counts: Sequence[int]) -> float:
    """Largest class count over the smallest (1.0 = balanced; inf if a class has no images)."""
    return max(counts) / min(counts) if min(counts) > 0 else math.inf


def balanced_class_weights(counts: Sequence[int]) -> list[float]:
    """Inverse-frequency weights ``N / (C * n_c)``: a mean weight of 1 over the training samples."""
    total, num_classes = sum(counts), len(counts)
    return [total / (num_classes * n) if n > 0 else 0.0 for n in counts]


def read_class_weights(path: str | Path, class_names: Sequence[str]) -> list[float]:
    """A JSON file ``{"class name": weight, ...}`` naming every class once, as a list in class-index order."""
    path = Path(path).expanduser()
    flag = f"--class-weights {path}"
    if not path.is_file():
        raise DataError(f"{flag}: no such file; pass none, balanced or a JSON file of {{class: weight}}")
    try:
        table = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{flag}: not valid JSON ({err})") from None
    if not isinstance(table, dict):
        raise DataError(f"{flag}: expected a JSON object {{\"class name\": weight, ...}}")
    unknown = sorted(set(table) - set(class_names))
    missing = [name for name in class_names if name not in table]
    if unknown or missing:
        raise DataError(f"{flag}: the keys must be exactly the class names"
                        + (f"; unknown: {', '.join(unknown)}" if unknown else "")
                        + (f"; missing: {', '.join(missing)}" if missing else ""))
    weights = []
    for name in class_names:
        value = table[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise DataError(f"{flag}: the weight of {name!r} must be a finite number >= 0, got {value!r}")
        weights.append(float(value))
    if not any(weights):
        raise DataError(f"{flag}: every weight is 0; at least one class must count")
    return weights


def resolve_class_weights(spec: str, class_names: Sequence[str], counts: Sequence[int]) -> list[float] | None:
    """``--class-weights``: none -> None, balanced -> inverse frequency, else the JSON file's weights."""
    if spec == "none":
        return None
    if spec == "balanced":
        return balanced_class_weights(counts)
    return read_class_weights(spec, class_names)


def class_probabilities(counts: Sequence[int], policy: str) -> list[float]:
    """How often each class is drawn: balanced 1/C each, sqrt proportional to sqrt(n_c), none n_c / N."""
    if policy not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {policy!r}")
    mass = [float(n > 0) if policy == "balanced" else math.sqrt(n) if policy == "sqrt" else float(n) for n in counts]
    return [m / sum(mass) for m in mass]


class ClassBalancedSampler(ResumableEpoch, DistributedSampler):
    """Draws ``len(dataset)`` samples per epoch with replacement, rebalanced by class, split across DDP ranks.

    Each draw picks a class (``class_probabilities``), then one of its images uniformly: with
    ``balanced`` every class is drawn equally often, an image of class c with probability 1 / (C n_c).
    Every rank draws the same list (seeded by ``seed + epoch``; Lightning calls ``set_epoch`` each
    epoch) and takes every ``num_replicas``-th entry from ``rank`` on, as ``DistributedSampler`` splits
    its permutation: together the ranks see one epoch of the usual length, ``ceil(N / num_replicas)``
    samples each. Being a ``DistributedSampler``, Lightning leaves it in place under DDP rather than
    wrapping it in its own.
    """

    def __init__(self, labels: Sequence[int], policy: str = "balanced", num_replicas: int = 1, rank: int = 0,
                 seed: int = 0):
        labels = torch.as_tensor(np.asarray(labels, dtype=np.int64))
        counts = torch.bincount(labels)
        self.policy = policy
        self.class_probs = torch.tensor(class_probabilities(counts.tolist(), policy), dtype=torch.float64)
        self.by_class = torch.argsort(labels, stable=True)  # sample indices grouped by class
        self.class_counts = counts
        self.class_starts = torch.cumsum(counts, 0) - counts  # where each class starts in by_class
        # DistributedSampler only needs len() of the "dataset"; passing the ranks keeps it off torch.distributed.
        super().__init__(labels, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)

    def epoch_order(self) -> list[int]:
        """This rank's draws for ``self.epoch`` (iteration and the resumable state: resume.py)."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        classes = torch.multinomial(self.class_probs, self.total_size, replacement=True, generator=generator)
        within = (torch.rand(self.total_size, generator=generator, dtype=torch.float64)
                  * self.class_counts[classes]).long()  # uniform in 0..n_c-1
        drawn = self.by_class[self.class_starts[classes] + within]
        return drawn[self.rank:self.total_size:self.num_replicas].tolist()


def imbalance_summary(class_names: Sequence[str], split_samples: dict[str, Sequence[Sample]],
                      class_weights: Sequence[float] | None, handling: dict[str, Any]) -> dict[str, Any]:
    """summary.json's ``class_counts`` ({split: {class: images}}), ``imbalance_ratio`` (train, max/min) and
    ``imbalance_handling`` (``handling``, e.g. class_weights/sampler/loss, plus the weights in use per class)."""
    counts = {split: dict(zip(class_names, class_counts(samples, len(class_names))))
              for split, samples in split_samples.items()}
    ratio = imbalance_ratio(list(counts["train"].values()))
    weights = None if class_weights is None else {name: round(w, 6) for name, w in zip(class_names, class_weights)}
    return {"class_counts": counts, "imbalance_ratio": None if math.isinf(ratio) else round(ratio, 3),
            "imbalance_handling": {**handling, "class_weight_values": weights}}


def imbalance_line(summary: dict[str, Any]) -> str:
    """One banner line: images per class (fewest..most) per split, the ratio, what is applied, and a hint."""
    parts = []
    for split, counts in summary["class_counts"].items():
        least = min(counts, key=counts.get)
        most = max(counts, key=counts.get)
        parts.append(f"{split} {counts[least]} ({least}) .. {counts[most]} ({most}) images per class")
    ratio = summary["imbalance_ratio"]
    handling = summary["imbalance_handling"]
    applied = ", ".join(f"{key.replace('_', ' ')} {value}" for key, value in handling.items()
                        if key != "class_weight_values")
    line = f"classes: {'; '.join(parts)} | imbalance {'inf' if ratio is None else f'{ratio:g}'}:1 | {applied}"
    if (ratio is None or ratio >= 3) and handling.get("class_weights") == "none" and handling.get("sampler") == "none":
        line += " (imbalanced: consider --class-weights balanced or --sampler sqrt, and --monitor val/recall)"
    return line
