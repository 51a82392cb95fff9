"""Training recipes: the optimisation and regularisation defaults a run starts from.

A recipe fills every recipe field of the run configuration the user left unset (``None``); a
value given as a flag or in a config file always wins. ``choose_recipe`` picks one from what
is known about the run (pretrained weights, dataset size) and says why, so the banner can print
the recipe, the reason and each resolved value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

RECIPE_NAMES = ("auto", "paper")
"""Choices of ``--recipe``; ``auto`` picks one of the others from the data."""

RECIPE_FIELDS = ("epochs", "base_lr", "weight_decay", "warmup_epochs", "label_smoothing", "mixup", "cutmix",
                 "augment", "drop_path", "grad_clip")
"""Run-configuration fields a recipe sets when the user did not."""

PAPER = {
    # The official PVTv2 ImageNet recipe (docs/recipe.md): AdamW, lr 5e-4 per 512 images, 5 warm-up epochs.
    "epochs": 100, "base_lr": 5e-4, "weight_decay": 0.05, "warmup_epochs": 5.0, "label_smoothing": 0.1,
    "mixup": 0.8, "cutmix": 1.0, "augment": "strong",
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


def choose_recipe(requested: str, *, pretrained: bool, num_train_images: int, demo: bool) -> Recipe:
    """The recipe for ``--recipe requested`` (``auto`` decides from the data)."""
    if requested not in RECIPE_NAMES:
        raise ValueError(f"unknown recipe {requested!r}; choose one of: {', '.join(RECIPE_NAMES)}")
    return Recipe("paper", "the official PVTv2 ImageNet recipe" if requested == "paper" else
                  "auto: the official PVTv2 ImageNet recipe", PAPER)
