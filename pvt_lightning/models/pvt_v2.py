"""PVTv2: Pyramid Vision Transformer v2 (Wang et al., arXiv 2106.13797), the family read top to bottom.

The three changes over PVTv1, and where they live:

1. Overlapping patch embedding (``OverlapPatchEmbed``, here): a 7x7/stride-4 conv, then 3x3/stride-2
   convs between stages, each followed by LayerNorm, so every token sees its neighbours.
2. No positional embedding; a 3x3 depthwise conv inside the MLP (``ConvMlp``, here) lets the model
   learn position from zero padding, so any input size works, square or not.
3. Spatial-reduction attention (``SpatialReductionAttention``, in attention.py): keys/values come from a
   strided-conv-reduced map (``sr_ratio``) or, with linear SRA, from a map pooled to a fixed
   7x7 grid, so attention cost grows linearly with the number of pixels.

Tokens travel between modules as ``(B, N, C)`` with ``N = H * W`` in row-major order; a
``(B, N, C)`` tensor viewed as ``(B, H, W, C)`` and permuted to NCHW is a channels-last map,
so the convolutions inside a stage cost no layout copies (the views and in-place ops: tokens.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from pvt_lightning.models.attention import SpatialReductionAttention
from pvt_lightning.models.features import Indices, feature_take_indices
from pvt_lightning.models.tokens import add_residual, gelu, map_to_tokens, relu, tokens_to_map

MIN_INPUT_SIZE = 32
"""Smallest input side: stage 1 must hold at least one 8x8 spatial-reduction window."""


@dataclass(frozen=True)
class PvtV2Config:
    """Architecture of one PVTv2 variant (the variants: ``registry.VARIANT_SPECS``, docs/variants.md)."""

    embed_dims: tuple[int, int, int, int] = (64, 128, 320, 512)
    depths: tuple[int, int, int, int] = (3, 4, 6, 3)
    mlp_ratios: tuple[float, float, float, float] = (8, 8, 4, 4)
    num_heads: tuple[int, int, int, int] = (1, 2, 5, 8)
    sr_ratios: tuple[int, int, int, int] = (8, 4, 2, 1)
    linear_sra: bool = False


def drop_path(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the whole residual branch per sample, rescale the survivors."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1.0 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
    return x * mask.div_(keep_prob)


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


class OverlapPatchEmbed(nn.Module):
    """Conv with kernel > stride (overlapping patches), then LayerNorm over channels."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int, stride: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(embed_dim)  # eps 1e-5, as released

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(x)  # (B, C_in, H, W) -> (B, C, H/s, W/s)
        hw = (x.shape[2], x.shape[3])
        return self.norm(map_to_tokens(x)), hw  # (B, N, C)



class ConvMlp(nn.Module):
    """fc1 -> [ReLU in linear mode] -> 3x3 depthwise conv -> GELU -> fc2.

    The depthwise conv, with zero padding at the border, stands in for positional embeddings.
    """

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0, extra_relu: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.extra_relu = extra_relu  # linear-SRA MLPs apply ReLU to fc1's output
        self.dwconv = nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1, groups=hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        x = self.fc1(x)  # (B, N, C) -> (B, N, hidden)
        if self.extra_relu:
            x = relu(x)
        x = map_to_tokens(self.dwconv(tokens_to_map(x, hw)))  # channels-last conv: no layout copies
        x = self.drop(gelu(x))
        return self.drop(self.fc2(x))  # (B, N, C)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        sr_ratio: int,
        linear: bool,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = SpatialReductionAttention(dim, num_heads, sr_ratio, linear, attn_drop=attn_drop, proj_drop=drop)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio), drop=drop, extra_relu=linear)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        x = add_residual(x, self.drop_path(self.attn(self.norm1(x), hw)))
        return add_residual(x, self.drop_path(self.mlp(self.norm2(x), hw)))


