"""``experiments/export.py``'s command line: options, parsing, and one export of a checkpoint or a model variant.

    python experiments/export.py --checkpoint runs/b2_li_224x224/version_0/checkpoints/best.ckpt \\
        --output b2_li.onnx --dynamic

Mistakes and failed parity checks print one line and exit 2 (``main``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Sequence, Union

from jsonargparse.typing import PositiveFloat, PositiveInt

from pvt_lightning.cli.main import main as pvt_lightning_main
from pvt_lightning.cli.limits import check_export_memory
from pvt_lightning.cli.options import option
from pvt_lightning.errors import UsageError
from pvt_lightning.export.metadata import FORMATS, model_metadata
from pvt_lightning.export.parity import TOLERANCE
from pvt_lightning.export.quantize import quantized_export
from pvt_lightning.export.trace import MIN_OPSET, ExportResult, export_checkpoint, export_model
from pvt_lightning.models import MIN_INPUT_SIZE, canonical_name, create_model
from pvt_lightning.models.registry import DEFAULT_IMG_SIZE, EVAL_CROP_PCT


@dataclass
class ExportConfig:
    """``pvt-lightning export``'s options (also ``experiments/export.py``)."""

    checkpoint: Optional[str] = option(None, "our training checkpoint (.ckpt) to export", "export",
                                       metavar="CKPT")
    variant: Optional[str] = option(None, "instead of --checkpoint: export create_model(VARIANT) with random "
                                    "weights or --pretrained", "export")
    pretrained: Optional[str] = option(None, "with --variant: a weights file (official, timm, HF or "
                                       "pvt-lightning layout)", "export")
    num_classes: PositiveInt = option(1000, "with --variant: size of the classifier head", "export")
    format: Optional[Literal[FORMATS]] = option(None, "onnx or exported-program (.pt2); default: from "
                                                "--output's suffix", "export")
    output: Optional[str] = option(None, "the file to write (.onnx or .pt2); never replaced without "
                                   "--overwrite", "export", metavar="FILE")
    img_size: Optional[list[PositiveInt]] = option(None, "traced input height and width (default: the "
                                                   "checkpoint's, else 224 224)", "export", nargs=2,
                                                   metavar=("H", "W"))
    dynamic: bool = option(False, "symbolic batch, height and width: one file for every input size from "
                           f"{MIN_INPUT_SIZE}x{MIN_INPUT_SIZE} up", "export")
    batch_size: Optional[Union[PositiveInt, Literal["dynamic"]]] = option(
        None, "a fixed batch, or dynamic (default: dynamic with --dynamic, else 1)", "export", metavar="N|dynamic")
    opset: Optional[PositiveInt] = option(None, f"ONNX opset (>= {MIN_OPSET}; default: the exporter's)",
                                          "export")
    crop_pct: Optional[float] = option(None, "evaluation crop fraction recorded in the file, for other tools "
                                       "(default: the checkpoint's own, as --evaluate and --predict use it; "
                                       f"{EVAL_CROP_PCT} for --variant or an older checkpoint)", "export")
    tolerance: PositiveFloat = option(TOLERANCE, "largest |logit difference| allowed between the export and "
                                      "the model", "export")
    overwrite: bool = option(False, "replace --output if it exists", "export")
    quantize: Optional[Literal["int8"]] = option(None, "int8: static quantization of the ONNX file, calibrated on "
                                                 "--calibration-data, written only if the accuracy gate passes "
                                                 "(export/quantize.py)", "export")
    calibration_data: Optional[str] = option(None, "--quantize: ImageFolder root; a seeded sample of its train split "
                                             "calibrates, its val split is the gate", "export", metavar="ROOT")
    max_accuracy_drop: float = option(0.5, "--quantize: largest top-1 loss allowed on val, in points", "export")
    max_recall_drop: float = option(1.0, "--quantize: largest loss of the macro recall at precision 0.9 on val, "
                                    "in points", "export")


CONFIG = ExportConfig


def check_export_config(config: ExportConfig) -> None:
    """What the types cannot say: one source of weights, an output file, flags that go together."""
    if (config.checkpoint is None) == (config.variant is None):
        raise UsageError("give either --checkpoint CKPT (a training checkpoint) or --variant NAME")
    if config.output is None:
        raise UsageError("--output FILE is required (e.g. model.onnx or model.pt2)")
    if config.checkpoint and not Path(config.checkpoint).expanduser().is_file():
        raise UsageError(f"--checkpoint {config.checkpoint}: no such file")
    if config.pretrained and not config.variant:
        raise UsageError("--pretrained goes with --variant; a --checkpoint carries its own weights")


def run_export(config) -> ExportResult:
    """Export as ``config`` (an ExportConfig) says; ``--quantize int8`` exports fp32 first, then quantizes it."""
    if config.quantize or config.calibration_data:
        return quantized_export(config, run_export)
    options = dict(format=config.format, dynamic=config.dynamic, batch_size=config.batch_size, opset=config.opset,
                   overwrite=config.overwrite, tolerance=config.tolerance)
    if config.checkpoint:
        return export_checkpoint(config.checkpoint, config.output, img_size=config.img_size,
                                 crop_pct=config.crop_pct, **options)
    try:
        variant = canonical_name(config.variant)
    except ValueError as err:
        raise UsageError(f"--variant: {err}") from None
    model = create_model(variant, config.num_classes, pretrained=config.pretrained)
    img_size = tuple(config.img_size or DEFAULT_IMG_SIZE)
    metadata = model_metadata(model, variant=variant, img_size=img_size, crop_pct=config.crop_pct)
    return export_model(model, config.output, img_size=img_size, metadata=metadata, **options)


def run(config: ExportConfig) -> int:
    """``pvt-lightning export``: write the file, check it against the model, say what was written."""
    check_export_config(config)
    check_export_memory(config)  # before tracing: a size that cannot fit in memory is refused
    result = run_export(config)
    meta = result.metadata
    shape = (f"({'batch' if meta.dynamic_batch else meta.batch_size}, 3, "
             + (f"height, width) from {meta.min_input_size}x{meta.min_input_size}" if meta.dynamic_size
                else f"{meta.img_size[0]}, {meta.img_size[1]})"))
    print(f"wrote {result.path} ({result.format}, {result.size_mb:.1f} MB): {meta.variant}, {meta.num_classes} "
          f"classes, input {shape}")
    for check in result.checks:
        print(f"  parity vs eager at {check}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``experiments/export.py``: the same as ``pvt-lightning export``."""
    return pvt_lightning_main(["export", *(sys.argv[1:] if argv is None else argv)])
