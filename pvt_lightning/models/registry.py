"""Variant names -> architectures, and ``create_model``, the one way to build a model."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

from .pvt_v2 import PvtV2Config, PyramidVisionTransformerV2

_WIDE = (64, 128, 320, 512)

PVT_V2_CONFIGS: dict[str, PvtV2Config] = {
    "b0": PvtV2Config(embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2)),
    "b1": PvtV2Config(embed_dims=_WIDE, depths=(2, 2, 2, 2)),
    "b2": PvtV2Config(embed_dims=_WIDE, depths=(3, 4, 6, 3)),
    "b2_li": PvtV2Config(embed_dims=_WIDE, depths=(3, 4, 6, 3), linear_sra=True),
    "b3": PvtV2Config(embed_dims=_WIDE, depths=(3, 4, 18, 3)),
    "b4": PvtV2Config(embed_dims=_WIDE, depths=(3, 8, 27, 3)),
    "b5": PvtV2Config(embed_dims=_WIDE, depths=(3, 6, 40, 3), mlp_ratios=(4, 4, 4, 4)),
}

BASELINES = ("resnet50",)

VARIANTS: tuple[str, ...] = tuple(PVT_V2_CONFIGS) + BASELINES
"""Every name ``create_model`` accepts (PVTv2 names also with a ``pvt_v2_`` prefix)."""

# The official recipe's regularisation per variant (REFERENCE.md, "Official training recipe").
DEFAULT_DROP_PATH = {"b0": 0.1, "b1": 0.1, "b2": 0.1, "b2_li": 0.1, "b3": 0.3, "b4": 0.3, "b5": 0.3, "resnet50": 0.0}
DEFAULT_GRAD_CLIP = {"b3": 1.0, "b4": 1.0, "b5": 1.0}


def canonical_name(name: str) -> str:
    """'pvt_v2_b2_li' / 'B2_LI' -> 'b2_li'; unknown names raise a ValueError listing the valid ones."""
    key = name.strip().lower()
    if key.startswith("pvt_v2_"):
        key = key[len("pvt_v2_"):]
    if key not in VARIANTS:
        raise ValueError(f"unknown model variant {name!r}; choose one of: {', '.join(VARIANTS)}")
    return key


def is_pvt_v2(name: str) -> bool:
    return canonical_name(name) in PVT_V2_CONFIGS


def create_model(
    name: str,
    num_classes: int = 1000,
    *,
    pretrained: str | Path | None = None,
    linear_sra: bool | None = None,
    drop_path_rate: float = 0.0,
    **overrides,
) -> nn.Module:
    """Build a PVTv2 variant (b0..b5, b2_li) or the ``resnet50`` baseline.

    Args:
        name: variant name, with or without the ``pvt_v2_`` prefix.
        num_classes: size of the classifier head (0 for a headless backbone).
        pretrained: path to weights in the official, timm, HF or pvt-lightning layout; a head
            of a different class count is re-initialised with a warning.
        linear_sra: override the variant's attention (``b2`` + ``True`` is ``b2_li``).
        drop_path_rate: stochastic-depth rate of the last block (linear rule over all blocks).
        **overrides: ``PvtV2Config`` fields (``embed_dims``, ``depths``...) or model keyword
            arguments (``drop_rate``, ``attn_drop_rate``, ``in_chans``).
    """
    key = canonical_name(name)
    if key == "resnet50":
        if linear_sra:
            raise ValueError("linear_sra applies to PVTv2 variants only, not to resnet50")
        model = _resnet50(num_classes, drop_path_rate=drop_path_rate, **overrides)
    else:
        config = PVT_V2_CONFIGS[key]
        config_fields = {f.name for f in dataclasses.fields(PvtV2Config)}
        config_overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items() if k in config_fields}
        model_kwargs = {k: v for k, v in overrides.items() if k not in config_fields}
        if linear_sra is not None:
            config_overrides["linear_sra"] = bool(linear_sra)
        config = dataclasses.replace(config, **config_overrides)
        model = PyramidVisionTransformerV2(config, num_classes=num_classes, drop_path_rate=drop_path_rate, **model_kwargs)
    if pretrained is not None:
        from .checkpoints import load_pretrained

        load_pretrained(model, pretrained)
    return model


def _resnet50(num_classes: int, drop_path_rate: float = 0.0, **kwargs) -> nn.Module:
    if drop_path_rate:
        raise ValueError("drop_path_rate is not supported by the resnet50 baseline; pass --drop-path 0")
    model = ResNet50Classifier(Bottleneck, [3, 4, 6, 3], num_classes=max(num_classes, 1), **kwargs)
    if num_classes == 0:
        model.fc = nn.Identity()
    return model


class ResNet50Classifier(ResNet):
    """torchvision's ResNet-50 plus the PVTv2 model's helper methods, so both train the same way."""

    num_features = 2048

    def reset_classifier(self, num_classes: int) -> None:
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            raise ValueError("grad checkpointing is implemented for PVTv2 variants, not for resnet50")
