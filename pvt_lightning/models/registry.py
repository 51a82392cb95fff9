"""One record per model variant, and ``create_model``, the one way to build a model.

Everything known about a variant lives in its ``VariantSpec`` in ``VARIANT_SPECS``: architecture,
builder, recipe defaults, classifier name, ``pretrained_cfg`` facts, published sizes and accuracy.
Adding a variant (``b6``) or a family is one entry there; the CLI's choices, the recipe defaults,
the tests and the tables in README.md and docs/variants.md all derive from the records.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from torch import nn

from pvt_lightning.models.features import FeatureBackbone
from pvt_lightning.models.pvt_v2 import PvtV2Config, PyramidVisionTransformerV2
from pvt_lightning.models.resnet import ResNetClassifier
from pvt_lightning.models.weights import load_pretrained

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_IMG_SIZE = (224, 224)
"""(height, width) when neither the command line nor a checkpoint gives one."""
EVAL_CROP_PCT = 0.875
"""The paper's evaluation: resize to size / 0.875, then centre crop (timm records 0.9 for the released weights)."""


@dataclass(frozen=True)
class Preprocessing:
    """What a model expects of an image; saved in every checkpoint and export, used by evaluate, predict and serve.

    Evaluation and prediction resize (keeping the aspect ratio) until both sides cover ``img_size / crop_pct``,
    centre-crop ``img_size`` (height, width), scale to [0, 1] and normalise with ``mean`` / ``std``.
    """

    img_size: tuple[int, int] = DEFAULT_IMG_SIZE
    crop_pct: float = EVAL_CROP_PCT
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"  # what data/transforms.py resizes with

    def as_dict(self) -> dict[str, Any]:
        return {"img_size": list(self.img_size), "crop_pct": self.crop_pct, "mean": list(self.mean),
                "std": list(self.std), "interpolation": self.interpolation}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Preprocessing":
        """From ``as_dict`` output or a checkpoint's hyper-parameters (missing keys take the defaults)."""
        known = {f.name for f in dataclasses.fields(cls)}
        kept = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in values.items()
                if k in known and v is not None}
        return cls(**kept)

    def replace(self, **overrides: Any) -> "Preprocessing":
        """A copy with the given fields changed; ``None`` values keep the current ones (flags left unset)."""
        changes = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items() if v is not None}
        return dataclasses.replace(self, **changes)


def build_pvt_v2(config: PvtV2Config, num_classes: int = 1000, *, linear_sra: bool | None = None,
                 drop_path_rate: float = 0.0, **overrides) -> PyramidVisionTransformerV2:
    """A PVTv2 from ``config``; ``overrides`` are ``PvtV2Config`` fields or model keyword arguments."""
    config_fields = {f.name for f in dataclasses.fields(PvtV2Config)}
    config_overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items() if k in config_fields}
    model_kwargs = {k: v for k, v in overrides.items() if k not in config_fields}
    if linear_sra is not None:
        config_overrides["linear_sra"] = bool(linear_sra)
    config = dataclasses.replace(config, **config_overrides)
    return PyramidVisionTransformerV2(config, num_classes=num_classes, drop_path_rate=drop_path_rate, **model_kwargs)


def build_resnet(layers: Sequence[int], num_classes: int = 1000, *, linear_sra: bool | None = None,
                 drop_path_rate: float = 0.0, **kwargs) -> ResNetClassifier:
    """torchvision's bottleneck ResNet with ``layers`` blocks per stage; ``kwargs`` go to torchvision's ``ResNet``."""
    if linear_sra:
        raise ValueError("linear_sra applies to PVTv2 variants only, not to resnet50")
    if drop_path_rate:
        raise ValueError("drop_path_rate is not supported by the resnet50 baseline; pass --drop-path 0")
    return ResNetClassifier(layers, num_classes, **kwargs)


