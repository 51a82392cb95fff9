"""The independent implementation of a variant (its record's ``reference``: timm's ``pvt_v2_*``,
torchvision's ``resnet50``), to time and check ours against with identical weights."""

from __future__ import annotations

import re

from torch import nn

from pvt_lightning.models import create_model, variant_spec


def build_reference(name: str, num_classes: int = 1000) -> nn.Module:
    """The reference implementation of variant ``name``, randomly initialised (timm or torchvision, no download)."""
    library, _, model_name = variant_spec(name).reference.partition(":")
    if library == "timm":
        import timm

        return timm.create_model(model_name, pretrained=False, num_classes=num_classes)
    if library == "torchvision":
        import torchvision

        return torchvision.models.get_model(model_name, weights=None, num_classes=num_classes)
    raise ValueError(f"unknown reference library {library!r} in the record of {name!r}")


def build_model(name: str, impl: str = "ours", num_classes: int = 1000) -> nn.Module:
    """Our model (``impl="ours"``) or the reference implementation (``"reference"``, alias ``"timm"`` /
    ``"torchvision"``) of variant ``name``, randomly initialised."""
    if impl == "ours":
        return create_model(name, num_classes=num_classes)
    if impl in ("reference", "timm", "torchvision"):
        return build_reference(name, num_classes)
    raise ValueError(f"unknown implementation {impl!r}; choose ours or reference")


def ours_to_timm(state: dict) -> dict:
    """Our PVTv2 keys -> timm's (the inverse of ``models.weights.timm_to_ours``; docs/checkpoints.md)."""
    return {re.sub(r"^stages\.0\.patch_embed\.", "patch_embed.",
                   re.sub(r"^stages\.([123])\.patch_embed\.", r"stages.\1.downsample.", k)): v
            for k, v in state.items()}


def reference_with_same_weights(ours: nn.Module, name: str) -> nn.Module:
    """The reference implementation of ``name`` carrying exactly ``ours``' weights."""
    ref = build_reference(name, num_classes=ours.num_classes)
    state = ours.state_dict()
    if variant_spec(name).reference.startswith("timm:"):
        state = ours_to_timm(state)
    ref.load_state_dict(state)
    return ref
