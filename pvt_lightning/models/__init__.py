"""Model zoo: PVTv2 b0..b5 and b2_li, plus a torchvision ResNet-50 baseline."""

from .checkpoints import CheckpointError, load_pretrained
from .complexity import Complexity, count_params, measure_complexity
from .pvt_v2 import MIN_INPUT_SIZE, PvtV2Config, PyramidVisionTransformerV2
from .registry import PVT_V2_CONFIGS, VARIANTS, canonical_name, create_model

__all__ = [
    "CheckpointError", "Complexity", "MIN_INPUT_SIZE", "PVT_V2_CONFIGS", "PvtV2Config", "PyramidVisionTransformerV2",
    "VARIANTS", "canonical_name", "count_params", "create_model", "load_pretrained", "measure_complexity",
]
