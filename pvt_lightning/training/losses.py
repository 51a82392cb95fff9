"""Classification losses: cross-entropy or focal, on hard or soft (MixUp/CutMix) targets, optionally class-weighted;
multi-label: binary cross-entropy or the asymmetric loss on sigmoid outputs (``multilabel_loss``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

SINGLE_LABEL_LOSSES = ("ce", "focal")
MULTILABEL_LOSSES = ("bce", "asl")
LOSSES = SINGLE_LABEL_LOSSES + MULTILABEL_LOSSES
"""Choices of ``ImageClassifier(loss=...)`` (``--loss``): ce/focal on softmax (single-label), bce/asl on one sigmoid
per class (multi-label)."""
ASL_DEFAULTS = {"asl_gamma_neg": 4.0, "asl_gamma_pos": 0.0, "asl_clip": 0.05}
"""The asymmetric loss's defaults: Ridnik et al. 2021, the paper's recommended (gamma-, gamma+, m) = (4, 0, 0.05)."""


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


def multilabel_loss(logits: torch.Tensor, targets: torch.Tensor, *, pos_weight: torch.Tensor | None = None,
                    gamma_neg: float = 0.0, gamma_pos: float = 0.0, clip: float = 0.0) -> torch.Tensor:
    """Mean over the batch of ``sum_c L_c`` on one sigmoid per class, ``p = sigmoid(logits)``, targets ``y`` in
    [0, 1] (multi-hot, or MixUp/CutMix-mixed label vectors), (B, C).

    The asymmetric loss (ASL, Ridnik et al. 2021, "Asymmetric Loss For Multi-Label Classification", eq. 2-4)::

        L_c = -w_c y (1 - p)^gamma_pos log(p) - (1 - y) p_m^gamma_neg log(1 - p_m),   p_m = max(p - clip, 0)

    The negative term is focused harder than the positive one (gamma_neg > gamma_pos) and the probability shift
    ``clip`` discards easy negatives (p < clip) outright: against the many negatives of a multi-label image, the
    few positives keep their gradient. With gamma_neg = gamma_pos = clip = 0 it is binary cross-entropy, computed
    then as ``F.binary_cross_entropy_with_logits`` (numerically stable). ``pos_weight`` (``w``, (C,)): weights of
    the positive term per class (``--class-weights``), as torch's BCE ``pos_weight``. Summing over classes (not
    averaging) keeps a per-image scale, as the paper's loss and the softmax losses have.
    """
    targets = targets.to(logits.dtype)
    if gamma_neg == 0 and gamma_pos == 0 and clip == 0:
        per_class = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none",
                                                       pos_weight=None if pos_weight is None else pos_weight.float())
        return per_class.sum(dim=-1).mean().to(logits.dtype)
    logits, targets = logits.float(), targets.float()
    p = torch.sigmoid(logits)
    log_p = F.logsigmoid(logits)
    positive = (1.0 - p).pow(gamma_pos) * log_p if gamma_pos else log_p
    p_m = (p - clip).clamp(min=0.0) if clip > 0 else p
    log_not_p_m = torch.log((1.0 - p_m).clamp(min=1e-8)) if clip > 0 else F.logsigmoid(-logits)
    negative = p_m.pow(gamma_neg) * log_not_p_m if gamma_neg else log_not_p_m
    if pos_weight is not None:
        positive = positive * pos_weight.float()
    per_class = -targets * positive - (1.0 - targets) * negative
    return per_class.sum(dim=-1).mean()
