"""Classification losses: cross-entropy or focal, on hard or soft (MixUp/CutMix) targets, optionally class-weighted."""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("ce", "focal")
"""Choices of ``ImageClassifier(loss=...)`` (``--loss``)."""


def classification_loss(logits: torch.Tensor, targets: torch.Tensor, *, label_smoothing: float = 0.0,
                        class_weight: torch.Tensor | None = None, gamma: float = 0.0) -> torch.Tensor:
    """Mean over the batch of ``sum_c w_c q_c (1 - p_c)^gamma (-log p_c)``.

    ``q`` is the target distribution: one-hot for class indices (B,), or MixUp/CutMix's soft targets
    (B, C), then label-smoothed, ``q = (1 - eps) q + eps / C``; ``p = softmax(logits)``. ``gamma = 0``
    is cross-entropy (torch's soft-target form; with hard targets and no weights exactly
    ``F.cross_entropy``); ``gamma > 0`` is the focal loss (Lin et al. 2017), which for a one-hot ``q``
    is ``-w_y (1 - p_y)^gamma log p_y`` and for a soft ``q`` puts the focal factor on every class it
    covers. ``w`` are per-class weights (all 1 if None). Dividing by B, not by the summed weights, keeps
    the hard- and soft-target cases one formula; balanced weights average 1, so the scale is unchanged.
    """
    num_classes = logits.shape[-1]
    if targets.ndim == 1:
        targets = F.one_hot(targets, num_classes).to(logits.dtype)
    if gamma == 0:
        return F.cross_entropy(logits, targets, weight=class_weight, label_smoothing=label_smoothing)
    log_probs = F.log_softmax(logits.float(), dim=-1)  # (B, C)
    targets = targets.float() * (1.0 - label_smoothing) + label_smoothing / num_classes
    focal = (1.0 - log_probs.exp()).clamp(min=0.0).pow(gamma)
    per_class = -targets * focal * log_probs
    if class_weight is not None:
        per_class = per_class * class_weight.float()
    return per_class.sum(dim=-1).mean().to(logits.dtype)
