"""Static int8 quantization of an ONNX export, calibrated on real images and kept only if an accuracy gate passes.

    experiments/export.py --checkpoint best.ckpt --output model_int8.onnx --dynamic \\
        --quantize int8 --calibration-data data/digits

The fp32 graph is exported (and parity-checked) into a temporary folder, quantized with onnxruntime's
``quantize_static`` (per-channel int8 weights, uint8 activations with MinMax ranges from a seeded sample of
the ImageFolder's train split, val where there is no train split; Conv, Gemm and the MatMuls of a weight
quantized, the rest left in float), then both graphs are evaluated on the val split: top-1 accuracy, and the macro recall at
precision 0.9 (one-vs-rest per class, torchmetrics ``MulticlassRecallAtFixedPrecision``, mean over classes).
If int8 loses more than ``max_accuracy_drop`` / ``max_recall_drop`` points, nothing is written and
``ExportError`` (exit 2) names both figures. The file's metadata gains a ``quantization`` entry (mode,
format, per_channel, calibration set path, split and image count, the gate's figures) next to the usual keys.
Dynamic batch and input sizes carry over: quantization parameters do not depend on the shapes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from pvt_lightning.errors import DataError, ExportError

QUANT_FORMATS = ("qoperator", "qdq")
DEFAULT_FORMAT = "qoperator"
"""Measured faster than QDQ on this project's CPU runs (experiments/results/int8_cpu.md)."""
QUANTIZED_OPS = ("Conv", "MatMul", "Gemm")
CALIBRATION_IMAGES = 256
MIN_PRECISION = 0.9
METADATA_KEY = "quantization"


@dataclass(frozen=True)
class GateResult:
    """fp32 and int8 figures on the val split (fractions), and the allowed drops (points)."""

    images: int
    fp32_top1: float
    int8_top1: float
    fp32_recall: float
    int8_recall: float
    max_accuracy_drop: float
    max_recall_drop: float

    @property
    def accuracy_drop(self) -> float:
        return 100 * (self.fp32_top1 - self.int8_top1)

    @property
    def recall_drop(self) -> float:
        return 100 * (self.fp32_recall - self.int8_recall)

    @property
    def passed(self) -> bool:
        return self.accuracy_drop <= self.max_accuracy_drop and self.recall_drop <= self.max_recall_drop

    def lines(self) -> list[str]:
        at = f"recall@precision{MIN_PRECISION:g}"
        return [f"int8 gate on {self.images} val images:",
                f"  top-1     fp32 {100 * self.fp32_top1:6.2f}%  int8 {100 * self.int8_top1:6.2f}%  drop "
                f"{self.accuracy_drop:+.2f} points (max {self.max_accuracy_drop:g})",
                f"  {at} fp32 {100 * self.fp32_recall:6.2f}%  int8 {100 * self.int8_recall:6.2f}%  drop "
                f"{self.recall_drop:+.2f} points (max {self.max_recall_drop:g})"]

    def as_dict(self) -> dict[str, Any]:
        return {"val_images": self.images, "fp32_top1": self.fp32_top1, "int8_top1": self.int8_top1,
                "fp32_recall_at_precision": self.fp32_recall, "int8_recall_at_precision": self.int8_recall,
                "min_precision": MIN_PRECISION}


@dataclass(frozen=True)
class OnnxFile:
    """An ONNX export as quantization needs it: its metadata (``metadata_props``) and a CPU session for logits.

    (``export/runtime.py`` has the full loaders; this reads only what the gate and the metadata need.)"""

    path: Path
    props: dict[str, str]

    @classmethod
    def read(cls, path: str | Path) -> "OnnxFile":
        import onnx

        proto = onnx.load(str(path), load_external_data=False)
        return cls(Path(path), {p.key: p.value for p in proto.metadata_props})

    def __getattr__(self, name: str) -> Any:  # img_size, crop_pct, mean, std, class_names, batch_size...
        if name in ("path", "props") or name not in self.props:
            raise AttributeError(name)
        return json.loads(self.props[name])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def runner(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """float (B, 3, H, W) -> logits (B, C) with onnxruntime on the CPU (a fixed-batch file gets padded chunks)."""
        import onnxruntime as ort

        session = ort.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
        name, fixed = session.get_inputs()[0].name, None if self.dynamic_batch else self.batch_size

        def run(x: torch.Tensor) -> torch.Tensor:
            array = x.numpy()
            if not fixed:
                return torch.from_numpy(session.run(None, {name: array})[0])
            parts = []
            for i in range(0, len(array), fixed):
                part = array[i:i + fixed]
                padded = np.concatenate([part, np.repeat(part[-1:], fixed - len(part), axis=0)])
                parts.append(session.run(None, {name: padded})[0][:len(part)])
            return torch.from_numpy(np.concatenate(parts))

        return run


# --- images -----------------------------------------------------------------------------------------------------

def image_batches(root: str | Path, split: str, metadata, limit: int | None = None, seed: int = 0,
                  batch_size: int = 16) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """Normalised float (B, 3, H, W) arrays and class indices of ``split`` (a seeded sample of ``limit`` images),
    preprocessed as evaluation does with the export's size, crop and mean/std; the classes must be the model's."""
    from torch.utils.data import DataLoader

    from pvt_lightning.data import ImageFolderDataModule
    from pvt_lightning.data.dataset import BadImageLog, CollateDroppingBad, ImageDataset
    from pvt_lightning.data.transforms import eval_transform, resize_target

    size = tuple(int(s) for s in metadata.img_size)
    module = ImageFolderDataModule(root, img_size=size, crop_pct=metadata.crop_pct, mean=metadata.mean,
                                   std=metadata.std, num_workers=0)
    if list(module.class_names) != list(metadata.class_names):
        raise DataError(f"--calibration-data {root}: its classes {module.class_names[:10]} are not the model's "
                        f"{list(metadata.class_names)[:10]}; give the data set the model was trained on")
    samples = list(module.samples(split))
    if limit is not None and len(samples) > limit:
        order = np.random.default_rng(seed).permutation(len(samples))[:limit]
        samples = [samples[i] for i in sorted(order)]
    with tempfile.TemporaryDirectory(prefix="pvt_lightning_int8_") as folder:
        dataset = ImageDataset(samples, eval_transform(size, metadata.crop_pct), BadImageLog(Path(folder) / "bad.txt"),
                               min_side=max(resize_target(size, metadata.crop_pct)),
                               max_pixels=module.max_image_pixels, split=split, class_names=module.class_names)
        for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=CollateDroppingBad()):
            if batch is not None:
                images, labels = batch
                yield module.normalize(images).numpy(), labels