@dataclass(frozen=True, kw_only=True)
class VariantSpec:
    """Everything known about one model variant.

    Sizes follow timm's convention: parameters with a 1000-class head, GMACs (= GFLOPs / 2) of
    convolutions and linear layers as ``torch.utils.flop_counter`` counts them, attention products
    excluded (``measure_complexity`` reports those apart).
    """

    name: str
    family: str  # "pvt_v2" or "resnet"
    arch: Any  # the builder's architecture argument: PvtV2Config, or ResNet blocks per stage
    build: Callable[..., nn.Module]  # build(arch, num_classes, linear_sra=, drop_path_rate=, **overrides)
    reference: str  # the independent implementation of the same architecture: "timm:<name>" or "torchvision:<name>"
    # official ImageNet recipe defaults (docs/recipe.md)
    drop_path: float
    grad_clip: float | None = None
    # pretrained_cfg facts, under timm's names
    classifier: str = "head"  # module name of the classifier (its state-dict prefix)
    first_conv: str = "stages.0.patch_embed.proj"
    input_size: tuple[int, int, int] = (3, 224, 224)
    crop_pct: float = 0.9
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # published figures (docs/variants.md)
    params_m: float
    gmacs: float  # at 224x224
    gmacs_384x224: float
    paper_gflops: float | None = None  # the paper's figure at 224 (also counts some element-wise work)
    top1: float  # ImageNet-1K top-1 (%) of the released weights

    @property
    def linear_sra(self) -> bool:
        return bool(getattr(self.arch, "linear_sra", False))

    def preprocessing(self, img_size: Sequence[int] | None = None, crop_pct: float | None = None) -> Preprocessing:
        """The preprocessing a run of this variant uses unless told otherwise: its normalisation, the paper's crop."""
        return Preprocessing(img_size=tuple(img_size or DEFAULT_IMG_SIZE), crop_pct=crop_pct or EVAL_CROP_PCT,
                             mean=self.mean, std=self.std)

    def pretrained_cfg(self) -> dict[str, Any]:
        """timm's ``pretrained_cfg`` dict: the released weights' classes and preprocessing, and the model's ends."""
        return dict(architecture=self.name, num_classes=1000, input_size=self.input_size,
                    crop_pct=self.crop_pct, interpolation=self.interpolation, mean=self.mean, std=self.std,
                    first_conv=self.first_conv, classifier=self.classifier, fixed_input_size=False)


_WIDE = (64, 128, 320, 512)


def _pvt_v2(name: str, top1: float, params_m: float, gmacs: float, gmacs_384x224: float, paper_gflops: float,
            drop_path: float, grad_clip: float | None = None, **arch) -> VariantSpec:
    return VariantSpec(name=name, family="pvt_v2", arch=PvtV2Config(**arch), build=build_pvt_v2,
                       reference=f"timm:pvt_v2_{name}", drop_path=drop_path, grad_clip=grad_clip, params_m=params_m,
                       gmacs=gmacs, gmacs_384x224=gmacs_384x224, paper_gflops=paper_gflops, top1=top1)


VARIANT_SPECS: dict[str, VariantSpec] = {spec.name: spec for spec in [
    _pvt_v2("b0", 70.5, 3.67, 0.53, 0.90, 0.6, drop_path=0.1, embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2)),
    _pvt_v2("b1", 78.7, 14.01, 2.03, 3.48, 2.1, drop_path=0.1, embed_dims=_WIDE, depths=(2, 2, 2, 2)),
    _pvt_v2("b2", 82.0, 25.36, 3.88, 6.66, 4.0, drop_path=0.1, embed_dims=_WIDE, depths=(3, 4, 6, 3)),
    _pvt_v2("b2_li", 82.1, 22.55, 3.75, 6.27, 3.9, drop_path=0.1, embed_dims=_WIDE, depths=(3, 4, 6, 3),
            linear_sra=True),
    _pvt_v2("b3", 83.1, 45.24, 6.68, 11.45, 6.9, drop_path=0.3, grad_clip=1.0, embed_dims=_WIDE, depths=(3, 4, 18, 3)),
    _pvt_v2("b4", 83.6, 62.56, 9.79, 16.78, 10.1, drop_path=0.3, grad_clip=1.0, embed_dims=_WIDE, depths=(3, 8, 27, 3)),
    _pvt_v2("b5", 83.8, 81.96, 11.35, 19.45, 11.8, drop_path=0.3, grad_clip=1.0, embed_dims=_WIDE,
            depths=(3, 6, 40, 3), mlp_ratios=(4, 4, 4, 4)),
    VariantSpec(name="resnet50", family="resnet", arch=(3, 4, 6, 3), build=build_resnet,
                reference="torchvision:resnet50", drop_path=0.0, classifier="fc", first_conv="conv1", crop_pct=0.875,
                interpolation="bilinear", params_m=25.56, gmacs=4.09, gmacs_384x224=7.01, top1=76.13),
]}
"""Every variant, by canonical name. PVTv2 figures: the paper and the official release (docs/variants.md);
resnet50: torchvision's IMAGENET1K_V1 weights."""

