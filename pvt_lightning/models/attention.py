"""PVTv2's spatial-reduction attention (SRA, and linear SRA's fixed 7x7 pooling) and the token pooling it uses.

Keys/values come from a strided-conv-reduced map (``sr_ratio``) or, with linear SRA, from a map pooled to a
fixed 7x7 grid, so attention cost grows linearly with the number of pixels. ``pool_tokens`` pools that grid
without NCHW copies, and while exporting with ops that follow a symbolic input size.
"""

from __future__ import annotations

import functools
import sys

import torch
import torch.nn.functional as F
from torch import nn

from pvt_lightning.models.tokens import map_to_tokens, tokens_to_map

LINEAR_SRA_POOL = 7
"""Linear SRA pools keys/values to this fixed grid, whatever the input size."""


class SpatialReductionAttention(nn.Module):
    """Multi-head attention whose keys/values come from a spatially reduced copy of the tokens.

    ``sr_ratio > 1``: a conv with kernel = stride = sr_ratio shrinks the map by sr_ratio per side.
    ``linear=True``: the map is average-pooled to 7x7, then a 1x1 conv, LayerNorm and GELU;
    ``sr_ratio`` is ignored, so keys/values are always 49 tokens.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        sr_ratio: int = 1,
        linear: bool = False,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.linear = linear
        self.sr_ratio = 1 if linear else sr_ratio
        self.attn_drop = attn_drop

        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        if linear:
            self.sr = nn.Conv2d(dim, dim, kernel_size=1)  # applied as a linear layer on 49 tokens
            self.norm = nn.LayerNorm(dim)
            self.act = nn.GELU()
        elif sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)
            self.act = None
        else:
            self.sr = self.norm = self.act = None

    def reduce(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """Tokens the keys/values are computed from: (B, N, C) -> (B, M, C)."""
        if self.linear:
            x = pool_tokens(x, hw, LINEAR_SRA_POOL)  # (B, 49, C)
            x = F.linear(x, self.sr.weight.flatten(1), self.sr.bias)  # 1x1 conv == linear
            return self.act(self.norm(x))
        if self.sr is not None:
            x = map_to_tokens(self.sr(tokens_to_map(x, hw)))  # (B, N / sr^2, C)
            return self.norm(x)
        return x

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        B, N, C = x.shape
        q = self.q(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, N, d)
        kv = self.kv(self.reduce(x, hw))  # (B, M, 2C)
        k, v = kv.view(B, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, h, M, d)
        drop = self.attn_drop if self.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)  # (B, h, N, d)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


def pool_tokens(x: torch.Tensor, hw: tuple[int, int], size: int) -> torch.Tensor:
    """Adaptive average pool of a token map to ``size x size``: (B, H*W, C) -> (B, size^2, C).

    Pools the channels-last view of the tokens: no NCHW copy, and on CPU adaptive pooling of a
    channels-last map is much faster than of an NCHW-contiguous one. Sides that are multiples of
    ``size`` use ``avg_pool2d`` with kernel = stride (the same bins); other sides, on CUDA, two small
    averaging matmuls, because PyTorch's channels-last adaptive-pool kernel runs one thread block per
    image when the output is as small as 7x7 (measurements: docs/performance.md).
    While exporting (ONNX, ``torch.export``) every size takes the matmul path, with matrices built from
    the symbolic H and W, so one exported graph pools any input size exactly.
    """
    if is_exporting():
        return pool_tokens_by_matmul(x, hw, size)  # symbolic H, W: no branch on the traced size
    H, W = hw
    if H == size and W == size:
        return x
    if H % size == 0 and W % size == 0:
        pooled = F.avg_pool2d(tokens_to_map(x, hw), (H // size, W // size))  # channels-last view in and out
        return map_to_tokens(pooled)
    if x.is_cuda:
        return pool_tokens_by_matmul(x, hw, size)
    return map_to_tokens(F.adaptive_avg_pool2d(tokens_to_map(x, hw), size))  # (B, size^2, C)


def pool_tokens_by_matmul(x: torch.Tensor, hw: tuple[int, int], size: int) -> torch.Tensor:
    """``pool_tokens`` as separable averaging matmuls (rows, then columns): (B, H*W, C) -> (B, size^2, C)."""
    B, _, C = x.shape
    H, W = hw
    matrix = pool_matrix if is_exporting() else adaptive_pool_matrix  # SymInt sizes cannot key a cache
    pool_w = matrix(W, size, x.device, x.dtype)  # (size, W)
    pool_h = matrix(H, size, x.device, x.dtype)  # (size, H)
    x = torch.matmul(pool_w, x.view(B, H, W, C))  # (B, H, size, C)
    x = torch.matmul(pool_h, x.view(B, H, size * C))  # (B, size, size * C)
    return x.view(B, size * size, C)


@functools.lru_cache(maxsize=64)
def adaptive_pool_matrix(n: int, size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(size, n) matrix averaging adaptive pooling's bins [floor(i*n/size), ceil((i+1)*n/size)) along one axis."""
    i = torch.arange(size)
    start, end = (i * n) // size, ((i + 1) * n + size - 1) // size
    j = torch.arange(n)
    inside = (j >= start[:, None]) & (j < end[:, None])
    return (inside.double() / (end - start)[:, None]).to(device=device, dtype=dtype)


def pool_matrix(n: int | torch.SymInt, size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``adaptive_pool_matrix`` from ops that export with a symbolic ``n`` (Range, Mul, Div, compares), uncached."""
    i = torch.arange(size, device=device)
    start = torch.div(i * n, size, rounding_mode="floor")  # (size,)
    end = torch.div((i + 1) * n + size - 1, size, rounding_mode="floor")
    j = torch.arange(n, device=device)  # (n,)
    inside = (j >= start[:, None]) & (j < end[:, None])  # (size, n)
    return inside.to(dtype) / (end - start).to(dtype)[:, None]


def is_exporting() -> bool:
    """True while ``torch.export`` / ``torch.onnx.export`` traces the model (eager code paths may then differ)."""
    if torch.compiler.is_exporting():  # torch.export, and the dynamo ONNX exporter built on it
        return True
    onnx = sys.modules.get("torch.onnx")  # the TorchScript ONNX exporter; no import of torch.onnx in eager runs
    return onnx is not None and onnx.is_in_onnx_export()
