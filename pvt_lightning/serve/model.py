"""The model file a server runs: a training checkpoint (.ckpt) or an export (.onnx, .pt2), and its preprocessing.

``model_info`` reads what the HTTP side needs (class names, input size, crop, mean/std) without building a
model; ``load_model`` builds the classifier in an inference worker. A checkpoint's preprocessing is
``Preprocessing.from_dict(hparams)`` (its training size; crop and normalisation as predict uses them), an
export's is the metadata written into the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pvt_lightning.errors import CheckpointError, UsageError
from pvt_lightning.export.metadata import export_format, read_metadata
from pvt_lightning.export.runtime import OnnxClassifier, is_exported_file, load_classifier, load_exported
from pvt_lightning.models.registry import Preprocessing
from pvt_lightning.models.weights import read_state_dict_file

MODEL_SUFFIXES = (".ckpt", ".onnx", ".pt2")


@dataclass(frozen=True)
class ModelInfo:
    """What serving needs to know of a model file before loading it."""

    path: Path
    variant: str
    class_names: tuple[str, ...]
    preprocessing: Preprocessing
    task: str = "multiclass"
    threshold: float = 0.5

    def describe(self) -> dict:
        """For LitServe's ``/info``: variant, classes and preprocessing (and the task when multi-label)."""
        info = {"model": str(self.path), "variant": self.variant, "classes": list(self.class_names),
                "preprocessing": self.preprocessing.as_dict()}
        if self.task == "multilabel":
            info.update(task=self.task, threshold=self.threshold)
        return info


def check_model_path(path: str | Path) -> Path:
    """The model file as a Path; UsageError if missing or of a kind the server cannot run."""
    path = Path(path).expanduser()
    if path.suffix.lower() not in MODEL_SUFFIXES:
        raise UsageError(f"--checkpoint {path}: serve runs a training checkpoint (.ckpt) or an export (.onnx, .pt2)")
    if not path.is_file():
        raise UsageError(f"--checkpoint {path}: no such file")
    return path


def model_info(path: str | Path) -> ModelInfo:
    """Class names and preprocessing of ``path`` (.ckpt hyper-parameters, or an export's metadata)."""
    path = check_model_path(path)
    if is_exported_file(path):
        meta = read_metadata(path)
        return ModelInfo(path, meta.variant, tuple(meta.class_names), meta.preprocessing, meta.task, meta.threshold)
    hparams = dict(read_state_dict_file(path).get("hyper_parameters") or {})
    if not hparams:
        raise CheckpointError(f"{path} is not a pvt-lightning training checkpoint (.ckpt from runs/.../checkpoints)")
    names = hparams.get("class_names") or [str(i) for i in range(int(hparams["num_classes"]))]
    return ModelInfo(path, str(hparams.get("variant")), tuple(names), Preprocessing.from_dict(hparams),
                     str(hparams.get("task", "multiclass")), float(hparams.get("threshold", 0.5)))


def load_model(path: str | Path, device: str = "cpu", threads: int | None = None, spinning: bool = False) -> nn.Module:
    """The classifier of ``path`` on ``device`` in eval mode, loaded as predict loads it: normalised float
    (B, 3, H, W) -> logits (B, C). ``threads``: intra-op threads of this worker; None: the library's default."""
    path = check_model_path(path)
    if threads:
        torch.set_num_threads(threads)
    if is_exported_file(path) and export_format(path) == "onnx":
        # Idle onnxruntime threads sleep instead of spinning: between two batches the worker waits on its queue,
        # and spinning threads would take the CPU the HTTP processes need to decode the next requests.
        return OnnxClassifier(path, device=device, threads=threads, spinning=spinning).eval()
    if is_exported_file(path):
        return load_exported(path, device=device, threads=threads).eval()
    return load_classifier(path).to(device)
