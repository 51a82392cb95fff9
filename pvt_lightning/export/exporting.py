"""Export for deployment: ONNX and ``torch.export`` (``.pt2``) files that run at any input size.

    from pvt_lightning.export.exporting import export_checkpoint, load_exported

    export_checkpoint("runs/b2_li_224x224/version_0/checkpoints/best.ckpt", "b2_li.onnx", dynamic=True)
    model = load_exported("b2_li.onnx")  # nn.Module: normalised float (B, 3, H, W) -> logits (B, num_classes)
    model.class_names, model.img_size, model.mean, model.std, model.crop_pct

What makes one file serve every input size:

- Shapes are declared with ``torch.export``'s ``ShapesSpec`` (unbacked symbols), not ``Dim.DYNAMIC``:
  backed symbols get 0/1-specialised by the convolution's memory-format check on our channels-last
  maps, which silently limits the graph to batch >= 2 and sides >= 33 (61 for some widths).
- Linear SRA pools keys/values to 7x7 with averaging matmuls built from the symbolic height and width
  while exporting (``models.pvt_v2.pool_tokens``), so no index or bin is baked from the traced size.

Every export is checked before it is written: the exported graph (onnxruntime on the CPU for ONNX,
``torch.export.load`` for ``.pt2``) runs on random inputs at the traced size and, when the size is
dynamic, at two more, and must match ``model(x)`` within ``tolerance``; otherwise ``ParityError``.
The file carries the class names, input size, mean/std, crop fraction and variant (ONNX
``metadata_props``; ``.pt2``: ``extra/pvt_lightning.json`` inside the archive).

``onnx``, ``onnxruntime`` and ``onnxscript`` are the optional ``[export]`` extra; they are imported
only when needed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping, Optional, Sequence, Union

import torch
from jsonargparse.typing import PositiveFloat, PositiveInt
from torch import nn

from pvt_lightning.cli.config import option
from pvt_lightning.models import MIN_INPUT_SIZE
from pvt_lightning.models.registry import IMAGENET_MEAN, IMAGENET_STD
from pvt_lightning.errors import ExportError, MissingExportDependency, ParityError

FORMATS = ("onnx", "exported-program")
SUFFIXES = {".onnx": "onnx", ".pt2": "exported-program"}
INPUT_NAME, OUTPUT_NAME = "images", "logits"
METADATA_FILE = "pvt_lightning.json"
"""The metadata's name inside a ``.pt2`` archive (``torch.export.save``'s ``extra_files``)."""
TOLERANCE = 1e-4
MIN_OPSET = 18
"""The dynamo ONNX exporter's lowest opset; torch's default is 20 (native Gelu)."""
DEFAULT_CROP_PCT = 0.875
"""The evaluation crop our data pipeline uses unless told otherwise (``--crop-pct``)."""
EXTRA_HINT = 'pip install "pvt-lightning[export]"'


def require(module: str) -> Any:
    """Import one of the ``[export]`` extra's packages, or fail naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingExportDependency(
            f"{module} is not installed; ONNX export and inference need the export extra: {EXTRA_HINT} "
            f"(onnx, onnxruntime, onnxscript)") from err


# --- metadata ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ExportMetadata:
    """What a deployment needs besides the graph: classes and preprocessing, and what is dynamic."""

    variant: str
    class_names: tuple[str, ...]
    img_size: tuple[int, int]  # (H, W) the model was trained/traced at
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop_pct: float = DEFAULT_CROP_PCT
    linear_sra: bool = False
    dynamic_batch: bool = False
    dynamic_size: bool = False
    batch_size: int | None = None  # the fixed batch when not dynamic
    min_input_size: int = MIN_INPUT_SIZE

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_strings(self) -> dict[str, str]:
        """One JSON value per key (ONNX ``metadata_props`` hold strings)."""
        return {key: json.dumps(value) for key, value in dataclasses.asdict(self).items()}

    @classmethod
    def from_strings(cls, props: Mapping[str, str], source: str = "the file") -> "ExportMetadata":
        fields = {f.name for f in dataclasses.fields(cls)}
        try:
            values = {key: json.loads(props[key]) for key in fields if key in props}
            values["class_names"] = tuple(values["class_names"])
            for key in ("img_size", "mean", "std"):
                if key in values:
                    values[key] = tuple(values[key])
            return cls(**values)
        except (KeyError, TypeError, ValueError) as err:
            raise ExportError(f"{source} carries no pvt-lightning metadata (class names, input size...): {err}; "
                              "export it with experiments/export.py") from None


