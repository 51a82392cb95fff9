"""Stage maps as a backbone: timm's ``forward_intermediates`` indices, ``feature_info`` and ``features_only``.

Every model here lists its feature maps in ``model.feature_info``, one dict per stage
(``num_chs``, ``reduction`` = stride, ``module``), and implements
``forward_intermediates(x, indices, ...)`` and ``prune_intermediate_layers(indices)``.
``FeatureBackbone`` turns such a model into what ``create_model(..., features_only=True)`` returns.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

Indices = int | Sequence[int] | None


def feature_take_indices(num_stages: int, indices: Indices = None) -> tuple[list[int], int]:
    """timm's index rule: None = every stage, int n = the last n, a sequence = those stages (negative from the end).

    Returns the absolute indices, ascending as given, and the largest one (the last stage that must run).
    """
    if indices is None:
        indices = num_stages
    if isinstance(indices, int):
        if not 0 < indices <= num_stages:
            raise ValueError(f"indices={indices} asks for the last {indices} stages; this model has {num_stages}")
        take = list(range(num_stages - indices, num_stages))
    else:
        take = [num_stages + i if i < 0 else i for i in indices]
        bad = [i for i in indices if not -num_stages <= i < num_stages]
        if bad or not take:
            raise ValueError(f"stage indices {list(indices)} are out of range: this model has stages 0..{num_stages - 1}")
    return take, max(take)


class FeatureInfo:
    """Channels, strides and module names of a backbone's outputs (timm's ``FeatureInfo`` accessors)."""

    def __init__(self, info: Sequence[dict]):
        self.info = [dict(d) for d in info]

    def channels(self, idx: int | None = None) -> list[int] | int:
        return self.get("num_chs", idx)

    def reduction(self, idx: int | None = None) -> list[int] | int:
        return self.get("reduction", idx)

    def module_name(self, idx: int | None = None) -> list[str] | str:
        return self.get("module", idx)

    def get(self, key: str, idx: int | None = None):
        """``key`` of every output (idx None) or of output ``idx``."""
        return [d[key] for d in self.info] if idx is None else self.info[idx][key]

    def get_dicts(self) -> list[dict]:
        return [dict(d) for d in self.info]

    def __getitem__(self, idx: int) -> dict:
        return self.info[idx]

    def __len__(self) -> int:
        return len(self.info)

    def __repr__(self) -> str:
        return f"FeatureInfo(channels={self.channels()}, reduction={self.reduction()})"


class FeatureBackbone(nn.Module):
    """A classifier cut to a backbone for detection / segmentation necks (timm's ``features_only``).

    ``forward(x)`` -> the NCHW stage maps at ``out_indices``; ``feature_info.channels()`` and
    ``.reduction()`` describe them. Stages after the last one taken, and the head, are removed, so
    they cost neither compute nor memory. The state dict is the model's under ``model.`` (as in timm).
    """

    def __init__(self, model: nn.Module, out_indices: Indices = None):
        super().__init__()
        self.out_indices = tuple(model.prune_intermediate_layers(out_indices, prune_head=True))
        self.model = model
        self.feature_info = FeatureInfo([model.feature_info[i] for i in self.out_indices])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model.forward_intermediates(x, indices=self.out_indices, stop_early=True, intermediates_only=True)
