"""The ``[export]`` extra (onnx, onnxruntime, onnxscript): imported on first use, or an error naming the extra."""

from __future__ import annotations

import importlib
from typing import Any

from pvt_lightning.errors import MissingExportDependency

EXTRA_HINT = 'pip install "pvt-lightning[export]"'


def require(module: str) -> Any:
    """Import one of the ``[export]`` extra's packages, or fail naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingExportDependency(
            f"{module} is not installed; ONNX export and inference need the export extra: {EXTRA_HINT} "
            f"(onnx, onnxruntime, onnxscript)") from err
