"""ImageClassifier: a PVTv2 (or ResNet-50) model, its loss, optimiser, schedule and metrics."""

from __future__ import annotations

import math
from typing import Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score, MulticlassPrecision, MulticlassRecall
from torchvision.transforms import v2

from .models import create_model, measure_complexity
from .models.registry import DEFAULT_DROP_PATH, canonical_name

BASE_LR = 5e-4
"""Official recipe: lr 5e-4 per 512 images of total batch (scaled linearly)."""


def scaled_lr(total_batch_size: int, base_lr: float = BASE_LR) -> float:
    return base_lr * total_batch_size / 512


def classification_metrics(num_classes: int, prefix: str) -> MetricCollection:
    """Top-1/top-5 accuracy and macro precision/recall/F1, synchronised across DDP ranks."""
    return MetricCollection(
        {
            "acc": MulticlassAccuracy(num_classes, top_k=1, average="micro"),
            "acc5": MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro"),
            "precision": MulticlassPrecision(num_classes, average="macro"),
            "recall": MulticlassRecall(num_classes, average="macro"),
            "f1": MulticlassF1Score(num_classes, average="macro"),
        },
        prefix=prefix,
        # Shared compute groups go stale when Lightning logs the members one by one (epoch values
        # would come from the last batch); the saving is negligible next to the model.
        compute_groups=False,
    )