def model_metadata(model: nn.Module, variant: str | None = None, class_names: Sequence[str] | None = None,
                   img_size: Sequence[int] = (224, 224), crop_pct: float | None = None) -> ExportMetadata:
    """Metadata of a ``create_model`` model: its ``pretrained_cfg`` preprocessing where it has one."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    config = getattr(model, "config", None)
    num_classes = getattr(model, "num_classes", None) or _head_size(model)
    names = tuple(class_names) if class_names is not None else tuple(str(i) for i in range(num_classes))
    if len(names) != num_classes:
        raise ExportError(f"{len(names)} class names for a model with {num_classes} outputs")
    return ExportMetadata(
        variant=variant or cfg.get("architecture") or type(model).__name__, class_names=names,
        img_size=(int(img_size[0]), int(img_size[1])), mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
        std=tuple(cfg.get("std", IMAGENET_STD)), crop_pct=float(crop_pct or cfg.get("crop_pct", DEFAULT_CROP_PCT)),
        linear_sra=bool(config and config.linear_sra),
    )


def _head_size(model: nn.Module) -> int:
    head = getattr(model, "head", None) or getattr(model, "fc", None)
    if isinstance(head, nn.Linear):
        return head.out_features
    raise ExportError("cannot tell the model's number of classes; pass class_names")


# --- tracing -------------------------------------------------------------------------------------------

def example_input(batch: int, img_size: Sequence[int], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, int(img_size[0]), int(img_size[1]), generator=g)


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
    def hparams(self) -> dict[str, Any]:
        """The metadata under ImageClassifier's hyperparameter names, so inference code treats both alike."""
        from lightning.fabric.utilities.data import AttributeDict

        meta = self.metadata
        return AttributeDict(variant=meta.variant, num_classes=meta.num_classes, class_names=list(meta.class_names),
                             img_size=list(meta.img_size), mean=list(meta.mean), std=list(meta.std),
                             crop_pct=meta.crop_pct, linear_sra=meta.linear_sra)

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


# --- ExportedProgram (.pt2) ---------------------------------------------------------------------------------

def program_bytes(program: torch.export.ExportedProgram, metadata: ExportMetadata) -> bytes:
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={METADATA_FILE: json.dumps(metadata.to_strings())})
    return buffer.getvalue()


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


def read_metadata(path: str | Path) -> ExportMetadata:
    """The metadata of an exported file, without building a runtime session (ONNX) or a module (.pt2)."""
    path = Path(path).expanduser()
    if export_format(path) == "onnx":
        model = require("onnx").load(str(path), load_external_data=False)
        return ExportMetadata.from_strings({p.key: p.value for p in model.metadata_props}, str(path))
    with zipfile.ZipFile(path) as archive:
        entry = next((n for n in archive.namelist() if n.endswith(f"extra/{METADATA_FILE}")), None)
        props = json.loads(archive.read(entry)) if entry else {}
    return ExportMetadata.from_strings(props, str(path))


def export_format(path: str | Path, format: str | None = None) -> str:
    """``format`` if given, else from the suffix (.onnx, .pt2)."""
    if format is not None:
        if format not in FORMATS:
            raise ExportError(f"unknown export format {format!r}; choose one of: {', '.join(FORMATS)}")
        return format
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIXES:
        raise ExportError(f"cannot tell the format of {path} from its suffix; name it .onnx or .pt2, or pass "
                          f"--format {'|'.join(FORMATS)}")
    return SUFFIXES[suffix]


# --- parity -----------------------------------------------------------------------------------------------

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


# --- export ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ExportResult:
    path: Path
    format: str
    metadata: ExportMetadata
    checks: list[ParityCheck]
    size_mb: float


def export_model(model: nn.Module, output: str | Path, *, format: str | None = None,
                 img_size: Sequence[int] = (224, 224), dynamic: bool = False, batch_size: int | str | None = None,
                 opset: int | None = None, metadata: ExportMetadata | None = None, overwrite: bool = False,
                 tolerance: float = TOLERANCE) -> ExportResult:
    """Export ``model`` (any ``create_model`` model, in eval mode) to ``output`` (.onnx or .pt2).

    ``dynamic``: batch, height and width symbolic (one file for every size >= the model's minimum);
    ``batch_size``: an int fixes the batch (also with ``dynamic``), "dynamic" frees it (also without);
    default: dynamic with ``dynamic``, else 1. The file is written (atomically, never over an existing
    file unless ``overwrite``) only after the parity check passed.
    """
    from pvt_lightning.runs.rundir import check_output, write_file

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


def load_checkpoint_module(path: str | Path):
    """Our ImageClassifier from a ``.ckpt`` (weights_only), through the inference entry point's loader."""
    try:
        from pvt_lightning.cli.infer import load_classifier
    except ImportError:  # before the entry points moved
        from pvt_lightning.cli.main import load_classifier
    return load_classifier(path)


def export_checkpoint(checkpoint: str | Path, output: str | Path, *, format: str | None = None,
                      img_size: Sequence[int] | None = None, crop_pct: float | None = None,
                      **kwargs: Any) -> ExportResult:
    """Export one of our training checkpoints; ``img_size`` defaults to the checkpoint's training size.

    Other keyword arguments as ``export_model`` (``dynamic``, ``batch_size``, ``opset``, ``overwrite``...).
    """
    from pvt_lightning.runs.rundir import check_output

    check_output(output, kwargs.get("overwrite", False))
    export_format(output, format)
    module = load_checkpoint_module(checkpoint)
    hp = module.hparams
    img_size = tuple(img_size or hp.img_size)
    metadata = ExportMetadata(variant=hp.variant, class_names=tuple(hp.class_names),
                              img_size=(int(img_size[0]), int(img_size[1])),
                              crop_pct=crop_pct or DEFAULT_CROP_PCT,
                              linear_sra=module.linear_sra_enabled)
    return export_model(module.model, output, format=format, img_size=img_size, metadata=metadata, **kwargs)


