"""Every recipe under experiments/configs is a valid --config file that resolves as documented."""

from pathlib import Path

import pytest

from pvt_lightning.cli import parse_args
from pvt_lightning.models.registry import DEFAULT_DROP_PATH

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "experiments" / "configs").glob("*.yaml"))


def test_configs_exist():
    names = {p.stem for p in CONFIGS}
    assert {f"paper_{v}" for v in ("b0", "b1", "b2", "b2_li", "b3", "b4", "b5")} <= names
    assert {"seed_resnet50_384x224", "seed_b5_384x224", "seed_b5_224x224", "seed_b4_384x224"} <= names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_resolves(config, tmp_path):
    args, explicit = parse_args(["--config", str(config), "--data", str(tmp_path)])
    assert "variant" in explicit and "img_size" in explicit
    if config.stem.startswith("seed_"):
        variant, size = config.stem.removeprefix("seed_").rsplit("_", 1)
        assert args.variant == variant
        assert "x".join(map(str, args.img_size)) == size
        assert args.batch_size == 64
    else:
        assert args.epochs == 300 and args.drop_path == DEFAULT_DROP_PATH[args.variant]


def test_command_line_overrides_a_config(tmp_path):
    args, _ = parse_args(["--config", str(CONFIGS[0]), "--data", str(tmp_path), "--epochs", "7", "--img-size", "64", "48"])
    assert args.epochs == 7 and args.img_size == [64, 48]
