"""ImageClassifier: a PVTv2 (or ResNet-50) model, its loss, optimiser, schedule and metrics.

Fine-tuning controls live here as optimiser parameter groups and a schedule per group:
``layer_decay`` (each layer's lr is ``layer_decay ** (distance from the head)`` of the head's),
``head_lr_scale`` (the classifier head's lr multiplier), and ``freeze_backbone_epochs`` (only the
head learns at first; the backbone's gradients are dropped and its lr held at 0, then it warms up
like a fresh start). Losses: cross-entropy or focal, optionally class-weighted (``classification_loss``).
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score, MulticlassPrecision, MulticlassRecall
from torchvision.transforms import v2

from pvt_lightning.models import create_model, load_pretrained, measure_complexity
from pvt_lightning.models.registry import DEFAULT_DROP_PATH, canonical_name

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
        warmup_lr: float | None = None,
        min_lr: float | None = None,
        drop_path: float | None = None,
        label_smoothing: float = 0.1,
        mixup: float = 0.0,
        cutmix: float = 0.0,
        linear_sra: bool | None = None,
        pretrained: str | None = None,
        grad_checkpointing: bool = False,
        layer_decay: float | None = None,
        head_lr_scale: float = 1.0,
        freeze_backbone_epochs: int = 0,
        class_weights: Sequence[float] | None = None,
        loss: str = "ce",
        focal_gamma: float = 2.0,
    ):
        """``warmup_lr``/``min_lr``: absolute start and end of the schedule (default: 0.001x and 0.01x ``lr``, the
        official 1e-6 and 1e-5 at its total batch of 1024); ``class_weights``: one loss weight per class."""
        super().__init__()
        variant = canonical_name(variant)
        if drop_path is None:
            drop_path = DEFAULT_DROP_PATH[variant]
        class_names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
        if len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names given for num_classes={num_classes}")
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        if class_weights is not None:
            class_weights = [float(w) for w in class_weights]
            if len(class_weights) != num_classes:
                raise ValueError(f"{len(class_weights)} class weights given for num_classes={num_classes}")
        if layer_decay is not None and not 0 < layer_decay <= 1:
            raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
        # Everything here is plain Python data, so checkpoints load with weights_only=True.
        self.save_hyperparameters({
            "variant": variant, "num_classes": num_classes, "class_names": class_names, "img_size": list(img_size),
            "lr": lr, "weight_decay": weight_decay, "warmup_epochs": warmup_epochs, "warmup_lr": warmup_lr,
            "min_lr": min_lr, "drop_path": drop_path, "label_smoothing": label_smoothing, "mixup": mixup,
            "cutmix": cutmix, "linear_sra": linear_sra, "pretrained": None if pretrained is None else str(pretrained),
            "grad_checkpointing": grad_checkpointing, "layer_decay": layer_decay, "head_lr_scale": head_lr_scale,
            "freeze_backbone_epochs": freeze_backbone_epochs, "class_weights": class_weights, "loss": loss,
            "focal_gamma": focal_gamma,
        })
        self.class_names = class_names
        self.model = create_model(variant, num_classes, linear_sra=linear_sra, drop_path_rate=drop_path)
        if pretrained is not None and load_pretrained(self.model, pretrained):
            init_new_head(classifier_head(self.model))
        if grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        self.mix = self._build_mix(num_classes, mixup, cutmix)
        # Not in the state dict: the hyper-parameters rebuild it, and older checkpoints load unchanged.
        self.register_buffer("class_weight", None if class_weights is None else torch.tensor(class_weights),
                             persistent=False)
        self.frozen_steps = 0  # optimizer steps during which only the head learns; set by configure_optimizers
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
        hp = self.hparams
        loss = classification_loss(logits, targets, label_smoothing=hp.label_smoothing, class_weight=self.class_weight,
                                   gamma=hp.focal_gamma if hp.loss == "focal" else 0.0)
        # One value per epoch in TensorBoard (tags line up across runs); the step loss goes to the progress bar.
        self.log("train/loss", loss, on_step=False, on_epoch=True, sync_dist=True, batch_size=images.shape[0])
        self.log("train/lr", self.scheduled_lr(), on_step=False, on_epoch=True, sync_dist=True)
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
        """AdamW, one parameter group per (layer rate, weight decay); warm-up + cosine per group, stepped every step.

        No weight decay on norms and biases. The head's groups follow the plain schedule; while the
        backbone is frozen its groups stay at 0 and warm up from the step it is released.
        """
        hp = self.hparams
        groups = param_groups(self.model, hp.lr, hp.weight_decay, hp.layer_decay, hp.head_lr_scale,
                              split_head=hp.freeze_backbone_epochs > 0)
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, eps=1e-8)
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        steps_per_epoch = total_steps / max(1, self.trainer.max_epochs or 1)
        warmup_steps = min(int(hp.warmup_epochs * steps_per_epoch), total_steps - 1)
        self.frozen_steps = min(round(hp.freeze_backbone_epochs * steps_per_epoch), total_steps)
        warmup_factor = min(1.0, (hp.warmup_lr if hp.warmup_lr is not None else 1e-3 * hp.lr) / hp.lr)
        min_factor = min(1.0, (hp.min_lr if hp.min_lr is not None else 1e-2 * hp.lr) / hp.lr)
        schedules = [WarmupCosine(warmup_steps, total_steps, warmup_factor, min_factor,
                                  start_step=0 if group["head"] else self.frozen_steps) for group in groups]
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, schedules)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_before_optimizer_step(self, optimizer) -> None:
        """While the backbone is frozen, drop its gradients: AdamW skips parameters without one (no update,
        no weight decay, no moment), so it starts fresh when released. Gradients are still computed, so
        under DDP every parameter stays in the all-reduce (a parameter without ``requires_grad`` at
        wrapping time would silently fall out of it after unfreezing)."""
        if self.trainer.global_step < self.frozen_steps:
            for group in optimizer.param_groups:
                if not group["head"]:
                    for param in group["params"]:
                        param.grad = None

    def scheduled_lr(self) -> float:
        """The schedule's current lr at scale 1 (the head's rate divided by ``head_lr_scale``)."""
        group = next(g for g in self.optimizers().param_groups if g["head"] or self.frozen_steps == 0)
        return group["lr"] / group["lr_scale"]


LOSSES = ("ce", "focal")


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


NEW_HEAD_STD = 2e-5
"""Weights of a head replaced for fine-tuning start this small (MAE's fine-tuning init) and the biases at 0."""


def init_new_head(head: nn.Module) -> None:
    """Near-zero start for a head on pretrained features: every class starts equally likely, and the first
    steps move it along the features. A std-0.02 random head (the from-scratch init) instead starts
    confidently wrong, and at fine-tuning learning rates it takes hundreds of steps to undo."""
    if isinstance(head, nn.Linear):
        nn.init.trunc_normal_(head.weight, std=NEW_HEAD_STD)
        nn.init.zeros_(head.bias)


def classifier_head(model: nn.Module) -> nn.Module:
    """The classification head: ``get_classifier()`` (timm's interface) where the model has it."""
    if hasattr(model, "get_classifier"):
        return model.get_classifier()
    return model.head if hasattr(model, "head") else model.fc


def layers_input_to_output(model: nn.Module) -> list[list[nn.Module]]:
    """The model's parameterised parts from input to head; a part's index is its layer id.

    PVTv2: [stage-1 patch embedding], then one entry per block (a stage's downsampling patch
    embedding joins its first block, its final norm its last block), then [head]: depth + 2 layers.
    ResNet: [stem conv + BN], one entry per bottleneck block, [fc].
    """
    head = classifier_head(model)
    if hasattr(model, "stages"):
        layers = [[model.stages[0].patch_embed]]
        for index, stage in enumerate(model.stages):
            for j, block in enumerate(stage.blocks):
                layer = [block]
                if j == 0 and index > 0:
                    layer.insert(0, stage.patch_embed)
                if j == len(stage.blocks) - 1:
                    layer.append(stage.norm)
                layers.append(layer)
    elif hasattr(model, "layer1"):
        layers = [[model.conv1, model.bn1]]
        layers += [[block] for name in ("layer1", "layer2", "layer3", "layer4") for block in getattr(model, name)]
    else:
        raise TypeError(f"layer-wise learning rates need a PVTv2 or ResNet model, got {type(model).__name__}")
    return layers + [[head]]


def layer_scales(model: nn.Module, layer_decay: float | None, head_lr_scale: float = 1.0
                 ) -> Iterator[tuple[int, float, bool, list[nn.Parameter]]]:
    """(layer id, lr scale, is head, parameters) per layer: ``layer_decay ** (head id - id)``, the head's times
    ``head_lr_scale``. Every parameter of the model is in exactly one layer."""
    layers = layers_input_to_output(model)
    head_id = len(layers) - 1
    seen: set[int] = set()
    for layer_id, modules in enumerate(layers):
        params = [p for module in modules for p in module.parameters()]
        seen.update(id(p) for p in params)
        scale = (layer_decay or 1.0) ** (head_id - layer_id)
        is_head = layer_id == head_id
        yield layer_id, scale * head_lr_scale if is_head else scale, is_head, params
    missing = [name for name, p in model.named_parameters() if id(p) not in seen]
    if missing:
        raise ValueError(f"parameters outside every layer (update layers_input_to_output): {', '.join(missing[:5])}")


def param_groups(model: nn.Module, lr: float, weight_decay: float, layer_decay: float | None = None,
                 head_lr_scale: float = 1.0, split_head: bool = False) -> list[dict]:
    """AdamW parameter groups: no weight decay on norms and biases (ndim <= 1), lr scaled per layer.

    Parameters sharing (lr scale, weight decay, head or not when ``split_head``) share a group, so
    without layer decay there are two groups (decay, no decay) as in the official recipe. Each group
    carries ``lr_scale``, ``layer`` (the lowest layer id in it) and ``head``.
    """
    groups: dict[tuple, dict] = {}
    for layer_id, scale, is_head, params in layer_scales(model, layer_decay, head_lr_scale):
        for param in params:
            no_decay = param.ndim <= 1
            head = is_head and split_head
            key = (scale, no_decay, head)
            if key not in groups:
                groups[key] = {"params": [], "weight_decay": 0.0 if no_decay else weight_decay, "lr": lr * scale,
                               "lr_scale": scale, "layer": layer_id, "head": head or not split_head}
            groups[key]["params"].append(param)
    return sorted(groups.values(), key=lambda g: (g["layer"], g["weight_decay"] == 0.0))


class WarmupCosine:
    """LR multiplier for LambdaLR: 0 before ``start_step``, then linear from ``warmup_factor`` to 1 over
    ``warmup_steps``, then cosine down to ``min_factor`` at ``total_steps``.

    A small class rather than a closure so the scheduler state in checkpoints is plain numbers.
    """

    def __init__(self, warmup_steps: int, total_steps: int, warmup_factor: float, min_factor: float,
                 start_step: int = 0):
        self.warmup_steps, self.total_steps = warmup_steps, total_steps
        self.warmup_factor, self.min_factor = warmup_factor, min_factor
        self.start_step = start_step

    def __call__(self, step: int) -> float:
        if step < self.start_step:
            return 0.0
        step, total = step - self.start_step, self.total_steps - self.start_step
        warmup = min(self.warmup_steps, max(0, total - 1))
        if step < warmup:
            return self.warmup_factor + (1.0 - self.warmup_factor) * step / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return self.min_factor + (1.0 - self.min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))