class ImageClassifier(L.LightningModule):
    """Image classification with a model from ``create_model``.

    Batches arrive as ``(images, targets)``: float NCHW images already normalised (the data
    module normalises on the device) and integer class indices.
    """

    def __init__(
        self,
        variant: str = "b0",
        num_classes: int = 1000,
        class_names: Sequence[str] | None = None,
        img_size: Sequence[int] = (224, 224),
        lr: float = BASE_LR,
        weight_decay: float = 0.05,
        warmup_epochs: float = 5.0,
        warmup_lr: float = 1e-6,
        min_lr: float = 1e-5,
        drop_path: float | None = None,
        label_smoothing: float = 0.1,
        mixup: float = 0.0,
        cutmix: float = 0.0,
        linear_sra: bool | None = None,
        pretrained: str | None = None,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        variant = canonical_name(variant)
        if drop_path is None:
            drop_path = DEFAULT_DROP_PATH[variant]
        class_names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
        if len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names given for num_classes={num_classes}")
        # Everything here is plain Python data, so checkpoints load with weights_only=True.
        self.save_hyperparameters({
            "variant": variant, "num_classes": num_classes, "class_names": class_names, "img_size": list(img_size),
            "lr": lr, "weight_decay": weight_decay, "warmup_epochs": warmup_epochs, "warmup_lr": warmup_lr,
            "min_lr": min_lr, "drop_path": drop_path, "label_smoothing": label_smoothing, "mixup": mixup,
            "cutmix": cutmix, "linear_sra": linear_sra, "pretrained": None if pretrained is None else str(pretrained),
            "grad_checkpointing": grad_checkpointing,
        })
        self.class_names = class_names
        self.model = create_model(variant, num_classes, pretrained=pretrained, linear_sra=linear_sra,
                                  drop_path_rate=drop_path)
        if grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        self.mix = self._build_mix(num_classes, mixup, cutmix)
        self.val_metrics = classification_metrics(num_classes, "val/")
        self.test_metrics = classification_metrics(num_classes, "test/")

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, map_location=None, hparams_file=None, strict=None, **kwargs):
        """Lightning's loader, with weights_only=True and without re-reading the ``pretrained`` file the run
        started from: the checkpoint holds every weight, and that file may have moved since."""
        kwargs.setdefault("pretrained", None)
        kwargs.setdefault("weights_only", True)
        return super().load_from_checkpoint(checkpoint_path, map_location, hparams_file, strict, **kwargs)

    @staticmethod
    def _build_mix(num_classes: int, mixup: float, cutmix: float) -> nn.Module | None:
        """Batch-level MixUp and/or CutMix (one of them per batch), producing soft targets."""
        choices = []
        if mixup > 0:
            choices.append(v2.MixUp(alpha=mixup, num_classes=num_classes))
        if cutmix > 0:
            choices.append(v2.CutMix(alpha=cutmix, num_classes=num_classes))
        if not choices:
            return None
        return choices[0] if len(choices) == 1 else v2.RandomChoice(choices)

    @property
    def linear_sra_enabled(self) -> bool:
        config = getattr(self.model, "config", None)
        return bool(config and config.linear_sra)

    def complexity(self):
        """Params (M) and GMACs at this run's input size."""
        return measure_complexity(self.model, tuple(self.hparams.img_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        images, targets = batch
        if self.mix is not None:
            images, targets = self.mix(images, targets)  # targets become (B, num_classes) probabilities
        logits = self(images)
        loss = F.cross_entropy(logits, targets, label_smoothing=self.hparams.label_smoothing)
        # One value per epoch in TensorBoard (tags line up across runs); the step loss goes to the progress bar.
        self.log("train/loss", loss, on_step=False, on_epoch=True, sync_dist=True, batch_size=images.shape[0])
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=False, on_epoch=True, sync_dist=True)
        self.log("loss", loss, on_step=True, prog_bar=True, logger=False)
        self._log_epoch_as_x_axis()
        return loss

    def _evaluate(self, batch, metrics: MetricCollection, stage: str):
        if batch is None:  # every image of the batch was unreadable and skipped (the data module's bad_images)
            return None
        images, targets = batch
        logits = self(images)
        loss = F.cross_entropy(logits, targets)
        metrics.update(logits, targets)
        self.log(f"{stage}/loss", loss, on_epoch=True, sync_dist=True, prog_bar=stage == "val", batch_size=len(targets))
        self.log_dict(metrics, on_epoch=True, prog_bar=False)
        self._log_epoch_as_x_axis()
        return {"loss": loss, "logits": logits.detach(), "target": targets}

    def _log_epoch_as_x_axis(self) -> None:
        """Lightning writes epoch-level scalars at the logged "step": the epoch, so runs line up in TensorBoard."""
        self.log("step", float(self.current_epoch), on_step=False, on_epoch=True, reduce_fx="max")

    def validation_step(self, batch, batch_idx):
        return self._evaluate(batch, self.val_metrics, "val")

    def test_step(self, batch, batch_idx):
        return self._evaluate(batch, self.test_metrics, "test")

    def predict_step(self, batch, batch_idx):
        if batch is None:  # every image of the batch was unreadable
            return None
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(images).softmax(dim=-1)

    def configure_optimizers(self):
        """AdamW without weight decay on norms and biases; warm-up + cosine, stepped every optimizer step."""
        decay, no_decay = [], []
        for param in self.model.parameters():
            if param.requires_grad:
                (no_decay if param.ndim <= 1 else decay).append(param)
        hp = self.hparams
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.lr, eps=1e-8,
        )
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        steps_per_epoch = total_steps / max(1, self.trainer.max_epochs or 1)
        warmup_steps = min(int(hp.warmup_epochs * steps_per_epoch), total_steps - 1)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            WarmupCosine(warmup_steps, total_steps, min(1.0, hp.warmup_lr / hp.lr), min(1.0, hp.min_lr / hp.lr)),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class WarmupCosine:
    """LR multiplier for LambdaLR: linear from ``warmup_factor`` to 1, then cosine down to ``min_factor``.

    A small class rather than a closure so the scheduler state in checkpoints is plain numbers.
    """

    def __init__(self, warmup_steps: int, total_steps: int, warmup_factor: float, min_factor: float):
        self.warmup_steps, self.total_steps = warmup_steps, total_steps
        self.warmup_factor, self.min_factor = warmup_factor, min_factor

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_factor + (1.0 - self.warmup_factor) * step / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_factor + (1.0 - self.min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))