class Stage(nn.Module):
    """Patch embedding (downsampling), a stack of blocks, a final LayerNorm; NCHW in and out."""

    def __init__(self, in_chans: int, dim: int, depth: int, first: bool, num_heads: int, mlp_ratio: float,
                 sr_ratio: int, linear: bool, drop: float, attn_drop: float, drop_paths: Sequence[float]):
        super().__init__()
        self.patch_embed = OverlapPatchEmbed(in_chans, dim, patch_size=7 if first else 3, stride=4 if first else 2)
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_ratio, sr_ratio, linear, drop, attn_drop, dp) for dp in drop_paths
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, C, H/s, W/s) as a channels-last view of the tokens (no copy)."""
        x, hw = self.patch_embed(x)  # (B, C_in, H, W) -> (B, N, C)
        for block in self.blocks:
            if self.grad_checkpointing and x.requires_grad:
                x = checkpoint(block, x, hw, use_reentrant=False)
            else:
                x = block(x, hw)
        x = self.norm(x)
        return tokens_to_map(x, hw)  # channels-last, so the next stage's conv yields tokens without a copy


class PyramidVisionTransformerV2(nn.Module):
    """PVTv2 classifier and backbone, with timm's model interface.

    ``forward(x)`` = ``forward_head(forward_features(x))`` -> logits ``(B, num_classes)``;
    ``forward_features(x)`` -> the last stage's map ``(B, C4, H/32, W/32)``;
    ``forward_intermediates(x)`` -> the four stage maps at strides 4, 8, 16, 32 (for detection /
    segmentation necks; ``create_model(name, features_only=True)`` wraps it as a backbone).
    """

    def __init__(
        self,
        config: PvtV2Config = PvtV2Config(),
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        global_pool: str = "avg",
    ):
        super().__init__()
        self.config = config
        self.num_classes = num_classes
        self.num_features = config.embed_dims[-1]
        self.global_pool = check_global_pool(global_pool)
        self.feature_info = [dict(num_chs=dim, reduction=4 * 2**i, module=f"stages.{i}")
                             for i, dim in enumerate(config.embed_dims)]
        self.pretrained_cfg: dict = {}  # create_model fills it from the variant's record
        # Official rule: drop-path rate rises linearly over all blocks of all stages.
        dpr = torch.linspace(0, drop_path_rate, sum(config.depths), device="cpu").tolist()  # also under a meta device
        stages, start, prev_dim = [], 0, in_chans
        for i, (dim, depth) in enumerate(zip(config.embed_dims, config.depths)):
            stages.append(Stage(
                prev_dim, dim, depth, first=i == 0, num_heads=config.num_heads[i], mlp_ratio=config.mlp_ratios[i],
                sr_ratio=config.sr_ratios[i], linear=config.linear_sra, drop=drop_rate, attn_drop=attn_drop_rate,
                drop_paths=dpr[start:start + depth],
            ))
            start, prev_dim = start + depth, dim
        self.stages = nn.ModuleList(stages)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(init_weights)

    @property
    def default_cfg(self) -> dict:
        """timm's older name for ``pretrained_cfg``."""
        return self.pretrained_cfg

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass: less activation memory, more compute."""
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head with a freshly initialised one for ``num_classes`` (0 = no head);
        ``global_pool=""`` also drops the pooling, so ``forward`` returns the last stage's map."""
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = check_global_pool(global_pool)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        init_weights(self.head)

    def check_input_size(self, x: torch.Tensor) -> None:
        if x.ndim != 4:
            raise ValueError(f"PVTv2 expects a (B, C, H, W) batch, got shape {tuple(x.shape)}")
        H, W = x.shape[-2:]
        if H < MIN_INPUT_SIZE or W < MIN_INPUT_SIZE:
            raise ValueError(
                f"input {H}x{W} is too small for PVTv2: each side must be at least {MIN_INPUT_SIZE} pixels "
                f"(stage 1 needs an 8x8 spatial-reduction window); resize or pad your images"
            )

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Indices = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """The stage maps, as timm's ``forward_intermediates``: ``(last map, [maps])``, or ``[maps]`` alone.

        ``indices``: None = all four stages, n = the last n, a sequence = those (negative from the end).
        ``stop_early``: stages after the last one taken do not run. ``norm``: accepted for timm's
        signature; every stage already ends with its LayerNorm. ``output_fmt``: "NCHW" gives contiguous
        ``(B, C, H/s, W/s)`` maps (s = 4, 8, 16, 32), "NHWC" ``(B, H/s, W/s, C)`` views of the tokens (no copy).
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take, last = feature_take_indices(len(self.stages), indices)
        self.check_input_size(x)
        x = x.contiguous(memory_format=torch.channels_last)  # so the first conv, too, yields tokens without a copy
        intermediates = []
        for i, stage in enumerate(self.stages[:last + 1] if stop_early else self.stages):
            x = stage(x)  # a channels-last view of the stage's tokens
            if i in take:
                intermediates.append(x.contiguous() if output_fmt == "NCHW" else x.permute(0, 2, 3, 1))
        return intermediates if intermediates_only else (x, intermediates)

    def prune_intermediate_layers(self, indices: Indices = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the stages after the last of ``indices`` and (with ``prune_head`` or such a cut) the head.

        Returns the absolute indices. ``prune_norm`` is accepted for timm's signature: the stage norms
        are part of the stage maps, so there is nothing separate to drop.
        """
        take, last = feature_take_indices(len(self.stages), indices)
        cut = last < len(self.stages) - 1
        self.stages = self.stages[:last + 1]
        self.feature_info = self.feature_info[:last + 1]
        if cut:
            self.num_features = self.feature_info[-1]["num_chs"]
        if prune_head or cut:
            self.reset_classifier(0, "")
        return take

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> the last stage's map (B, C4, H/32, W/32), channels-last (a view of its tokens)."""
        self.check_input_size(x)
        x = x.contiguous(memory_format=torch.channels_last)
        for stage in self.stages:
            x = stage(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Last stage's map (B, C4, h, w) -> logits (B, num_classes): global mean, then linear.
        ``pre_logits``: the pooled features (B, num_features), before the head."""
        if self.global_pool == "avg":
            x = x.mean(dim=(2, 3))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def check_global_pool(global_pool: str) -> str:
    if global_pool not in ("avg", ""):
        raise ValueError(f"global_pool must be 'avg' (mean over the last map) or '' (none), got {global_pool!r}")
    return global_pool


def init_weights(m: nn.Module) -> None:
    """The official initialisation: truncated normal(0.02) linears, He-normal (fan-out) convs."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)
