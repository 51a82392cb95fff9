"""Label-issue candidates: images whose given class the model's probabilities contradict confidently.

Confident learning (Northcutt, Jiang and Chuang, JAIR 2021), written from the paper: the threshold of
class j is the mean probability of j over the images labelled j (t_j, per split: in-sample and held-out
probabilities are not on one scale); an image's confident class is the
most probable class j with p_j >= t_j; an image whose confident class exists and differs from its given
label is a candidate (an off-diagonal entry of the confident joint). Scores, higher = more suspect:

- ``normalized_margin`` (default): max_{k != y} p_k - p_y, in [-1, 1] (the paper's normalised margin,
  negated); candidates are the images whose most probable class is not y (score > 0);
- ``self_confidence``: 1 - p_y, same candidates;
- ``confident_learning``: the candidates of confident learning above, ranked by the normalised margin.

Probabilities must come from a model that did not train on the image to be trustworthy: for held-out
splits the checkpoint's are; for the training split ``out_of_fold_probs`` gives K-fold probabilities of
linear heads trained on the frozen embeddings (the backbone still saw those images: they are
out-of-sample for the head only, and weaker than a full K-fold retraining, which costs K trainings).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

LABEL_SCORES = ("normalized_margin", "self_confidence", "confident_learning")
LABEL_COLUMNS = ("path", "split", "given_label", "suggested_label", "score")


@dataclass(frozen=True)
class LabelIssue:
    """Record ``row`` (an index into the probabilities' rows), the class suggested instead, its score."""

    row: int
    suggested: int
    score: float


def class_thresholds(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """t_j: the mean of p_j over the images labelled j; +inf for a class no image is labelled with."""
    num_classes = probs.shape[1]
    counts = torch.bincount(labels, minlength=num_classes).double()
    sums = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, labels, probs.double().gather(
        1, labels[:, None]).flatten())
    return torch.where(counts > 0, sums / counts.clamp(min=1), torch.full_like(sums, torch.inf))


def confident_classes(probs: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Per image the most probable class among those at or above their threshold; -1 where there is none."""
    above = probs.double() >= thresholds[None, :]
    masked = torch.where(above, probs.double(), torch.full_like(probs, -1.0, dtype=torch.float64))
    best = masked.argmax(dim=1)
    return torch.where(above.any(dim=1), best, torch.full_like(best, -1))


def label_scores(probs: torch.Tensor, labels: torch.Tensor, method: str = "normalized_margin") -> torch.Tensor:
    """How suspect each given label is (see the module docstring), higher = more suspect; ``confident_learning``
    ranks by the normalised margin."""
    if method not in LABEL_SCORES:
        raise ValueError(f"label score must be one of {LABEL_SCORES}, got {method!r}")
    given = probs.gather(1, labels[:, None]).flatten()
    if method == "self_confidence":
        return 1.0 - given
    others = probs.scatter(1, labels[:, None], -1.0).max(dim=1).values
    return others - given


def find_label_issues(probs: torch.Tensor, labels: torch.Tensor, method: str = "normalized_margin",
                      groups: torch.Tensor | None = None) -> list[LabelIssue]:
    """Candidates, most suspect first: images whose most probable class is not their label, suggested that class
    (``normalized_margin``, ``self_confidence``), or confident learning's (``confident_learning``: the confident
    class differs from the label; it is the suggestion).

    ``groups``: one id per row (e.g. the split); confident learning's thresholds are computed within each group,
    since in-sample and held-out probabilities are not on one scale (a model is surer of what it trained on).
    """
    probs, labels = probs.float(), labels.long()
    if len(labels) == 0:
        return []
    suggested = probs.argmax(dim=1)
    if method == "confident_learning":
        groups = torch.zeros_like(labels) if groups is None else groups.long()
        suggested = torch.full_like(labels, -1)
        for group in groups.unique():
            members = groups == group
            suggested[members] = confident_classes(probs[members], class_thresholds(probs[members], labels[members]))
    scores = label_scores(probs, labels, method)
    rows = torch.nonzero((suggested >= 0) & (suggested != labels)).flatten()
    rows = rows[scores[rows].argsort(descending=True, stable=True)]
    return [LabelIssue(int(r), int(suggested[r]), float(scores[r])) for r in rows]


def stratified_folds(labels: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """A fold number 0..k-1 per image, each class dealt round-robin over the folds in a seeded random order."""
    generator = torch.Generator().manual_seed(seed)
    folds = torch.empty_like(labels)
    for c in labels.unique().tolist():
        members = torch.nonzero(labels == c).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        folds[members] = torch.arange(len(members)) % k
    return folds


def fit_linear_head(features: torch.Tensor, labels: torch.Tensor, num_classes: int, weight_decay: float = 1e-4,
                    steps: int = 200) -> torch.nn.Linear:
    """Multinomial logistic regression on ``features`` (N, D): full-batch L-BFGS with an L2 penalty on the weights."""
    head = torch.nn.Linear(features.shape[1], num_classes).to(features.device)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    optimizer = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(head(features), labels) + weight_decay * head.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return head


def out_of_fold_probs(features: torch.Tensor, labels: torch.Tensor, num_classes: int, k: int, seed: int = 0,
                      device: str | torch.device = "cpu") -> torch.Tensor:
    """Probabilities (N, C) of each image from a linear head fitted on the other k-1 folds (``stratified_folds``)."""
    if k < 2:
        raise ValueError(f"k-fold needs k >= 2, got {k}")
    features, labels = features.to(device).float(), labels.to(device).long()
    folds = stratified_folds(labels.cpu(), k, seed).to(device)
    probs = torch.zeros(len(labels), num_classes)
    for fold in range(k):
        held = folds == fold
        if held.all() or not held.any():
            continue
        head = fit_linear_head(features[~held], labels[~held], num_classes)
        with torch.no_grad():
            probs[held.cpu()] = torch.softmax(head(features[held]), dim=1).cpu()
    return probs
