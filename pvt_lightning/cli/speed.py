"""``pvt-lightning speed``: re-measure a trained model's inference speed on this machine, next to its run.

    pvt-lightning speed --checkpoint runs/b0_32x32/version_0/checkpoints/last.ckpt [--batch-size N]
        [--img-size H W] [--device cpu|cuda] [--precision P] [--seconds S]

The checkpoint is always measured eagerly; the run's exported ``.onnx`` / ``.pt2`` files (anywhere under its
version folder) too, or, given an exported file, that file and the run's checkpoint. Each measurement
(``training/inference_speed.py``: images/s at the batch size and at batch 1, batch-1 latency p50/p90) is
appended to ``inference_measurements.json`` in the run folder; summary.json, whose ``inference`` block was
measured where the run was trained, is never touched.
"""

from __future__ import annotations

import datetime
import json
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from jsonargparse.typing import PositiveFloat, PositiveInt

from pvt_lightning.cli.assemble import resolve_precision, say
from pvt_lightning.cli.config import require
from pvt_lightning.cli.options import option
from pvt_lightning.errors import DataError, UsageError
from pvt_lightning.export.runtime import is_exported_file, load_classifier, load_exported
from pvt_lightning.runs.io import write_file
from pvt_lightning.runs.rundir import VERSION, read_summary
from pvt_lightning.training.inference_speed import DEFAULT_SECONDS, describe_device, measure_inference_speed

MEASUREMENTS_FILE = "inference_measurements.json"
DEFAULT_BATCH_SIZE = 32


@dataclass
class SpeedConfig:
    """What to measure, where, and for how long."""

    checkpoint: Optional[str] = option(None, "a .ckpt, or an exported .onnx / .pt2 file (required)", "speed",
                                       metavar="FILE")
    batch_size: Optional[PositiveInt] = option(None, "batch of the images/s figure (default: the run's training "
                                               f"batch size from its summary.json, else {DEFAULT_BATCH_SIZE})",
                                               "speed")
    img_size: Optional[list[PositiveInt]] = option(None, "input height and width (default: the model's)", "speed",
                                                   nargs=2, metavar=("H", "W"))
    device: Literal["auto", "cpu", "cuda"] = option("auto", "where the eager model runs (auto: cuda when "
                                                    "available); exported files run where their runtime does",
                                                    "speed")
    precision: Literal["auto", "32", "bf16-mixed", "16-mixed"] = option(
        "auto", "the eager model's precision (auto: bf16-mixed on a GPU that supports it, else 32); exported files "
        "run as exported", "speed")
    seconds: PositiveFloat = option(DEFAULT_SECONDS, "timed seconds per model, both batch sizes together (warm-up "
                                    "on top)", "speed")
    exported: bool = option(True, "also measure the run's exported .onnx/.pt2 files (or, given one, also the run's "
                            "checkpoint eagerly); --no-exported: only --checkpoint", "speed")
    output: Optional[str] = option(None, f"JSON list the measurements are appended to (default: {MEASUREMENTS_FILE} "
                                   "in the run folder, else next to --checkpoint)", "speed", metavar="FILE")


CONFIG = SpeedConfig


def run(config: SpeedConfig) -> int:
    require(config, "checkpoint", command="speed")
    path = Path(config.checkpoint).expanduser().resolve()
    run_dir = run_folder_of(path)
    summary = read_summary(run_dir) if run_dir is not None else None
    device = "cuda" if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()) else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here; use --device cpu")
    precision = resolve_precision(config.precision, "gpu" if device == "cuda" else "cpu")
    batch_size = config.batch_size or (summary or {}).get("batch_size") or DEFAULT_BATCH_SIZE
    output = Path(config.output).expanduser() if config.output else (run_dir or path.parent) / MEASUREMENTS_FILE
    records = read_measurements(output)
    for model_path in models_to_measure(path, run_dir, summary, config.exported):
        record = measure_file(model_path, config, device, precision, batch_size)
        records.append(record)
        say(describe(record))
        write_file(output, json.dumps(records, indent=2) + "\n", overwrite=True)  # each one kept as it comes
    say(f"Appended to {output} ({len(records)} measurements in all); summary.json's training-time figures unchanged")
    return 0


def run_folder_of(path: Path) -> Path | None:
    """The ``version_N`` run folder ``path`` lies in (a checkpoint in its ``checkpoints/``, an export anywhere
    below it), or None."""
    for folder in list(path.parents)[:4]:
        marked = (folder / "hparams.yaml").is_file() or (folder / "summary.json").is_file()
        if VERSION.fullmatch(folder.name) and marked:
            return folder
    return None


def models_to_measure(path: Path, run_dir: Path | None, summary: dict | None, exported: bool) -> list[Path]:
    """``path`` first; with ``exported``, the run's exported files (for a checkpoint) or its checkpoint (for an
    exported file)."""
    models = [path]
    if not exported or run_dir is None:
        return models
    if is_exported_file(path):
        checkpoints = (summary or {}).get("checkpoints") or {}
        found = [Path(p) for p in (checkpoints.get("best"), checkpoints.get("last")) if p and Path(p).is_file()]
        found = found or sorted((run_dir / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime)[-1:]
        return found[:1] + models
    files = sorted(p.resolve() for suffix in ("*.onnx", "*.pt2") for p in run_dir.rglob(suffix))
    return models + [p for p in files if p != path]


def measure_file(path: Path, config: SpeedConfig, device: str, precision: str, batch_size: int) -> dict[str, Any]:
    """One record: the ``inference`` block's fields plus what was measured, when and where."""
    if is_exported_file(path):
        model = load_exported(path, device=device)
        runtime = "onnxruntime" if path.suffix.lower() == ".onnx" else "torch.export"
        providers = model.session.get_providers() if runtime == "onnxruntime" else []
        where, precision = ("cuda" if "CUDAExecutionProvider" in providers[:1] else "cpu"), "32"
        inputs_on = "cpu"  # the runtimes take host tensors (ONNX copies to its provider, .pt2 runs on the CPU)
    else:
        model = load_classifier(path).to(device)
        runtime, where, inputs_on = "eager", device, device
    img_size = config.img_size or list(model.hparams["img_size"])
    try:
        block = measure_inference_speed(model.eval(), img_size, batch_size, inputs_on, precision, config.seconds)
    except ValueError as err:  # an exported file's fixed input size
        raise UsageError(f"--img-size {img_size[0]} {img_size[1]}: {err}") from None
    block["device"] = describe_device(where)
    return {**block, "runtime": runtime, "file": str(path), "seconds": config.seconds,
            "measured_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(), "torch": torch.__version__}


def read_measurements(output: Path) -> list[dict[str, Any]]:
    """The measurements already in ``output`` (a JSON list), or none; a file that is no such list is left alone."""
    if not output.exists():
        return []
    try:
        records = json.loads(output.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"{output} is not a JSON list of measurements ({err}); move it away or pass --output") \
            from None
    if not isinstance(records, list):
        raise DataError(f"{output} is not a JSON list of measurements; move it away or pass --output")
    return records


def describe(record: dict[str, Any]) -> str:
    h, w = record["img_size"]
    return (f"{record['runtime']:<12} {Path(record['file']).name} | {record['device']}, {record['precision']}, "
            f"{h}x{w} | batch {record['batch_size']}: {record['img_s']:.1f} img/s | batch 1: "
            f"{record['batch1_img_s']:.1f} img/s, latency p50 {record['latency_ms_p50']:.2f} ms, p90 "
            f"{record['latency_ms_p90']:.2f} ms")
