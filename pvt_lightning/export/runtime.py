"""Loading models for inference: exported ``.onnx`` / ``.pt2`` files as classifier modules, and our ``.ckpt`` files.

    from pvt_lightning.export.runtime import load_exported, load_predictor

    model = load_exported("b2_li.onnx")  # nn.Module: normalised float (B, 3, H, W) -> logits (B, num_classes)
    model.class_names, model.img_size, model.mean, model.std, model.crop_pct, model.preprocessing
    model = load_predictor("runs/.../checkpoints/best.ckpt")  # or an exported file: what --predict runs

ONNX files run in onnxruntime (the optional ``[export]`` extra, imported only when needed); ``.pt2`` files are
read by ``torch.export.load`` without unpickling anything but tensors; checkpoints with ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import zipfile
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from pvt_lightning.errors import CheckpointError, ExportError
from pvt_lightning.export.metadata import METADATA_FILE, SUFFIXES, ExportMetadata, export_format
from pvt_lightning.export.optional import require
from pvt_lightning.models.weights import read_state_dict_file


def onnx_providers(device: str = "cpu") -> list[str]:
    """onnxruntime's execution providers for ``device``: CUDA first when asked for and present, else CPU."""
    available = require("onnxruntime").get_available_providers()
    if device.startswith("cuda") and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class ExportedClassifier(nn.Module):
    """An exported file as a classifier: ``forward`` maps a normalised float (B, 3, H, W) batch to logits."""

    metadata: ExportMetadata

    @property
    def class_names(self) -> list[str]:
        return list(self.metadata.class_names)

    @property
    def num_classes(self) -> int:
        return self.metadata.num_classes

    @property
    def img_size(self) -> tuple[int, int]:
        return self.metadata.img_size

    @property
    def mean(self) -> tuple[float, float, float]:
        return self.metadata.mean

    @property
    def std(self) -> tuple[float, float, float]:
        return self.metadata.std

    @property
    def crop_pct(self) -> float:
        return self.metadata.crop_pct

    @property
    def preprocessing(self):
        """The file's preprocessing as ``models.registry.Preprocessing`` (what evaluate, predict and serve apply)."""
        return self.metadata.preprocessing

    @property
    def hparams(self) -> dict[str, Any]:
        """The metadata under ImageClassifier's hyperparameter names, so inference code treats both alike."""
        from lightning.fabric.utilities.data import AttributeDict

        meta = self.metadata
        return AttributeDict(variant=meta.variant, num_classes=meta.num_classes, class_names=list(meta.class_names),
                             img_size=list(meta.img_size), mean=list(meta.mean), std=list(meta.std),
                             crop_pct=meta.crop_pct, linear_sra=meta.linear_sra, task=meta.task,
                             threshold=meta.threshold)

    def check_input(self, x: torch.Tensor) -> None:
        meta = self.metadata
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected a (B, 3, H, W) batch, got shape {tuple(x.shape)}")
        if not meta.dynamic_size and tuple(x.shape[2:]) != tuple(meta.img_size):
            raise ValueError(f"this file was exported for {meta.img_size[0]}x{meta.img_size[1]} inputs only, got "
                             f"{x.shape[2]}x{x.shape[3]}; export it with --dynamic for other sizes")
        if meta.dynamic_size and min(x.shape[2:]) < meta.min_input_size:
            raise ValueError(f"input {x.shape[2]}x{x.shape[3]} is too small: each side must be at least "
                             f"{meta.min_input_size} pixels")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, num_classes); a file with a fixed batch N runs any B in chunks of N."""
        self.check_input(x)
        n = self.metadata.batch_size
        if self.metadata.dynamic_batch or x.shape[0] == n:
            return self.run(x)
        outputs = []
        for part in x.split(n):
            missing = n - part.shape[0]
            padded = torch.cat([part, part[-1:].expand(missing, *part.shape[1:])]) if missing else part
            outputs.append(self.run(padded)[:part.shape[0]])
        return torch.cat(outputs)

    def run(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class OnnxClassifier(ExportedClassifier):
    """An ONNX file run by onnxruntime, as an ``nn.Module`` (CPU tensors in and out; CUDA tensors are
    copied through the host, the CUDA execution provider runs the graph when ``device="cuda"``)."""

    def __init__(self, source: str | Path | bytes, device: str = "cpu", threads: int | None = None,
                 spinning: bool = True):
        """``threads``: onnxruntime's intra-op threads (default: one per core). ``spinning=False`` makes idle
        worker threads sleep instead of spinning: a little more latency, but no CPU taken from other work
        (e.g. the eager step a benchmark interleaves)."""
        super().__init__()
        ort = require("onnxruntime")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        if not spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.source = "<bytes>" if isinstance(source, bytes) else str(source)
        try:
            self.session = ort.InferenceSession(source if isinstance(source, bytes) else str(source), options,
                                                providers=onnx_providers(device))
        except Exception as err:  # onnxruntime raises its own Fail/InvalidProtobuf types
            raise ExportError(f"onnxruntime cannot load {self.source}: {str(err).splitlines()[0]}") from None
        self.metadata = ExportMetadata.from_strings(self.session.get_modelmeta().custom_metadata_map, self.source)
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name

    def run(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        logits = self.session.run([self.output_name], {self.input_name: array})[0]
        return torch.from_numpy(logits).to(x.device)

    def extra_repr(self) -> str:
        return f"{self.source}, providers={self.session.get_providers()}"


def load_program(source: str | Path | bytes) -> tuple[torch.export.ExportedProgram, ExportMetadata]:
    """``torch.export.load`` of a ``.pt2`` without unpickling anything but tensors (custom and opaque
    objects are refused, every ``torch.load`` inside is forced to ``weights_only``)."""
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    data = source if isinstance(source, bytes) else Path(source).expanduser().read_bytes()
    check_archive(data, name)
    extra = {METADATA_FILE: ""}
    try:
        with _forced_weights_only():
            program = torch.export.load(io.BytesIO(data), extra_files=extra)
    except Exception as err:
        raise ExportError(f"cannot load ExportedProgram {name}: {str(err).splitlines()[0]}") from None
    try:
        props = json.loads(extra[METADATA_FILE])
    except ValueError:
        props = {}
    return program, ExportMetadata.from_strings(props, name)


def check_archive(data: bytes, name: str) -> None:
    """Refuse a .pt2 whose constants would be unpickled as arbitrary objects."""
    from torch.export.pt2_archive.constants import CUSTOM_OBJ_FILENAME_PREFIX, OPAQUE_OBJ_FILENAME_PREFIX

    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise ExportError(f"{name} is not an ExportedProgram archive (.pt2 written by torch.export.save)") from None
    for entry in archive.namelist():
        if entry.endswith("_constants_config.json"):
            config = json.loads(archive.read(entry)).get("config", {})
            pickled = (CUSTOM_OBJ_FILENAME_PREFIX, OPAQUE_OBJ_FILENAME_PREFIX)
            risky = [k for k, v in config.items() if str(v.get("path_name", "")).startswith(pickled)]
            if risky:
                raise ExportError(f"refused to load {name}: it holds pickled objects ({', '.join(risky[:3])}); "
                                  "pvt-lightning exports hold tensors only")


@contextlib.contextmanager
def _forced_weights_only() -> Iterator[None]:
    """Every ``torch.load`` in this block reads tensors only, even where the caller asked for full pickle."""
    old = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = old


class ProgramClassifier(ExportedClassifier):
    """A ``.pt2`` ExportedProgram as an ``nn.Module``; it runs on the CPU, where it was traced (inputs elsewhere
    are copied there and the logits back)."""

    def __init__(self, source: str | Path | bytes):
        super().__init__()
        program, self.metadata = load_program(source)
        self.source = "<bytes>" if isinstance(source, bytes) else str(source)
        self.program = program.module()

    def run(self, x: torch.Tensor) -> torch.Tensor:
        return self.program(x.to("cpu")).to(x.device)  # traced on the CPU: its constants live there

    def train(self, mode: bool = True) -> "ProgramClassifier":
        """The program was traced in eval mode and has no other; ``eval()``/``train()`` (Lightning calls them) only
        set the flag."""
        self.training = mode
        return self


def is_exported_file(path: str | Path) -> bool:
    """An ``.onnx`` or ``.pt2`` path (what ``load_exported`` reads), as opposed to a training checkpoint."""
    return Path(path).suffix.lower() in SUFFIXES


def load_exported(path: str | Path, device: str = "cpu", threads: int | None = None) -> ExportedClassifier:
    """An exported ``.onnx`` or ``.pt2`` file as a classifier module with its metadata."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ExportError(f"exported model not found: {path}")
    if export_format(path) == "onnx":
        return OnnxClassifier(path, device=device, threads=threads)
    return ProgramClassifier(path)


def load_classifier(path: str | Path):
    """An ImageClassifier from one of our .ckpt files, read with weights_only=True."""
    from pvt_lightning.training.module import ImageClassifier

    checkpoint = read_state_dict_file(path)  # refuses unsafe pickles with a clear message
    if not isinstance(checkpoint, dict) or "hyper_parameters" not in checkpoint:
        raise CheckpointError(f"{path} is not a pvt-lightning training checkpoint (.ckpt from runs/.../checkpoints)")
    hparams = {**checkpoint["hyper_parameters"], "pretrained": None}  # the weights are in the checkpoint
    module = ImageClassifier(**hparams)
    module.load_state_dict(checkpoint["state_dict"])
    return module.eval()


def load_predictor(path: str | Path):
    """A ``.ckpt`` as ImageClassifier, or an exported ``.onnx`` / ``.pt2`` file (onnxruntime / torch.export) as a
    classifier module with the same ``hparams`` names (class_names, img_size; mean/std from the file)."""
    if is_exported_file(path):
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return load_exported(path, device=device)
    return load_classifier(path)
