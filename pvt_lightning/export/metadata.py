"""What an exported file carries besides its graph (classes, preprocessing, dynamic dims), and its format.

The metadata is stored as JSON strings: ONNX ``metadata_props``; ``.pt2``: ``extra/pvt_lightning.json``
inside the archive. Its preprocessing fields (img_size, mean, std, crop_pct) are those of the model's
``Preprocessing`` record (``models.registry``): a checkpoint's own, or a bare variant's.
"""

from __future__ import annotations

import dataclasses
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from torch import nn

from pvt_lightning.errors import ExportError
from pvt_lightning.export.optional import require
from pvt_lightning.models import MIN_INPUT_SIZE
from pvt_lightning.models.registry import (
    DEFAULT_IMG_SIZE,
    EVAL_CROP_PCT,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Preprocessing,
    variant_spec,
)

FORMATS = ("onnx", "exported-program")
SUFFIXES = {".onnx": "onnx", ".pt2": "exported-program"}
METADATA_FILE = "pvt_lightning.json"
"""The metadata's name inside a ``.pt2`` archive (``torch.export.save``'s ``extra_files``)."""


@dataclass(frozen=True)
class ExportMetadata:
    """What a deployment needs besides the graph: classes and preprocessing, and what is dynamic."""

    variant: str
    class_names: tuple[str, ...]
    img_size: tuple[int, int]  # (H, W) the model was trained/traced at
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop_pct: float = EVAL_CROP_PCT
    linear_sra: bool = False
    dynamic_batch: bool = False
    dynamic_size: bool = False
    batch_size: int | None = None  # the fixed batch when not dynamic
    min_input_size: int = MIN_INPUT_SIZE
    task: str = "multiclass"
    """The graph returns logits either way; ``multiclass``: probabilities are their softmax, ``multilabel``: one
    sigmoid per class, an image taking every label whose probability is at least ``threshold`` (docs/multilabel.md)."""
    threshold: float = 0.5

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def preprocessing(self) -> Preprocessing:
        """The file's input preprocessing as the registry's record (interpolation: our pipeline's)."""
        return Preprocessing(img_size=self.img_size, crop_pct=self.crop_pct, mean=self.mean, std=self.std)

    @classmethod
    def from_preprocessing(cls, preprocessing: Preprocessing, **fields: Any) -> "ExportMetadata":
        """Metadata with ``preprocessing``'s img_size, mean, std and crop_pct; ``fields``: the others."""
        height, width = preprocessing.img_size
        return cls(img_size=(int(height), int(width)), mean=tuple(preprocessing.mean), std=tuple(preprocessing.std),
                   crop_pct=float(preprocessing.crop_pct), **fields)

    def to_strings(self) -> dict[str, str]:
        """One JSON value per key (ONNX ``metadata_props`` hold strings); single-label files carry no task keys,
        as before multi-label existed (readers default to multiclass)."""
        values = dataclasses.asdict(self)
        if self.task == "multiclass":
            del values["task"], values["threshold"]
        return {key: json.dumps(value) for key, value in values.items()}

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
                   img_size: Sequence[int] = DEFAULT_IMG_SIZE, crop_pct: float | None = None) -> ExportMetadata:
    """Metadata of a ``create_model`` model: its variant's preprocessing record, ``crop_pct`` overriding the crop."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    config = getattr(model, "config", None)
    num_classes = getattr(model, "num_classes", None) or _head_size(model)
    names = tuple(class_names) if class_names is not None else tuple(str(i) for i in range(num_classes))
    if len(names) != num_classes:
        raise ExportError(f"{len(names)} class names for a model with {num_classes} outputs")
    return ExportMetadata.from_preprocessing(
        model_preprocessing(cfg.get("architecture") or variant, img_size, crop_pct, cfg),
        variant=variant or cfg.get("architecture") or type(model).__name__, class_names=names,
        linear_sra=bool(config and config.linear_sra))


def model_preprocessing(variant: str | None, img_size: Sequence[int], crop_pct: float | None = None,
                        pretrained_cfg: Mapping[str, Any] | None = None) -> Preprocessing:
    """A registered variant's ``Preprocessing``; another model's from its timm-style ``pretrained_cfg`` (mean,
    std, crop_pct) where it has one, else the defaults; ``crop_pct`` (a flag) overrides the crop."""
    try:
        spec = variant_spec(variant) if variant else None
    except ValueError:  # not one of ours (e.g. a plain nn.Module)
        spec = None
    if spec is not None:
        return spec.preprocessing(img_size, crop_pct)
    cfg = {key: value for key, value in (pretrained_cfg or {}).items() if key in ("mean", "std", "crop_pct")}
    return Preprocessing.from_dict({**cfg, "img_size": img_size}).replace(crop_pct=crop_pct)


def _head_size(model: nn.Module) -> int:
    head = getattr(model, "head", None) or getattr(model, "fc", None)
    if isinstance(head, nn.Linear):
        return head.out_features
    raise ExportError("cannot tell the model's number of classes; pass class_names")


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
