"""Model zoo: PVTv2 b0..b5 and b2_li, plus a torchvision ResNet-50 baseline, with timm's model interface."""

from pvt_lightning.models.weights import load_pretrained
from pvt_lightning.models.complexity import Complexity, count_params, measure_complexity
from pvt_lightning.models.features import FeatureBackbone, FeatureInfo
from pvt_lightning.models.pvt_v2 import MIN_INPUT_SIZE, PvtV2Config, PyramidVisionTransformerV2
from pvt_lightning.models.registry import PVT_V2_CONFIGS, VARIANT_SPECS, VARIANTS, VariantSpec, canonical_name, create_model, variant_spec
from pvt_lightning.models.resnet import ResNetClassifier

__all__ = [
    "Complexity", "FeatureBackbone", "FeatureInfo", "MIN_INPUT_SIZE", "PVT_V2_CONFIGS",
    "PvtV2Config", "PyramidVisionTransformerV2", "ResNetClassifier", "VARIANTS", "VARIANT_SPECS", "VariantSpec",
    "canonical_name", "count_params", "create_model", "load_pretrained", "measure_complexity", "variant_spec",
]
