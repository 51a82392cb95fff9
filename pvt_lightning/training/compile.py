"""Regional ``torch.compile``: each PVTv2 ``Block`` (or ResNet ``Bottleneck``) compiled on its own.

Blocks of one stage run the same code on the same shapes, so one compiled graph serves all of them: b5's 40
third-stage blocks compile once, not 40 times, and compiling takes a few graphs per stage instead of one graph
of the whole network. Patch embeddings, stage norms and the head (a few cheap ops) stay eager.

How the graphs are kept few:

- Stochastic depth: every block has its own drop probability, a Python float the compiler specialises on, which
  would give each block a graph of its own. ``compile_regions`` swaps each ``DropPath`` for ``TensorDropPath``,
  the same operation with the probability in a (non-persistent) buffer, so state dicts do not change.
- ``dynamic=False`` by default: a new input size (or batch size) compiles each stage's block once more, with
  static shapes. Symbolic shapes are not used: inductor (torch 2.14, CPU) fails on PVTv2's channels-last token
  views when the token count is symbolic, and static graphs give the best kernels for the fixed training size.
- Graphs accumulate on one code object (``Block.forward``): stages x {train, eval} x input sizes, so the
  per-function recompile limit (8 by default) is raised to ``RECOMPILE_LIMIT``.
"""

from __future__ import annotations

import torch
import torch._dynamo
from torch import nn
from torchvision.models.resnet import Bottleneck

from pvt_lightning.models.pvt_v2 import Block, DropPath

RECOMPILE_LIMIT = 64
"""Compiled graphs allowed per block type before torch falls back to eager (4 stages x 2 modes x 8 sizes)."""


class TensorDropPath(nn.Module):
    """``DropPath`` with its probability in a buffer: the same per-sample drop-and-rescale, and compiled blocks
    with different probabilities share one graph."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.register_buffer("keep_prob", torch.tensor(1.0 - drop_prob), persistent=False)

    @property
    def drop_prob(self) -> float:
        return 1.0 - float(self.keep_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        keep = self.keep_prob.to(x.dtype)
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = torch.floor(keep + torch.rand(shape, device=x.device, dtype=x.dtype))  # 1 with probability keep
        return x * (mask / keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


def compile_regions(model: nn.Module, mode: str | None = None, backend: str = "inductor",
                    dynamic: bool | None = False) -> list[nn.Module]:
    """Compile every PVTv2 ``Block`` and ResNet ``Bottleneck`` of ``model`` in place; returns them.

    ``mode`` and ``backend`` are ``torch.compile``'s (e.g. ``mode="max-autotune"``); ``dynamic=None`` lets torch
    retry with symbolic shapes after a size change instead of compiling a static graph per size. The model keeps
    its state-dict keys, so checkpoints load before or after.
    """
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is DropPath:
                setattr(module, child_name, TensorDropPath(child.drop_prob).to(_device_of(module)))
    regions = [m for m in model.modules() if isinstance(m, (Block, Bottleneck))]
    if not regions:
        raise ValueError(f"{type(model).__name__} has no PVTv2 Block or ResNet Bottleneck to compile; "
                         "use torch.compile(model) for other models")
    config = torch._dynamo.config
    limit_name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.7
    setattr(config, limit_name, max(getattr(config, limit_name), RECOMPILE_LIMIT))
    for region in regions:
        region.compile(mode=mode, backend=backend, dynamic=dynamic)
    return regions


def is_compiled(module: nn.Module) -> bool:
    """True for a module compiled in place by ``module.compile()``."""
    return getattr(module, "_compiled_call_impl", None) is not None


def _device_of(module: nn.Module) -> torch.device:
    tensor = next(module.parameters(), None)
    if tensor is None:
        tensor = next(module.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")
