"""Export for deployment: a model or checkpoint traced to an ONNX or ``torch.export`` (.pt2) file for any input size.

    from pvt_lightning.export.trace import export_checkpoint

    export_checkpoint("runs/b2_li_224x224/version_0/checkpoints/best.ckpt", "b2_li.onnx", dynamic=True)

What makes one file serve every input size:

- Shapes are declared with ``torch.export``'s ``ShapesSpec`` (unbacked symbols), not ``Dim.DYNAMIC``:
  backed symbols get 0/1-specialised by the convolution's memory-format check on our channels-last
  maps, which silently limits the graph to batch >= 2 and sides >= 33 (61 for some widths).
- Linear SRA pools keys/values to 7x7 with averaging matmuls built from the symbolic height and width
  while exporting (``pool_tokens`` in the models), so no index or bin is baked from the traced size.

The file is written only after the parity check (``export.parity``) passed. It carries the class names and
the model's preprocessing (``export.metadata``): a checkpoint's own, unless ``crop_pct`` overrides the crop.
``onnx`` and ``onnxscript`` are the optional ``[export]`` extra; they are imported only when needed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from pvt_lightning.errors import ExportError
from pvt_lightning.export.metadata import METADATA_FILE, ExportMetadata, export_format, model_metadata
from pvt_lightning.export.optional import require
from pvt_lightning.export.parity import TOLERANCE, ParityCheck, check_parity, example_input
from pvt_lightning.export.runtime import ExportedClassifier, OnnxClassifier, ProgramClassifier, load_classifier
from pvt_lightning.models import MIN_INPUT_SIZE
from pvt_lightning.models.registry import DEFAULT_IMG_SIZE, Preprocessing
from pvt_lightning.runs.io import check_output, write_file

INPUT_NAME, OUTPUT_NAME = "images", "logits"
MIN_OPSET = 18
"""The dynamo ONNX exporter's lowest opset; torch's default is 20 (native Gelu)."""


def trace(model: nn.Module, example: torch.Tensor, dynamic_batch: bool, dynamic_size: bool,
          min_size: int = MIN_INPUT_SIZE) -> torch.export.ExportedProgram:
    """``torch.export`` of ``model`` on ``example`` (B, 3, H, W); the dynamic dims are unbacked symbols
    (no 0/1 specialisation), so the graph holds for batch >= 1 and sides >= ``min_size``."""
    if not (dynamic_batch or dynamic_size):
        return torch.export.export(model, (example,))
    from torch.fx.experimental.dynamic_spec import ParamsSpec, ShapesSpec, ShapeVar, TensorSpec

    _, _, height, width = example.shape
    batch = ShapeVar("batch", min=1) if dynamic_batch else example.shape[0]
    if dynamic_size:
        height, width = ShapeVar("height", min=min_size), ShapeVar("width", min=min_size)
    spec = ShapesSpec(params=ParamsSpec({_first_arg(model): TensorSpec([batch, 3, height, width])}))
    return torch.export.export(model, (example,), dynamic_shapes=spec)


def _first_arg(model: nn.Module) -> str:
    import inspect

    return next(iter(inspect.signature(model.forward).parameters))


# --- ONNX ----------------------------------------------------------------------------------------------

def onnx_bytes(program: torch.export.ExportedProgram, example: torch.Tensor, metadata: ExportMetadata,
               opset: int | None = None) -> bytes:
    """The ExportedProgram as a serialised ONNX model with named dims (batch, height, width) and metadata."""
    for module in ("onnx", "onnxscript"):
        require(module)
    if opset is not None and opset < MIN_OPSET:
        raise ExportError(f"--opset {opset}: the ONNX exporter writes opset {MIN_OPSET} or newer")
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its progress
        onnx_program = torch.onnx.export(program, (example,), dynamo=True, input_names=[INPUT_NAME],
                                         output_names=[OUTPUT_NAME], opset_version=opset)
    proto = onnx_program.model_proto
    reached = next(op.version for op in proto.opset_import if op.domain in ("", "ai.onnx"))
    if opset is not None and reached != opset:
        raise ExportError(f"--opset {opset}: the exporter could only write opset {reached}; pass --opset {reached}")
    name_dims(proto)
    proto.producer_name = "pvt-lightning"
    proto.doc_string = (f"pvt-lightning {metadata.variant}: normalised float {INPUT_NAME} (batch, 3, height, width) -> "
                        f"{OUTPUT_NAME} (batch, {metadata.num_classes})")
    del proto.metadata_props[:]
    for key, value in metadata.to_strings().items():
        proto.metadata_props.add(key=key, value=value)
    if proto.ByteSize() >= 2**31:
        raise ExportError("the model is over ONNX's 2 GB single-file limit")
    return proto.SerializeToString()


def name_dims(proto) -> None:
    """Rename the exporter's symbols (u0, s1...) on the input's batch/height/width to those words, everywhere."""
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    names = {dims[i].dim_param: word for i, word in ((0, "batch"), (2, "height"), (3, "width")) if dims[i].dim_param}
    for value in list(proto.graph.input) + list(proto.graph.output) + list(proto.graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in names:
                dim.dim_param = names[dim.dim_param]


def program_bytes(program: torch.export.ExportedProgram, metadata: ExportMetadata) -> bytes:
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={METADATA_FILE: json.dumps(metadata.to_strings())})
    return buffer.getvalue()


# --- export ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ExportResult:
    path: Path
    format: str
    metadata: ExportMetadata
    checks: list[ParityCheck]
    size_mb: float


def export_model(model: nn.Module, output: str | Path, *, format: str | None = None,
                 img_size: Sequence[int] = DEFAULT_IMG_SIZE, dynamic: bool = False, batch_size: int | str | None = None,
                 opset: int | None = None, metadata: ExportMetadata | None = None, overwrite: bool = False,
                 tolerance: float = TOLERANCE) -> ExportResult:
    """Export ``model`` (any ``create_model`` model, in eval mode) to ``output`` (.onnx or .pt2).

    ``dynamic``: batch, height and width symbolic (one file for every size >= the model's minimum);
    ``batch_size``: an int fixes the batch (also with ``dynamic``), "dynamic" frees it (also without);
    default: dynamic with ``dynamic``, else 1. The file is written (atomically, never over an existing
    file unless ``overwrite``) only after the parity check passed.
    """
    output = check_output(output, overwrite)  # before minutes of export
    format = export_format(output, format)
    if format == "onnx":
        require("onnxruntime")
        if opset is not None and opset < MIN_OPSET:
            raise ExportError(f"--opset {opset}: the ONNX exporter writes opset {MIN_OPSET} or newer")
    elif opset is not None:
        raise ExportError("--opset applies to --format onnx only")
    img_size = (int(img_size[0]), int(img_size[1]))
    if min(img_size) < MIN_INPUT_SIZE:
        raise ExportError(f"--img-size {img_size[0]} {img_size[1]}: each side must be at least {MIN_INPUT_SIZE}")
    if any(t.device.type != "cpu" for t in [*model.parameters(), *model.buffers()]):
        raise ExportError("export traces on the CPU: pass model.cpu() (the ONNX file still runs on GPUs)")
    dynamic_batch, fixed_batch = resolve_batch(batch_size, dynamic)
    metadata = dataclasses.replace(metadata or model_metadata(model, img_size=img_size), img_size=img_size,
                                   dynamic_batch=dynamic_batch, dynamic_size=dynamic, batch_size=fixed_batch)
    model.eval()
    example = example_input(2 if dynamic_batch else fixed_batch, img_size)
    with torch.no_grad():
        program = trace(model, example, dynamic_batch, dynamic)
    if format == "onnx":
        data = onnx_bytes(program, example, metadata, opset)
        exported: ExportedClassifier = OnnxClassifier(data)
    else:
        data = program_bytes(program, metadata)
        exported = ProgramClassifier(data)
    checks = check_parity(model, exported, tolerance, name=f"the {format} export of {metadata.variant}")
    write_file(output, data, overwrite=overwrite)
    return ExportResult(output, format, metadata, checks, len(data) / 2**20)


def resolve_batch(batch_size: int | str | None, dynamic: bool) -> tuple[bool, int | None]:
    """(dynamic batch?, fixed batch or None)."""
    if batch_size is None:
        return (True, None) if dynamic else (False, 1)
    if batch_size == "dynamic":
        return True, None
    try:
        batch = int(batch_size)
    except (TypeError, ValueError):
        batch = 0
    if batch < 1:
        raise ExportError(f"--batch-size {batch_size}: give a positive number or 'dynamic'")
    return False, batch


def export_checkpoint(checkpoint: str | Path, output: str | Path, *, format: str | None = None,
                      img_size: Sequence[int] | None = None, crop_pct: float | None = None,
                      **kwargs: Any) -> ExportResult:
    """Export one of our training checkpoints with its own preprocessing (input size, crop, mean/std; the
    defaults where an older checkpoint records none); ``img_size`` and ``crop_pct`` (the flags) override them.

    Other keyword arguments as ``export_model`` (``dynamic``, ``batch_size``, ``opset``, ``overwrite``...).
    """
    check_output(output, kwargs.get("overwrite", False))
    export_format(output, format)
    module = load_classifier(checkpoint)
    hp = module.hparams
    preprocessing = Preprocessing.from_dict(dict(hp)).replace(img_size=img_size or None, crop_pct=crop_pct)
    metadata = ExportMetadata.from_preprocessing(preprocessing, variant=hp.variant, class_names=tuple(hp.class_names),
                                                 linear_sra=module.linear_sra_enabled,
                                                 task=hp.get("task", "multiclass"), threshold=hp.get("threshold", 0.5))
    return export_model(module.model, output, format=format, img_size=metadata.img_size, metadata=metadata, **kwargs)
