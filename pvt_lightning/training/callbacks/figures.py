"""Confusion-matrix drawing, for TensorBoard at every validation and for the evaluation report.

Past ``MAX_GRID_CLASSES`` classes no full grid is readable: the most confused classes are shown and the
rest summed into one "other" row and column.
"""

from __future__ import annotations

from typing import Sequence

import torch
from matplotlib.figure import Figure

MAX_GRID_CLASSES = 30
"""Up to this many classes the confusion matrix shows every class; above, the most confused ones + "other"."""
CONFUSED_CLASSES = 20


def confused_classes(confusion: torch.Tensor, top: int = CONFUSED_CLASSES) -> list[int]:
    """Indices of the ``top`` classes with the most errors, as true class (row) plus as prediction (column)."""
    off = confusion.clone()
    off.fill_diagonal_(0)
    errors = off.sum(dim=0) + off.sum(dim=1)
    return sorted(errors.topk(min(top, len(errors))).indices.tolist())


def reduced_confusion(confusion: torch.Tensor, keep: Sequence[int]) -> torch.Tensor:
    """The rows/columns of ``keep`` plus one last "other" row and column summing every other class."""
    n = confusion.shape[0]
    kept = set(keep)
    rest = [i for i in range(n) if i not in kept]
    groups = [[i] for i in keep] + [rest]
    rows = torch.stack([confusion[g].sum(dim=0) for g in groups])  # (k+1, n)
    return torch.stack([rows[:, g].sum(dim=1) for g in groups], dim=1)  # (k+1, k+1)


def draw_matrix(ax, matrix: torch.Tensor, labels: Sequence[str], title: str, value_format: str,
                 aggregated: bool = False) -> None:
    """One confusion matrix on ``ax``: rows true, columns predicted, values written while legible."""
    values = matrix.double().numpy()
    # The other-vs-other cell dwarfs everything in an aggregated matrix: scale the colours to the rest.
    scale = values[:-1, :].max(initial=0) if aggregated else values.max(initial=0)
    scale = max(scale, values[:, :-1].max(initial=0)) if aggregated else scale
    image = ax.imshow(values, cmap="Blues", vmin=0, vmax=scale or None)
    ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    k = len(labels)
    ax.set_xticks(range(k), labels, rotation=90, fontsize="small")
    ax.set_yticks(range(k), labels, fontsize="small")
    if k <= 20:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, format(values[i, j], value_format), ha="center", va="center",
                        fontsize="medium" if k <= 8 else "x-small",
                        color="white" if values[i, j] > scale / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)


def confusion_matrix_figure(confusion: torch.Tensor, class_names: Sequence[str]) -> Figure:
    """The counts matrix of one validation (TensorBoard's image); beyond 30 classes, the most confused + other."""
    confusion = confusion.cpu().long()
    n = len(class_names)
    aggregated = n > MAX_GRID_CLASSES
    keep = confused_classes(confusion) if aggregated else list(range(n))
    matrix = reduced_confusion(confusion, keep) if aggregated else confusion
    labels = [class_names[i] for i in keep] + ([f"other ({n - len(keep)})"] if aggregated else [])
    side = min(max(4.0, 1.5 + 0.45 * len(labels)), 14.0)
    figure = Figure(figsize=(side + 1.0, side), dpi=100)
    draw_matrix(figure.add_subplot(), matrix, labels, "counts", ".0f", aggregated)
    figure.tight_layout()
    return figure
