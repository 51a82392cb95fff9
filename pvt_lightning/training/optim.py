"""Optimisation: AdamW parameter groups (no decay on norms/biases, layer-wise lr decay), the warm-up + cosine
schedule, the linear lr scaling rule, and the fine-tuning head's init.

Fine-tuning controls live here as parameter groups and a schedule per group: ``layer_decay`` (each layer's lr
is ``layer_decay ** (distance from the head)`` of the head's), ``head_lr_scale`` (the classifier head's lr
multiplier); ``ImageClassifier`` holds the backbone's groups at lr 0 while it is frozen.
"""

from __future__ import annotations

import math
from typing import Iterator

from torch import nn

from pvt_lightning.training.recipes import PAPER

IMAGES_PER_BASE_LR = 512
"""A base lr is the rate per this many images of total batch (the official recipe: 5e-4 per 512)."""


def scaled_lr(total_batch_size: int, base_lr: float = PAPER["base_lr"]) -> float:
    """``base_lr`` x total batch / 512 (linear scaling); the total batch counts every device, node and
    accumulation step."""
    return base_lr * total_batch_size / IMAGES_PER_BASE_LR


def schedule_factors(lr: float, warmup_lr: float | None, min_lr: float | None) -> tuple[float, float]:
    """Start and end of the schedule as fractions of ``lr``: ``warmup_lr``/``min_lr`` if given, else 0.001 and
    0.01 (the official 1e-6 and 1e-5 at its lr of 1e-3 for a total batch of 1024)."""
    warmup = warmup_lr if warmup_lr is not None else 1e-3 * lr
    end = min_lr if min_lr is not None else 1e-2 * lr
    return min(1.0, warmup / lr), min(1.0, end / lr)


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