def calibration_split(root: str | Path) -> str:
    """train when the folder has one, else val."""
    return "train" if (Path(root).expanduser() / "train").is_dir() else "val"


class CalibrationReader:
    """onnxruntime's CalibrationDataReader over ``image_batches``, read into memory (a few hundred crops), served
    one window of batches at a time (``set_range``: the calibrator's strided mode, so it keeps the intermediate
    outputs of one batch, not of all). A fixed-batch graph gets full batches (the last one padded)."""

    def __init__(self, batches: Iterator[tuple[np.ndarray, torch.Tensor]], input_name: str, fixed_batch: int | None):
        self.input_name = input_name
        self.batches = [images for images, _ in batches]
        self.images = sum(len(images) for images in self.batches)
        if fixed_batch:
            self.batches = [np.concatenate([b, np.repeat(b[-1:], fixed_batch - len(b), axis=0)])
                            if len(b) < fixed_batch else b for b in self.batches]
        self.set_range(0, len(self.batches))

    def __len__(self) -> int:
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.window = iter(self.batches[start_index:end_index])

    def get_next(self) -> dict[str, np.ndarray] | None:
        images = next(self.window, None)
        return None if images is None else {self.input_name: images}


# --- quantization -----------------------------------------------------------------------------------------------

def quantize_onnx(fp32: str | Path, output: str | Path, reader: CalibrationReader, fmt: str = DEFAULT_FORMAT,
                  per_channel: bool = True) -> None:
    """``quantize_static`` of the file ``fp32`` into ``output`` (int8 weights, uint8 activations, MinMax ranges).

    MatMuls are quantized where one side is a weight (``MatMulConstBOnly``): the attention products of two
    activations stay in float, which measured faster (no quantize/dequantize pair around each) and keeps the
    softmax inputs exact."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if fmt not in QUANT_FORMATS:
        raise ExportError(f"unknown quantization format {fmt!r}; choose one of {', '.join(QUANT_FORMATS)}")
    if reader.images == 0:
        raise DataError("no readable calibration image; check --calibration-data")
    with _quiet_root_logger():  # onnxruntime warns through the root logger (pre-processing advice, rank-1 axes)
        quantize_static(str(fp32), str(output), reader,
                        quant_format=QuantFormat.QOperator if fmt == "qoperator" else QuantFormat.QDQ,
                        op_types_to_quantize=list(QUANTIZED_OPS), per_channel=per_channel,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax,
                        extra_options={"CalibStridedMinMax": 1, "MatMulConstBOnly": True})


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """Root-logger records below ERROR dropped, and no handler left behind by ``logging.warning``'s basicConfig."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)
        root.handlers[:] = handlers


def with_metadata(path: str | Path, props: dict[str, str], quantization: dict[str, Any]) -> bytes:
    """The ONNX file at ``path`` with ``props`` (the export's metadata) and the quantization record."""
    import onnx

    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    for key, value in {**props, METADATA_KEY: json.dumps(quantization)}.items():
        proto.metadata_props.add(key=key, value=value)
    return proto.SerializeToString()


