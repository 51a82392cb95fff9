"""ImageClassifier: a PVTv2 (or ResNet-50) model trained as a LightningModule: steps, metrics and their logging.

Its hyper-parameters (every constructor argument, saved in each checkpoint) include the preprocessing the
model expects (``preprocessing``). The loss is in ``losses.py``; parameter groups, layer-wise lr decay, the
frozen backbone's groups and the warm-up + cosine schedule in ``optim.py``; defaults come from the paper
recipe (``recipes.PAPER``) and the variant's record (``models/registry.py``). Logged tags: ``pvt_lightning.tags``.
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score, MulticlassPrecision, MulticlassRecall, \
    MultilabelAveragePrecision, MultilabelF1Score, MultilabelPrecision, MultilabelRecall
from torchvision.transforms import v2

from pvt_lightning import tags
from pvt_lightning.models import create_model, load_pretrained, measure_complexity
from pvt_lightning.models.registry import DEFAULT_IMG_SIZE, Preprocessing, variant_spec
from pvt_lightning.training.losses import LOSSES, MULTILABEL_LOSSES, classification_loss, multilabel_loss
from pvt_lightning.training.optim import WarmupCosine, classifier_head, init_new_head, param_groups, schedule_factors
from pvt_lightning.training.recipes import PAPER


def classification_metrics(num_classes: int, prefix: str) -> MetricCollection:
    """Top-1/top-5 accuracy and macro precision/recall/F1, synchronised across DDP ranks."""
    return MetricCollection(
        {
            tags.ACC: MulticlassAccuracy(num_classes, top_k=1, average="micro"),
            tags.ACC5: MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro"),
            tags.PRECISION: MulticlassPrecision(num_classes, average="macro"),
            tags.RECALL: MulticlassRecall(num_classes, average="macro"),
            tags.F1: MulticlassF1Score(num_classes, average="macro"),
        },
        prefix=prefix,
        # Shared compute groups go stale when Lightning logs the members one by one (epoch values
        # would come from the last batch); the saving is negligible next to the model.
        compute_groups=False,
    )


def multilabel_metrics(num_classes: int, prefix: str, threshold: float) -> MetricCollection:
    """Multi-label: macro precision/recall/F1 at ``threshold`` on each class's sigmoid, synchronised across ranks
    (the average precision is kept apart: ``multilabel_ap``)."""
    return MetricCollection(
        {
            tags.PRECISION: MultilabelPrecision(num_classes, threshold=threshold, average="macro"),
            tags.RECALL: MultilabelRecall(num_classes, threshold=threshold, average="macro"),
            tags.F1: MultilabelF1Score(num_classes, threshold=threshold, average="macro"),
        },
        prefix=prefix, compute_groups=False,
    )


def multilabel_ap(num_classes: int) -> MultilabelAveragePrecision:
    """Per-class average precision, exact (every score a threshold, as scikit-learn's average_precision_score)."""
    return MultilabelAveragePrecision(num_classes, average=None, thresholds=None)


TASKS = ("multiclass", "multilabel")


class LabelVectorMix(nn.Module):
    """Multi-label MixUp / CutMix (one of them per batch when both are on): the images are mixed as torchvision's
    ``v2.MixUp`` / ``v2.CutMix`` mix them (with the batch rolled by one, lambda ~ Beta(alpha, alpha); CutMix's
    lambda corrected to the pasted box's area) and the label vectors with the same lambda:
    ``y = lam y_i + (1 - lam) y_j``, a soft multi-hot target for the sigmoid losses."""

    def __init__(self, mixup: float, cutmix: float) -> None:
        super().__init__()
        self.choices = [(kind, alpha) for kind, alpha in (("mixup", mixup), ("cutmix", cutmix)) if alpha > 0]

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kind, alpha = self.choices[int(torch.randint(len(self.choices), ()))]
        lam = float(torch.distributions.Beta(alpha, alpha).sample())
        other_images, other_targets = images.roll(1, 0), targets.roll(1, 0)
        if kind == "mixup":
            images = images * lam + other_images * (1.0 - lam)
        else:
            height, width = images.shape[-2:]
            cy, cx = int(torch.randint(height, ())), int(torch.randint(width, ()))
            half_h, half_w = int(0.5 * height * (1 - lam) ** 0.5), int(0.5 * width * (1 - lam) ** 0.5)
            y0, y1 = max(cy - half_h, 0), min(cy + half_h, height)
            x0, x1 = max(cx - half_w, 0), min(cx + half_w, width)
            images = images.clone()
            images[..., y0:y1, x0:x1] = other_images[..., y0:y1, x0:x1]
            lam = 1.0 - (y1 - y0) * (x1 - x0) / (height * width)
        return images, targets * lam + other_targets * (1.0 - lam)


def checked_hparams(given: Mapping[str, Any]) -> dict[str, Any]:
    """``ImageClassifier``'s arguments as its checkpoints keep them: checked, unset ones resolved from the variant's
    record (drop path, preprocessing), and plain Python data only, so checkpoints load with weights_only=True."""
    hp = dict(given)
    spec = variant_spec(hp["variant"])
    num_classes = hp["num_classes"]
    class_names = hp["class_names"]
    class_names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names given for num_classes={num_classes}")
    if hp["loss"] not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {hp['loss']!r}")
    if hp["task"] not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {hp['task']!r}")
    if (hp["loss"] in MULTILABEL_LOSSES) != (hp["task"] == "multilabel"):
        raise ValueError(f"loss {hp['loss']!r} does not fit task {hp['task']!r}: multilabel trains with "
                         f"{' or '.join(MULTILABEL_LOSSES)}, multiclass with ce or focal")
    class_weights = hp["class_weights"]
    if class_weights is not None:
        class_weights = [float(w) for w in class_weights]
        if len(class_weights) != num_classes:
            raise ValueError(f"{len(class_weights)} class weights given for num_classes={num_classes}")
    layer_decay = hp["layer_decay"]
    if layer_decay is not None and not 0 < layer_decay <= 1:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
    preprocessing = spec.preprocessing(hp["img_size"], hp["crop_pct"]).replace(
        mean=hp["mean"], std=hp["std"], interpolation=hp["interpolation"])
    hp.update(variant=spec.name, class_names=class_names, class_weights=class_weights,
              img_size=list(hp["img_size"]), drop_path=spec.drop_path if hp["drop_path"] is None else hp["drop_path"],
              pretrained=None if hp["pretrained"] is None else str(hp["pretrained"]),
              crop_pct=preprocessing.crop_pct, mean=list(preprocessing.mean), std=list(preprocessing.std),
              interpolation=preprocessing.interpolation)
    return hp


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
        img_size: Sequence[int] = DEFAULT_IMG_SIZE,
        lr: float = PAPER["base_lr"],
        weight_decay: float = PAPER["weight_decay"],
        warmup_epochs: float = PAPER["warmup_epochs"],
        warmup_lr: float | None = None,
        min_lr: float | None = None,
        drop_path: float | None = None,
        label_smoothing: float = PAPER["label_smoothing"],
        mixup: float = 0.0,
        cutmix: float = 0.0,
        linear_sra: bool | None = None,
        pretrained: str | None = None,
        grad_checkpointing: bool = False,
        layer_decay: float | None = None,
        head_lr_scale: float = PAPER["head_lr_scale"],
        freeze_backbone_epochs: int = PAPER["freeze_backbone_epochs"],
        class_weights: Sequence[float] | None = None,
        loss: str = "ce",
        focal_gamma: float = 2.0,
        crop_pct: float | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        interpolation: str | None = None,
        task: str = "multiclass",
        threshold: float = 0.5,
        asl_gamma_neg: float = 4.0,
        asl_gamma_pos: float = 0.0,
        asl_clip: float = 0.05,
    ):
        """``lr``: peak rate (default: the paper recipe's rate at a total batch of 512); ``warmup_lr``/``min_lr``:
        absolute start and end of the schedule (default: 0.001x and 0.01x ``lr``); ``drop_path``: default the
        variant's; ``class_weights``: one loss weight per class; ``crop_pct``, ``mean``, ``std``, ``interpolation``:
        the evaluation preprocessing kept in checkpoints (default: the variant's, ``variant_spec().preprocessing``).
        ``task`` "multilabel": one sigmoid per class, targets float multi-hot (B, C), ``loss`` bce or asl (with
        ``asl_*``), ``class_weights`` the positive weights, metrics mAP and precision/recall/F1 at ``threshold``."""
        given = {name: value for name, value in locals().items() if name not in ("self", "__class__")}
        super().__init__()
        self.save_hyperparameters(checked_hparams(given))
        hp = self.hparams
        self.class_names = hp.class_names
        self.model = create_model(hp.variant, num_classes, linear_sra=linear_sra, drop_path_rate=hp.drop_path)
        if pretrained is not None and load_pretrained(self.model, pretrained):
            init_new_head(classifier_head(self.model))
        if grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        self.multilabel = hp.task == "multilabel"
        self.mix = (LabelVectorMix(mixup, cutmix) if mixup > 0 or cutmix > 0 else None) if self.multilabel \
            else self._build_mix(num_classes, mixup, cutmix)
        # Not in the state dict: the hyper-parameters rebuild it, and older checkpoints load unchanged.
        self.register_buffer("class_weight", None if hp.class_weights is None else torch.tensor(hp.class_weights),
                             persistent=False)
        self.history: dict[int, dict[str, float]] = {}  # multi-label: epoch -> val/map, precision, recall, f1, loss
        self.frozen_steps = 0  # optimizer steps during which only the head learns; set by configure_optimizers
        if self.multilabel:
            self.val_metrics = multilabel_metrics(num_classes, f"{tags.VAL}/", hp.threshold)
            self.test_metrics = multilabel_metrics(num_classes, f"{tags.TEST}/", hp.threshold)
            self.val_ap, self.test_ap = multilabel_ap(num_classes), multilabel_ap(num_classes)
        else:
            self.val_metrics = classification_metrics(num_classes, f"{tags.VAL}/")
            self.test_metrics = classification_metrics(num_classes, f"{tags.TEST}/")

    @classmethod
    def from_options(cls, *groups: Any, **extra: Any) -> "ImageClassifier":
        """Built from objects whose attributes carry option values (the CLI's option dataclasses): each constructor
        parameter takes the attribute of its name from the last group where it is set (not None); ``extra`` wins
        over the groups. Attributes that are no parameter are ignored; an unknown ``extra`` is a TypeError."""
        names = [name for name in inspect.signature(cls.__init__).parameters if name != "self"]
        unknown = sorted(set(extra) - set(names))
        if unknown:
            raise TypeError(f"{cls.__name__} has no parameter {', '.join(unknown)}")
        values: dict[str, Any] = {}
        for group in groups:
            values.update({name: getattr(group, name) for name in names if getattr(group, name, None) is not None})
        return cls(**{**values, **extra})

    @property
    def preprocessing(self) -> Preprocessing:
        """What the model expects of an image (input size, evaluation crop, normalisation), from the hyper-parameters;
        a checkpoint saved before they held the preprocessing gets the variant's defaults."""
        return Preprocessing.from_dict(dict(self.hparams))

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
        loss = self.loss(logits, targets)
        # One value per epoch in TensorBoard (tags line up across runs); the step loss goes to the progress bar.
        self.log(tags.TRAIN_LOSS, loss, on_step=False, on_epoch=True, sync_dist=True, batch_size=images.shape[0])
        self.log(tags.TRAIN_LR, self.scheduled_lr(), on_step=False, on_epoch=True, sync_dist=True)
        self.log(tags.PROGRESS_LOSS, loss, on_step=True, prog_bar=True, logger=False)
        self._log_epoch_as_x_axis()
        return loss

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The training loss of ``hparams.loss`` (losses.py)."""
        hp = self.hparams
        if self.multilabel:
            asl = hp.loss == "asl"
            return multilabel_loss(logits, targets, pos_weight=self.class_weight,
                                   gamma_neg=hp.asl_gamma_neg if asl else 0.0,
                                   gamma_pos=hp.asl_gamma_pos if asl else 0.0, clip=hp.asl_clip if asl else 0.0)
        return classification_loss(logits, targets, label_smoothing=hp.label_smoothing, class_weight=self.class_weight,
                                   gamma=hp.focal_gamma if hp.loss == "focal" else 0.0)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Softmax over classes (single-label) or one sigmoid per class (multi-label)."""
        return logits.sigmoid() if self.multilabel else logits.softmax(dim=-1)

    def _evaluate(self, batch, metrics: MetricCollection, stage: str):
        if batch is None:  # every image of the batch was unreadable and skipped (the data module's bad_images)
            return None
        images, targets = batch
        logits = self(images)
        if self.multilabel:
            loss = multilabel_loss(logits, targets)
            probs, hard = logits.float().sigmoid(), targets.round().long()
            metrics.update(probs, hard)
            (self.val_ap if stage == tags.VAL else self.test_ap).update(probs, hard)
        else:
            loss = F.cross_entropy(logits, targets)
            metrics.update(logits, targets)
        self.log(tags.stage_tag(stage, tags.LOSS), loss, on_epoch=True, sync_dist=True, prog_bar=stage == tags.VAL,
                 batch_size=len(targets))
        self.log_dict(metrics, on_epoch=True, prog_bar=False)
        self._log_epoch_as_x_axis()
        return {"loss": loss, "logits": logits.detach(), "target": targets}

    def _log_epoch_as_x_axis(self) -> None:
        """Lightning writes epoch-level scalars at the logged "step": the epoch, so runs line up in TensorBoard."""
        self.log(tags.EPOCH_STEP, float(self.current_epoch), on_step=False, on_epoch=True, reduce_fx="max")

    def validation_step(self, batch, batch_idx):
        return self._evaluate(batch, self.val_metrics, tags.VAL)

    def test_step(self, batch, batch_idx):
        return self._evaluate(batch, self.test_metrics, tags.TEST)

    def on_validation_epoch_end(self) -> None:
        if self.multilabel:
            self._log_average_precision(self.val_ap, tags.VAL)

    def on_test_epoch_end(self) -> None:
        if self.multilabel:
            self._log_average_precision(self.test_ap, tags.TEST)

    def on_validation_end(self) -> None:
        """Multi-label: keep the epoch's headline figures (``history``): summary.json reports the best epoch's."""
        if self.multilabel and not self.trainer.sanity_checking:
            metrics = self.trainer.callback_metrics
            self.history[self.current_epoch] = {tag: float(metrics[tag]) for tag in
                                                (*tags.MULTILABEL_HEADLINE_METRICS, tags.VAL_LOSS) if tag in metrics}

    def _log_average_precision(self, metric: MultilabelAveragePrecision, stage: str) -> None:
        """``<stage>/map`` (the mean over the classes that have a positive image) and ``<stage>/ap/<class>``."""
        if not metric.update_called:
            return
        per_class = metric.compute().float()  # a collective under DDP: every rank computes
        metric.reset()
        if self.trainer.sanity_checking:
            return
        self.log(tags.stage_tag(stage, tags.MAP), per_class.nanmean(), prog_bar=stage == tags.VAL)
        for name, value in zip(self.class_names, per_class):
            self.log(tags.ap_tag(name, stage), value)

    def predict_step(self, batch, batch_idx):
        if batch is None:  # every image of the batch was unreadable
            return None
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self.probabilities(self(images))

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
        warmup_factor, min_factor = schedule_factors(hp.lr, hp.warmup_lr, hp.min_lr)
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

