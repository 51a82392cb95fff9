"""PNG figures of an evaluation: confusion matrix, PR curves, reliability diagram; readable from 2 to 1000 classes.

Past a few dozen classes no full grid or one-curve-per-class plot is readable, so the figures show the
classes that matter most (those with the most confusions, the worst average precision) and aggregate
the rest. Figures are drawn with matplotlib's Agg canvas (no display needed) and returned as PNG bytes.
"""

from __future__ import annotations

import io
import math
from typing import Sequence

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torchmetrics.classification import BinaryPrecisionRecallCurve, MulticlassAveragePrecision

from pvt_lightning.evaluation.calibration import ECE_BINS, expected_calibration_error, reliability_bins
from pvt_lightning.training.callbacks.figures import MAX_GRID_CLASSES, confused_classes, draw_matrix, reduced_confusion

MAX_PR_CURVES = 10
"""Up to this many classes one PR curve each; above, the worst ones by AP next to a histogram of all APs."""
DPI = 100


def png_bytes(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_png(buffer)
    return buffer.getvalue()


def confusion_matrix_png(confusion: torch.Tensor, class_names: Sequence[str]) -> bytes:
    """Counts and row-normalised (recall on the diagonal) side by side; rows true, columns predicted."""
    confusion = confusion.cpu().long()
    n = len(class_names)
    aggregated = n > MAX_GRID_CLASSES
    if aggregated:
        keep = confused_classes(confusion)
        matrix = reduced_confusion(confusion, keep)
        labels = [class_names[i] for i in keep] + [f"other ({n - len(keep)})"]
        note = f"\n{len(keep)} of {n} classes with the most errors; 'other' sums the rest"
    else:
        matrix, labels, note = confusion, list(class_names), ""
    # Each row over its true class's full support, so a row's share going to "other" shows too.
    normalised = matrix.double() / matrix.sum(dim=1, keepdim=True).clamp(min=1).double()
    side = min(max(4.0, 1.5 + 0.45 * len(labels)), 14.0)
    figure = Figure(figsize=(2 * side + 1.5, side + 1.0), dpi=DPI)
    draw_matrix(figure.add_subplot(1, 2, 1), matrix, labels, "counts" + note, ".0f", aggregated)
    draw_matrix(figure.add_subplot(1, 2, 2), normalised, labels, "row-normalised (recall on the diagonal)", ".2f",
                 aggregated)
    figure.tight_layout()
    return png_bytes(figure)


def pr_curves_png(probs: torch.Tensor, targets: torch.Tensor, class_names: Sequence[str],
                  ap: torch.Tensor | None = None) -> bytes:
    """One-vs-rest PR curve per class (multi-label: ``targets`` (N, C), each class's own column) with its AP in the legend; above ``MAX_PR_CURVES`` classes, the worst
    ones by AP and a histogram of every class's AP. ``ap``: the per-class APs if already computed (C,)."""
    n = len(class_names)
    ap = MulticlassAveragePrecision(n, average=None)(probs, targets) if ap is None else ap
    ranked = [i for i in ap.argsort().tolist() if not math.isnan(ap[i])]  # worst first; NaN: class absent
    shown = ranked[:MAX_PR_CURVES] if n > MAX_PR_CURVES else [i for i in range(n) if i in set(ranked)]
    aggregate = n > MAX_PR_CURVES
    figure = Figure(figsize=(14 if aggregate else 7, 6), dpi=DPI)
    ax = figure.add_subplot(1, 2 if aggregate else 1, 1)
    for i in shown:
        positive = targets[:, i] if targets.ndim == 2 else targets == i  # multi-label: the class's own column
        precision, recall, _ = BinaryPrecisionRecallCurve()(probs[:, i], positive.long())
        ax.step(recall.numpy(), precision.numpy(), where="post", label=f"{class_names[i]} (AP {ap[i]:.3f})")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1.01), ylim=(0, 1.02))
    macro = ap[ranked].mean().item() if ranked else float("nan")
    ax.set_title(f"worst {len(shown)} of {n} classes by AP (macro AP {macro:.3f})" if aggregate
                 else f"precision-recall per class (macro AP {macro:.3f})")
    ax.grid(alpha=0.3)
    if shown:
        ax.legend(fontsize="small", loc="lower left")
    if aggregate:
        hist = figure.add_subplot(1, 2, 2)
        hist.hist(ap[ranked].numpy(), bins=20, range=(0, 1), color="tab:blue")
        hist.set(xlabel="average precision", ylabel="classes", title=f"AP of all {len(ranked)} classes")
        hist.grid(alpha=0.3)
    figure.tight_layout()
    return png_bytes(figure)


def reliability_png(probs: torch.Tensor, targets: torch.Tensor, calibrated: torch.Tensor | None = None,
                    temperature: float | None = None) -> bytes:
    """Reliability diagram (accuracy against confidence per bin, ECE in the title), before and after calibration."""
    panels = [("uncalibrated", probs)]
    if calibrated is not None:
        panels.append((f"temperature {temperature:.3f}" if temperature else "calibrated", calibrated))
    figure = Figure(figsize=(6 * len(panels), 6), dpi=DPI)
    width = 1.0 / ECE_BINS
    centres = [(b + 0.5) * width for b in range(ECE_BINS)]
    for k, (name, p) in enumerate(panels):
        ax = figure.add_subplot(1, len(panels), k + 1)
        bins = reliability_bins(p, targets)
        filled = [b for b in range(ECE_BINS) if bins["count"][b] > 0]
        ax.bar([centres[b] for b in filled], [bins["accuracy"][b] for b in filled], width=width, edgecolor="black",
               color="tab:blue", alpha=0.8, label="accuracy")
        ax.bar([centres[b] for b in filled], [bins["confidence"][b] - bins["accuracy"][b] for b in filled],
               bottom=[bins["accuracy"][b] for b in filled], width=width, color="tab:red", alpha=0.3, hatch="//",
               label="gap to confidence")
        ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top-1 probability)", ylabel="accuracy",
               title=f"{name}: ECE {expected_calibration_error(p, targets):.4f}")
        ax.legend(loc="upper left", fontsize="small")
        ax.grid(alpha=0.3)
    figure.tight_layout()
    return png_bytes(figure)