# --- command line (experiments/export.py) -------------------------------------------------------------------

@dataclass
class ExportConfig:
    """``experiments/export.py``'s options, parsed like the run configuration (flags and ``--config`` YAML)."""

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
                                       f"(default: {DEFAULT_CROP_PCT} for a checkpoint, as our pipeline; the "
                                       "variant's pretrained_cfg for --variant)", "export")
    tolerance: PositiveFloat = option(TOLERANCE, "largest |logit difference| allowed between the export and "
                                      "the model", "export")
    overwrite: bool = option(False, "replace --output if it exists", "export")


def parse_export_args(argv: Sequence[str] | None = None) -> ExportConfig | None:
    """Flags (and ``--config`` YAML) -> a checked ExportConfig (None after ``--print-config`` printed it);
    mistakes raise the configuration's UsageError."""
    import argparse
    import sys

    from pvt_lightning.cli.config import build_parser, explain, plain, to_yaml
    from pvt_lightning.errors import UsageError

    schema = ExportConfig
    parser = build_parser(schema, prog="experiments/export.py", description=(
        "Export a pvt-lightning checkpoint or a model variant to ONNX or a torch.export ExportedProgram (.pt2), "
        "checked against the model before it is written."))
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        namespace = parser.parse_args(argv)
    except argparse.ArgumentError as err:
        raise UsageError(explain(err, argv)) from None
    config = schema(**{f.name: plain(namespace[f.name]) for f in dataclasses.fields(schema)})
    if (config.checkpoint is None) == (config.variant is None):
        raise UsageError("give either --checkpoint CKPT (a training checkpoint) or --variant NAME")
    if config.output is None:
        raise UsageError("--output FILE is required (e.g. model.onnx or model.pt2)")
    if config.checkpoint and not Path(config.checkpoint).expanduser().is_file():
        raise UsageError(f"--checkpoint {config.checkpoint}: no such file")
    if config.pretrained and not config.variant:
        raise UsageError("--pretrained goes with --variant; a --checkpoint carries its own weights")
    if config.crop_pct is not None and not 0 < config.crop_pct <= 1:
        raise UsageError("--crop-pct must be in (0, 1]")
    if namespace["print_config"]:
        print(to_yaml(config), end="")
        return None
    return config


def run_export(config) -> ExportResult:
    """Export as ``config`` (an ExportConfig) says."""
    from pvt_lightning.errors import UsageError

    options = dict(format=config.format, dynamic=config.dynamic, batch_size=config.batch_size, opset=config.opset,
                   overwrite=config.overwrite, tolerance=config.tolerance)
    if config.checkpoint:
        return export_checkpoint(config.checkpoint, config.output, img_size=config.img_size,
                                 crop_pct=config.crop_pct, **options)
    from pvt_lightning.models import canonical_name, create_model

    try:
        variant = canonical_name(config.variant)
    except ValueError as err:
        raise UsageError(f"--variant: {err}") from None
    model = create_model(variant, config.num_classes, pretrained=config.pretrained)
    img_size = tuple(config.img_size or (224, 224))
    metadata = model_metadata(model, variant=variant, img_size=img_size, crop_pct=config.crop_pct)
    return export_model(model, config.output, img_size=img_size, metadata=metadata, **options)


def main(argv: Sequence[str] | None = None) -> int:
    """``experiments/export.py``: mistakes and failed parity checks print one line and exit 2."""
    import sys

    from pvt_lightning.errors import UsageError
    from pvt_lightning.errors import DataError
    from pvt_lightning.errors import CheckpointError

    try:
        config = parse_export_args(argv)
        if config is None:  # --print-config
            return 0
        result = run_export(config)
    except (UsageError, DataError, CheckpointError, ExportError) as err:
        print(f"export: error: {err}", file=sys.stderr)
        return 2
    meta = result.metadata
    shape = (f"({'batch' if meta.dynamic_batch else meta.batch_size}, 3, "
             + (f"height, width) from {meta.min_input_size}x{meta.min_input_size}" if meta.dynamic_size
                else f"{meta.img_size[0]}, {meta.img_size[1]})"))
    print(f"wrote {result.path} ({result.format}, {result.size_mb:.1f} MB): {meta.variant}, {meta.num_classes} "
          f"classes, input {shape}")
    for check in result.checks:
        print(f"  parity vs eager at {check}")
    return 0


__all__ = [
    "EXTRA_HINT", "ExportConfig", "ExportError", "ExportMetadata", "ExportResult", "ExportedClassifier", "FORMATS",
    "MissingExportDependency", "OnnxClassifier", "ParityCheck", "ParityError", "ProgramClassifier", "TOLERANCE",
    "check_parity", "export_checkpoint", "export_format", "export_model", "is_exported_file", "load_exported", "main",
    "model_metadata", "parity_cases", "parse_export_args", "read_metadata", "run_export", "trace", "verify_exported",
]
