"""The (B, N, C) token layout PVTv2's modules pass to each other: views to and from channels-last maps, and the
in-place ops blocks use when no autograd graph is recorded.

``N = H * W`` in row-major order, so a ``(B, N, C)`` tensor viewed as ``(B, H, W, C)`` and permuted to NCHW is a
channels-last map: the convolutions inside a stage cost no layout copies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def tokens_to_map(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """(B, N, C) -> (B, C, H, W) as a channels-last view (no copy)."""
    B, _, C = x.shape
    return x.view(B, hw[0], hw[1], C).permute(0, 3, 1, 2)


def map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C); free when the map is channels-last."""
    return x.permute(0, 2, 3, 1).flatten(1, 2)


def no_autograd(x: torch.Tensor) -> bool:
    """True when no graph is recorded through ``x``, so an op may overwrite its input in place."""
    return not (torch.is_grad_enabled() and x.requires_grad)


# Inference-only in-place variants: they save one activation-sized temporary each. Under autograd the
# plain op is used: in place on a Linear's output (a view) would add CopySlices copies to the backward.

def gelu(x: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.gelu_(x) if no_autograd(x) else F.gelu(x)


def relu(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x, inplace=no_autograd(x))


def add_residual(x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """x + branch, summed into the branch's fresh output when autograd is off."""
    return branch.add_(x) if no_autograd(branch) else x + branch
