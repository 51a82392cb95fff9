"""Calibration of a classifier's logits: temperature-scaled probabilities, log-loss, ECE, temperature fitting.

Scores, thresholds and decisions elsewhere in ``evaluation`` are always on the *calibrated* probabilities
``softmax(logits / T)`` (T = 1 when not calibrated): temperature changes how the classes rank against
each other per image, so thresholds chosen at one T do not carry to another. Log-loss, which
torchmetrics lacks, is the cross-entropy of the logits.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassCalibrationError

ECE_BINS = 15


def calibrated_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """softmax(logits / T): (N, C) float32 probabilities."""
    return (logits.float() / temperature).softmax(dim=-1)


def log_loss(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true class (nats); float64, 4096 rows at a time (no float64 copy of
    every logit)."""
    total = sum(F.cross_entropy(logits[i:i + 4096].double() / temperature, targets[i:i + 4096], reduction="sum")
                .item() for i in range(0, len(targets), 4096))
    return total / len(targets) if len(targets) else float("nan")


def expected_calibration_error(probs: torch.Tensor, targets: torch.Tensor) -> float:
    """Top-label ECE, 15 equal-width confidence bins, L1 (torchmetrics' MulticlassCalibrationError)."""
    metric = MulticlassCalibrationError(probs.shape[1], n_bins=ECE_BINS, norm="l1")
    for i in range(0, len(targets), 4096):  # its state is per image (confidence, accuracy), not per score
        metric.update(probs[i:i + 4096], targets[i:i + 4096])
    return metric.compute().item()


def reliability_bins(probs: torch.Tensor, targets: torch.Tensor, bins: int = ECE_BINS) -> dict[str, list[float]]:
    """Per equal-width bin of top-label confidence: mean confidence, accuracy and image count."""
    confidence, predicted = probs.max(dim=-1)
    correct = (predicted == targets).double()
    index = (confidence.double() * bins).ceil().long().clamp(1, bins) - 1  # bins are (lo, hi]
    count = torch.bincount(index, minlength=bins).double()
    mean_conf = torch.bincount(index, confidence.double(), minlength=bins) / count.clamp(min=1)
    accuracy = torch.bincount(index, correct, minlength=bins) / count.clamp(min=1)
    return {"confidence": mean_conf.tolist(), "accuracy": accuracy.tolist(), "count": count.tolist()}


def minimise_over_temperature(loss_at, lr: float = 1.0, max_iter: int = 100) -> float:
    """The T > 0 minimising ``loss_at(T)`` (a float64 scalar tensor), by LBFGS on log T (so T stays positive)."""
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=lr, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = loss_at(log_t.exp())
        loss.backward()
        return loss

    optimizer.step(closure)
    return log_t.exp().item()


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, max_iter: int = 100) -> float:
    """The one scalar T minimising NLL(softmax(logits / T)), by LBFGS on log T (so T stays positive)."""
    logits = logits.detach().double()
    temperature = minimise_over_temperature(lambda t: F.cross_entropy(logits / t, targets), lr=1.0,
                                            max_iter=max_iter)
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
