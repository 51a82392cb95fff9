"""Collecting one split's logits through ``trainer.predict``: the prediction module and the gathering of its outputs."""

from __future__ import annotations

from typing import Any, Sequence

import lightning as L
import torch


class LogitCollector(L.LightningModule):
    """A trained classifier for ``trainer.predict``: batches ``(images, paths)`` -> logits and paths.

    With ``tta`` the logits are the mean of those of the images and of their horizontal flips. Logits,
    not softmax probabilities, are averaged: temperature scaling, log-loss and thresholds then apply to
    the averaged logits exactly as to a single pass.
    """

    def __init__(self, classifier: torch.nn.Module, tta: bool = False):
        super().__init__()
        self.classifier = classifier
        self.tta = tta

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(images)  # (B, C)
        if self.tta:
            logits = (logits + self.classifier(images.flip(-1))) / 2
        return logits

    def predict_step(self, batch, batch_idx: int) -> dict[str, Any] | None:
        if batch is None:  # every image of the batch was unreadable (skipped by the data module)
            return None
        images, paths = batch
        return {"logits": self(images).float().cpu(), "paths": list(paths)}


def gather_predictions(outputs: Sequence[dict[str, Any]], num_classes: int) -> tuple[torch.Tensor, list[str]]:
    """``trainer.predict``'s list of batch outputs -> logits (N, C) and the N paths (empty batches allowed)."""
    outputs = [out for out in outputs if out is not None and len(out["paths"])]
    logits = [out["logits"] for out in outputs]
    paths = [path for out in outputs for path in out["paths"]]
    return (torch.cat(logits) if logits else torch.empty(0, num_classes)), paths
