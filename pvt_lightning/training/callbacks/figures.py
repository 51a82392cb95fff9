"""Figures drawn from validation results for TensorBoard: the confusion matrix."""

from __future__ import annotations

from typing import Sequence

import torch
from matplotlib.figure import Figure


def confusion_matrix_figure(confusion: torch.Tensor, class_names: Sequence[str]) -> Figure:
    """Rows are true classes, columns predicted; counts written in the cells while they stay legible."""
    num_classes = len(class_names)
    side = min(2 + 0.5 * num_classes, 20)
    figure = Figure(figsize=(side, side), dpi=100)
    ax = figure.add_subplot()
    counts = confusion.cpu().numpy()
    ax.imshow(counts, cmap="Blues")
    if num_classes <= 50:
        ax.set_xticks(range(num_classes), class_names, rotation=90)
        ax.set_yticks(range(num_classes), class_names)
    if num_classes <= 20:
        threshold = counts.max() / 2
        for i in range(num_classes):
            for j in range(num_classes):
                ax.text(j, i, str(counts[i, j]), ha="center", va="center",
                        color="white" if counts[i, j] > threshold else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    figure.tight_layout()
    return figure