@torch.inference_mode()
def accuracy_gate(fp32, int8, batches: Iterator[tuple[np.ndarray, torch.Tensor]], num_classes: int,
                  max_accuracy_drop: float, max_recall_drop: float) -> GateResult:
    """Top-1 and macro recall at precision 0.9 of two classifiers (float batch -> logits) on the same batches."""
    logits: dict[str, list[torch.Tensor]] = {"fp32": [], "int8": []}
    targets = []
    for images, labels in batches:
        x = torch.from_numpy(images)
        logits["fp32"].append(fp32(x).float())
        logits["int8"].append(int8(x).float())
        targets.append(labels)
    if not targets:
        raise DataError("no readable val image to check the int8 model on; check --calibration-data")
    target = torch.cat(targets)
    figures = {name: _top1_and_recall(torch.cat(values), target, num_classes) for name, values in logits.items()}
    return GateResult(len(target), figures["fp32"][0], figures["int8"][0], figures["fp32"][1], figures["int8"][1],
                      max_accuracy_drop, max_recall_drop)


def _top1_and_recall(logits: torch.Tensor, target: torch.Tensor, num_classes: int) -> tuple[float, float]:
    from torchmetrics.classification import MulticlassRecallAtFixedPrecision

    metric = MulticlassRecallAtFixedPrecision(num_classes, min_precision=MIN_PRECISION)
    recall, _ = metric(logits.softmax(dim=-1), target)
    return (logits.argmax(dim=-1) == target).float().mean().item(), recall.float().mean().item()


# --- the export command's --quantize int8 -------------------------------------------------------------------------

def quantized_export(config, export: Callable, say: Callable[[str], None] = print, fmt: str = DEFAULT_FORMAT,
                     calibration_images: int = CALIBRATION_IMAGES):
    """``--quantize int8``: ``export`` (the export command's ``run_export``) writes the fp32 graph to a temporary
    file, which is quantized and gated; the int8 file is written to ``config.output`` only if the gate passes."""
    from pvt_lightning.runs.io import check_output, write_file

    output = _check_quantize_config(config)
    check_output(output, config.overwrite)
    root = Path(config.calibration_data).expanduser()
    with tempfile.TemporaryDirectory(prefix="pvt_lightning_int8_") as folder:
        fp32_path, int8_path = Path(folder) / "fp32.onnx", Path(folder) / "int8.onnx"
        result = export(dataclasses.replace(config, quantize=None, calibration_data=None, output=str(fp32_path),
                                            overwrite=True))
        meta = OnnxFile.read(fp32_path)
        split = calibration_split(root)
        reader = CalibrationReader(image_batches(root, split, meta, limit=calibration_images,
                                                 batch_size=meta.batch_size or 8),
                                   "images", None if meta.dynamic_batch else meta.batch_size)
        quantize_onnx(fp32_path, int8_path, reader, fmt=fmt)
        say(f"quantized the fp32 graph to int8 ({fmt}, per-channel weights) on {reader.images} {split} images of "
            f"{root}")
        gate = accuracy_gate(meta.runner(), OnnxFile.read(int8_path).runner(),
                             image_batches(root, "val", meta, batch_size=meta.batch_size or 16), meta.num_classes,
                             config.max_accuracy_drop, config.max_recall_drop)
        for line in gate.lines():
            say(line)
        if not gate.passed:
            raise ExportError(f"int8 refused: top-1 drops {gate.accuracy_drop:.2f} points (--max-accuracy-drop "
                              f"{config.max_accuracy_drop:g}), recall at precision {MIN_PRECISION:g} drops "
                              f"{gate.recall_drop:.2f} points (--max-recall-drop {config.max_recall_drop:g}); "
                              f"nothing was written")
        record = {"mode": "int8-static", "format": fmt.upper() if fmt == "qdq" else "QOperator",
                  "per_channel": True, "activations": "uint8", "weights": "int8", "ops": list(QUANTIZED_OPS), "matmul_const_b_only": True,
                  "calibration_data": str(root.resolve()), "calibration_split": split,
                  "calibration_images": reader.images, "gate": gate.as_dict()}
        data = with_metadata(int8_path, meta.props, record)
        write_file(output, data, overwrite=config.overwrite)
    return dataclasses.replace(result, path=output, size_mb=len(data) / 2**20)


def _check_quantize_config(config) -> Path:
    from pvt_lightning.errors import UsageError

    if config.quantize is None:
        raise UsageError("--calibration-data goes with --quantize int8")
    if config.quantize != "int8":
        raise UsageError(f"--quantize {config.quantize}: only int8 is supported")
    if config.calibration_data is None:
        raise UsageError("--quantize int8 needs --calibration-data ROOT (an ImageFolder with train/ and val/)")
    if not Path(config.calibration_data).expanduser().is_dir():
        raise UsageError(f"--calibration-data {config.calibration_data}: no such folder")
    output = Path(config.output).expanduser()
    if output.suffix.lower() != ".onnx" or (config.format not in (None, "onnx")):
        raise UsageError("--quantize int8 writes ONNX: name --output FILE.onnx (no --format exported-program)")
    return output


def read_quantization(path: str | Path) -> dict[str, Any] | None:
    """The quantization record of an ONNX file (None for an fp32 export)."""
    import onnx

    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return json.loads(props[METADATA_KEY]) if METADATA_KEY in props else None