VARIANTS: tuple[str, ...] = tuple(VARIANT_SPECS)
"""Every name ``create_model`` accepts (PVTv2 names also with a ``pvt_v2_`` prefix)."""

# Views of the records, for code that reads one fact for every variant.
PVT_V2_CONFIGS: dict[str, PvtV2Config] = {n: s.arch for n, s in VARIANT_SPECS.items() if s.family == "pvt_v2"}
BASELINES: tuple[str, ...] = tuple(n for n, s in VARIANT_SPECS.items() if s.family != "pvt_v2")
DEFAULT_DROP_PATH: dict[str, float] = {n: s.drop_path for n, s in VARIANT_SPECS.items()}
DEFAULT_GRAD_CLIP: dict[str, float] = {n: s.grad_clip for n, s in VARIANT_SPECS.items() if s.grad_clip is not None}


def canonical_name(name: str) -> str:
    """'pvt_v2_b2_li' / 'B2_LI' -> 'b2_li'; unknown names raise a ValueError listing the valid ones."""
    key = name.strip().lower()
    if key.startswith("pvt_v2_"):
        key = key[len("pvt_v2_"):]
    if key not in VARIANT_SPECS:
        raise ValueError(f"unknown model variant {name!r}; choose one of: {', '.join(VARIANTS)}")
    return key


def variant_spec(name: str) -> VariantSpec:
    """The record of ``name`` (any spelling ``canonical_name`` accepts)."""
    return VARIANT_SPECS[canonical_name(name)]


def variant_label(name: str, linear_sra: bool | None = None) -> str:
    """The variant as it runs: 'b2_li', 'b0_li' (linear SRA forced on), 'b2_li' -> 'b2_noli' (forced off), 'resnet50'.

    The one name formatter: run folder names, the comparison table and checkpoint messages all use it.
    """
    spec = variant_spec(name)
    if spec.family != "pvt_v2" or linear_sra is None or bool(linear_sra) == spec.linear_sra:
        return spec.name
    return f"{spec.name}_li" if linear_sra else f"{spec.name.removesuffix('_li')}_noli"


def is_pvt_v2(name: str) -> bool:
    return variant_spec(name).family == "pvt_v2"


def create_model(
    name: str,
    num_classes: int = 1000,
    *,
    pretrained: str | Path | None = None,
    linear_sra: bool | None = None,
    drop_path_rate: float = 0.0,
    features_only: bool = False,
    out_indices: int | Sequence[int] | None = None,
    **overrides,
) -> nn.Module:
    """Build a PVTv2 variant (b0..b5, b2_li) or the ``resnet50`` baseline.

    Args:
        name: variant name, with or without the ``pvt_v2_`` prefix.
        num_classes: size of the classifier head (0 for a headless model: ``forward`` gives pooled features).
        pretrained: path to weights in the official, timm, HF or pvt-lightning layout; a head
            of a different class count is re-initialised with a warning.
        linear_sra: override the variant's attention (``b2`` + ``True`` is ``b2_li``).
        drop_path_rate: stochastic-depth rate of the last block (linear rule over all blocks).
        features_only: return a ``FeatureBackbone`` whose ``forward(x)`` gives the stage maps at
            ``out_indices`` (default: all four, strides 4, 8, 16, 32) and whose
            ``feature_info.channels()`` / ``.reduction()`` describe them; weights load before the cut.
        **overrides: ``PvtV2Config`` fields (``embed_dims``, ``depths``...) or model keyword
            arguments (``drop_rate``, ``attn_drop_rate``, ``in_chans``).
    """
    spec = variant_spec(name)
    model = spec.build(spec.arch, num_classes, linear_sra=linear_sra, drop_path_rate=drop_path_rate, **overrides)
    model.pretrained_cfg = spec.pretrained_cfg()
    if pretrained is not None:
        load_pretrained(model, pretrained)
    if features_only:
        return FeatureBackbone(model, out_indices)
    if out_indices is not None:
        raise ValueError("out_indices applies with features_only=True")
    return model
