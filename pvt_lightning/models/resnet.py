"""The ResNet baseline: torchvision's ResNet (same weights, same state-dict keys) with timm's model interface."""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from torchvision.models.resnet import Bottleneck, ResNet

from pvt_lightning.models.features import Indices, feature_take_indices

STAGES = ("layer1", "layer2", "layer3", "layer4")


class ResNetClassifier(ResNet):
    """torchvision's bottleneck ResNet (``layers=(3, 4, 6, 3)`` is ResNet-50) with the PVTv2 model's interface.

    ``forward_features(x)`` -> layer4's map ``(B, 2048, H/32, W/32)``; ``forward_intermediates(x)`` ->
    the four residual stages' maps (layer1..layer4) at strides 4, 8, 16, 32. Unlike timm's ResNet, the
    stem (stride 2) is not one of the intermediates, so stage indices mean the same here as for PVTv2.
    """

    def __init__(self, layers: Sequence[int] = (3, 4, 6, 3), num_classes: int = 1000, **kwargs):
        super().__init__(Bottleneck, list(layers), num_classes=max(num_classes, 1), **kwargs)
        self.num_classes = num_classes
        self.num_features = self.fc.in_features
        if num_classes == 0:
            self.fc = nn.Identity()
        self.global_pool = "avg"
        self.grad_checkpointing = False
        self.feature_info = [dict(num_chs=64 * Bottleneck.expansion * 2**i, reduction=4 * 2**i, module=name)
                             for i, name in enumerate(STAGES)]
        self.pretrained_cfg: dict = {}  # create_model fills it from the variant's record

    @property
    def default_cfg(self) -> dict:
        return self.pretrained_cfg

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A fresh head for ``num_classes`` (0 = none); ``global_pool=""`` also drops the pooling."""
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each bottleneck block in the backward pass (BatchNorm statistics still update once per step)."""
        self.grad_checkpointing = enable

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 64, H/4, W/4): 7x7/2 conv, BatchNorm, ReLU, 3x3/2 max pool."""
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def run_stage(self, stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if not (self.grad_checkpointing and torch.is_grad_enabled()) or isinstance(stage, nn.Identity):
            return stage(x)
        for block in stage:
            x = checkpoint(block, x, use_reentrant=False,
                           context_fn=lambda block=block: (contextlib.nullcontext(), frozen_batchnorm_stats(block)))
        return x

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Indices = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """The residual stages' maps, as timm's ``forward_intermediates`` (see ``PyramidVisionTransformerV2``'s).

        ``norm`` is accepted for timm's signature (no final norm in a ResNet); ``output_fmt`` is "NCHW".
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW' for resnet, got {output_fmt!r}")
        take, last = feature_take_indices(len(STAGES), indices)
        x = self.stem(x)
        intermediates = []
        for i, name in enumerate(STAGES[:last + 1] if stop_early else STAGES):
            x = self.run_stage(getattr(self, name), x)
            if i in take:
                intermediates.append(x)
        return intermediates if intermediates_only else (x, intermediates)

    def prune_intermediate_layers(self, indices: Indices = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Replace the stages after the last of ``indices`` with identities; drop the head if asked or cut."""
        take, last = feature_take_indices(len(STAGES), indices)
        for name in STAGES[last + 1:]:
            setattr(self, name, nn.Identity())
        cut = last < len(STAGES) - 1
        self.feature_info = self.feature_info[:last + 1]
        if cut:
            self.num_features = self.feature_info[-1]["num_chs"]
        if prune_head or cut:
            self.reset_classifier(0, "")
        return take

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> layer4's map (B, 2048, H/32, W/32)."""
        x = self.stem(x)
        for name in STAGES:
            x = self.run_stage(getattr(self, name), x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, C, h, w) -> logits (B, num_classes); ``pre_logits``: the pooled (B, num_features)."""
        if self.global_pool == "avg":
            x = torch.flatten(self.avgpool(x), 1)  # torchvision's pooling, so logits equal torchvision's
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@contextlib.contextmanager
def frozen_batchnorm_stats(module: nn.Module) -> Iterator[None]:
    """BatchNorm layers in ``module`` normalise as usual but leave their running statistics as they were.

    Grad checkpointing runs a block's forward again during backward; without this, every checkpointed
    BatchNorm would fold the same batch into its running mean and variance twice per step.
    """
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch: unchanged
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(norms, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(tracked)
