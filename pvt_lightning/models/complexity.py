"""Parameter and compute counts of a model at a given input size."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class Complexity:
    params_m: float  # millions of parameters
    gmacs: float  # multiply-accumulates of one forward pass of one image, in billions (= GFLOPs / 2)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def measure_complexity(model: nn.Module, img_size: tuple[int, int] = (224, 224), in_chans: int = 3) -> Complexity:
    """Count params and GMACs of ``model`` on one ``img_size`` (H, W) image.

    FlopCounterMode counts every matmul and convolution, attention included, which
    hand-written FLOP formulas often miss; element-wise work is not counted.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    x = torch.zeros(1, in_chans, *img_size, device=device)
    counter = FlopCounterMode(display=False)
    try:
        with counter:
            model(x)
    finally:
        model.train(was_training)
    return Complexity(params_m=count_params(model) / 1e6, gmacs=counter.get_total_flops() / 2e9)
