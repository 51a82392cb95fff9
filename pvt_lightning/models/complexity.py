"""Parameter and compute counts of a model at a given input size."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from pvt_lightning.models.attention import LINEAR_SRA_POOL, SpatialReductionAttention


@dataclass(frozen=True)
class Complexity:
    """Counts for one image. ``gmacs`` covers convolutions and linear layers, the convention of timm's
    published figures (docs/variants.md); ``attention_gmacs`` adds the q.k^T and attn.v products, the term
    that linear SRA changes (billions of multiply-accumulates = GFLOPs / 2)."""

    params_m: float
    gmacs: float
    attention_gmacs: float = 0.0

    @property
    def total_gmacs(self) -> float:
        return self.gmacs + self.attention_gmacs


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def attention_macs(attn: SpatialReductionAttention, tokens: torch.Tensor, hw: tuple[int, int]) -> int:
    """q.k^T and attn.v of one SRA call: 2 * N queries * M keys * C channels per image."""
    B, N, C = tokens.shape
    if attn.linear:
        keys = LINEAR_SRA_POOL * LINEAR_SRA_POOL
    elif attn.sr_ratio > 1:
        keys = (hw[0] // attn.sr_ratio) * (hw[1] // attn.sr_ratio)
    else:
        keys = N
    return 2 * B * N * keys * C


@torch.no_grad()
def measure_complexity(model: nn.Module, img_size: tuple[int, int] = (224, 224), in_chans: int = 3) -> Complexity:
    """Count params and GMACs of ``model`` on one ``img_size`` (H, W) image.

    FlopCounterMode counts every matmul and convolution. Attention runs on the math backend so it is
    counted the same way on every device (fused CPU/GPU kernels are counted inconsistently), and is
    reported separately; element-wise work is not counted.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    x = torch.zeros(1, in_chans, *img_size, device=device)
    attention = []
    hooks = [m.register_forward_hook(lambda m, args, out: attention.append(attention_macs(m, *args)))
             for m in model.modules() if isinstance(m, SpatialReductionAttention)]
    counter = FlopCounterMode(display=False)
    try:
        with counter, sdpa_kernel(SDPBackend.MATH):
            model(x)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    total_macs = counter.get_total_flops() / 2
    attention_gmacs = sum(attention) / 1e9
    return Complexity(params_m=count_params(model) / 1e6, gmacs=total_macs / 1e9 - attention_gmacs,
                      attention_gmacs=attention_gmacs)
