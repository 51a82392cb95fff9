"""Parity of an export with its model: both run on the same random inputs, and the logits must agree within a tolerance.

Every export is checked before it is written: the exported graph (onnxruntime on the CPU for ONNX,
``torch.export.load`` for ``.pt2``) runs at the traced size and, when the size is dynamic, at two more,
and must match ``model(x)`` within ``tolerance``; otherwise ``ParityError``, and nothing is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from pvt_lightning.errors import ParityError
from pvt_lightning.export.metadata import ExportMetadata
from pvt_lightning.export.runtime import ExportedClassifier, load_exported

TOLERANCE = 1e-4


def example_input(batch: int, img_size: Sequence[int], seed: int = 0) -> torch.Tensor:
    """A reproducible random (batch, 3, H, W) input: what exports are traced and checked on."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, int(img_size[0]), int(img_size[1]), generator=g)


@dataclass(frozen=True)
class ParityCheck:
    batch: int
    size: tuple[int, int]
    max_diff: float

    def __str__(self) -> str:
        return f"{self.size[0]}x{self.size[1]} (batch {self.batch}): max |diff| {self.max_diff:.2e}"


def parity_cases(metadata: ExportMetadata) -> list[tuple[int, tuple[int, int]]]:
    """(batch, (H, W)) to check: the traced size, and with a dynamic size two more (224x224 -> 384x224,
    512x320: a taller map and one where neither side is a multiple of 7 x 32); batch 2 and 1 when dynamic."""
    H, W = metadata.img_size
    batch = 2 if metadata.dynamic_batch else metadata.batch_size
    other = 1 if metadata.dynamic_batch else metadata.batch_size
    cases = [(batch, (H, W))]
    if metadata.dynamic_size:
        cases += [(other, (H + 160, W)), (other, (H + 288, W + 96))]
    elif metadata.dynamic_batch:
        cases.append((1, (H, W)))
    return cases


@torch.inference_mode()
def check_parity(model: nn.Module, exported: ExportedClassifier, tolerance: float = TOLERANCE,
                 cases: Sequence[tuple[int, tuple[int, int]]] | None = None,
                 name: str = "the export") -> list[ParityCheck]:
    """Run both on the same random inputs; raise ParityError naming the first case over ``tolerance``."""
    model.eval()
    checks = []
    for seed, (batch, size) in enumerate(cases or parity_cases(exported.metadata)):
        x = example_input(batch, size, seed=seed + 1)
        diff = (exported(x).float() - model(x).float()).abs().max().item()
        check = ParityCheck(batch, tuple(size), diff)
        if not diff <= tolerance:  # NaN fails too
            raise ParityError(f"{name} does not reproduce the model at {check} > tolerance {tolerance:g}; "
                              "nothing was written")
        checks.append(check)
    return checks


def verify_exported(path: str | Path, model: nn.Module, tolerance: float = TOLERANCE) -> list[ParityCheck]:
    """Check an exported file against ``model`` (the export-time check, on a file already written)."""
    return check_parity(model, load_exported(path), tolerance, name=str(path))
