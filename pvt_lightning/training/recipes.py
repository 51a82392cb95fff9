"""Training recipes: the optimisation and regularisation defaults a run starts from.

A recipe fills every recipe field of the run configuration the user left unset (``None``); a
value given as a flag or in a config file always wins. ``choose_recipe`` picks one from what
is known about the run (pretrained weights, dataset size) and says why, so the banner can print
the recipe, the reason and each resolved value.

- ``paper``: the official PVTv2 ImageNet recipe (100 epochs here, lr 5e-4 per 512 images, 5 warm-up
  epochs, MixUp 0.8 / CutMix 1.0, strong augmentation). It was made for 1.28M images: on a few
  thousand it underfits (scikit-learn's digits, b0, 30 epochs: 0.88 val accuracy; 0.98 with ``small``).
- ``small``: from scratch on small data: lr 1e-3 at batch 64 (8e-3 per 512), 2 warm-up epochs, no
  MixUp/CutMix, basic augmentation (random resized crop + flip), drop path at most 0.1.
- ``finetune``: from pretrained weights, after DeiT/BEiT/ConvNeXt fine-tuning practice: 30 epochs (fewer
  above 1.28M images, at most 30 ImageNet-1k epochs' worth of images), lr 2e-4 per 512 (2.5x below
  the paper's; below ``SMALL_DATASET`` images 4e-3, half the ``small`` recipe's) with layer-wise
  decay (the stem learns at 1/10 of the head's rate), 1 warm-up epoch, basic augmentation, MixUp
  0.1 only on 20k+ images (BiT's rule), drop path at most 0.1.

``auto`` picks ``finetune`` when ``--pretrained`` is given, else ``small`` below ``SMALL_DATASET``
training images and ``paper`` from there on. The README's "Recipes" section says why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from pvt_lightning.models.registry import DEFAULT_DROP_PATH, PVT_V2_CONFIGS, canonical_name

RECIPE_NAMES = ("auto", "paper", "small", "finetune")
"""Choices of ``--recipe``; ``auto`` picks one of the others from the data."""

RECIPE_FIELDS = ("epochs", "base_lr", "weight_decay", "warmup_epochs", "label_smoothing", "mixup", "cutmix",
                 "augment", "drop_path", "grad_clip", "layer_decay", "head_lr_scale", "freeze_backbone_epochs")
"""Run-configuration fields a recipe sets when the user did not."""

SMALL_DATASET = 50_000
"""``auto`` trains from scratch with ``small`` below this many training images (CIFAR-10's size), ``paper`` above."""

MIXUP_FINETUNE_MIN_IMAGES = 20_000
"""BiT's fine-tuning rule: MixUp (alpha 0.1) only from this many training images on."""

FINETUNE_IMAGES_SEEN = 30 * 1_281_167
"""The longest fine-tuning budget in DeiT/Swin/ConvNeXt practice: 30 epochs of ImageNet-1k. Larger datasets get
fewer epochs (3M images: 13), smaller ones 30."""

FINETUNE_STEM_LR = 0.1
"""Under the fine-tuning recipe's layer decay, the stem learns at this fraction of the head's rate."""

PAPER = {
    # The official PVTv2 ImageNet recipe (docs/recipe.md): AdamW, lr 5e-4 per 512 images, 5 warm-up epochs.
    "epochs": 100, "base_lr": 5e-4, "weight_decay": 0.05, "warmup_epochs": 5.0, "label_smoothing": 0.1,
    "mixup": 0.8, "cutmix": 1.0, "augment": "strong", "layer_decay": 1.0, "head_lr_scale": 1.0,
    "freeze_backbone_epochs": 0,
}

SMALL = {
    # A few hundred steps in all: a higher rate, short warm-up, and no MixUp/CutMix (they slow learning
    # down, paying off only over long schedules).
    "epochs": 30, "base_lr": 8e-3, "weight_decay": 0.05, "warmup_epochs": 2.0, "label_smoothing": 0.1,
    "mixup": 0.0, "cutmix": 0.0, "augment": "basic", "layer_decay": 1.0, "head_lr_scale": 1.0,
    "freeze_backbone_epochs": 0,
}

FINETUNE_SMALL_BASE_LR = 4e-3
"""Fine-tuning rate per 512 images below ``SMALL_DATASET``: half the ``small`` recipe's. Small datasets come with small
batches and few steps, and the per-512 rate scales down linearly with the batch: 2e-4 would leave 6e-6 at batch 16,
too little to adapt a backbone in a few hundred steps (experiments/results/recipes.md)."""

FINETUNE = {
    "epochs": 30, "base_lr": 2e-4, "weight_decay": 0.05, "warmup_epochs": 1.0, "label_smoothing": 0.1,
    "mixup": 0.0, "cutmix": 0.0, "augment": "basic", "head_lr_scale": 1.0, "freeze_backbone_epochs": 0,
}


@dataclass(frozen=True)
class Recipe:
    """A named set of defaults and the reason it was chosen."""

    name: str
    reason: str
    values: Mapping[str, Any]

    def resolve(self, chosen: Mapping[str, Any], variant_defaults: Mapping[str, Any]) -> dict[str, Any]:
        """Each recipe field: the user's value if set, else this recipe's, else the variant's default."""
        resolved = {}
        for field in RECIPE_FIELDS:
            value = chosen.get(field)
            if value is None:
                value = self.values.get(field, variant_defaults.get(field))
            resolved[field] = value
        return resolved


def choose_recipe(requested: str, *, pretrained: bool, num_train_images: int, demo: bool, variant: str) -> Recipe:
    """The recipe for ``--recipe requested`` (``auto`` decides from the data), with its values for ``variant``."""
    if requested not in RECIPE_NAMES:
        raise ValueError(f"unknown recipe {requested!r}; choose one of: {', '.join(RECIPE_NAMES)}")
    variant = canonical_name(variant)
    name = requested
    if requested == "auto":
        if pretrained:
            name, why = "finetune", "auto: --pretrained weights given"
        elif num_train_images < SMALL_DATASET:
            name, why = "small", f"auto: {num_train_images} training images, fewer than {SMALL_DATASET:,}"
        else:
            name, why = "paper", f"auto: {num_train_images} training images, at least {SMALL_DATASET:,}"
    else:
        why = "--recipe " + requested
    if name == "paper":
        return Recipe("paper", why + "; the official PVTv2 ImageNet recipe", dict(PAPER))
    if name == "small":
        values = {**SMALL, "drop_path": min(0.1, DEFAULT_DROP_PATH[variant])}
        if demo:
            from pvt_lightning.data.demo import DEMO_EPOCHS  # the demo's own length: 0.85+ within 10 minutes on a laptop CPU

            values["epochs"] = DEMO_EPOCHS
            why += f"; built-in demo: {DEMO_EPOCHS} epochs"
        return Recipe("small", why + "; from scratch on small data", values)
    values = {**FINETUNE, "drop_path": min(0.1, DEFAULT_DROP_PATH[variant]),
              "layer_decay": finetune_layer_decay(variant),
              "epochs": max(1, min(30, round(FINETUNE_IMAGES_SEEN / max(1, num_train_images))))}
    if num_train_images < SMALL_DATASET:
        values["base_lr"] = FINETUNE_SMALL_BASE_LR
    if num_train_images >= MIXUP_FINETUNE_MIN_IMAGES:
        values["mixup"] = 0.1
    return Recipe("finetune", why + "; fine-tuning pretrained weights", values)


def num_blocks(variant: str) -> int:
    """Transformer (PVTv2) or bottleneck (ResNet-50) blocks: the layers between the stem and the head."""
    variant = canonical_name(variant)
    return sum(PVT_V2_CONFIGS[variant].depths) if variant in PVT_V2_CONFIGS else 3 + 4 + 6 + 3


def finetune_layer_decay(variant: str) -> float:
    """The decay per layer that puts the stem at ``FINETUNE_STEM_LR`` of the head's rate (blocks + 1 layers
    below the head): 0.774 for b0/b1, 0.873 for b2/b2_li/resnet50, 0.924 for b3, 0.947 for b4, 0.957 for b5."""
    return round(FINETUNE_STEM_LR ** (1.0 / (num_blocks(variant) + 1)), 3)
