"""The run configuration: flags and YAML files typed and checked alike, recipes under experiments/configs valid."""

from pathlib import Path

import pytest
import yaml

from pvt_lightning.cli.config import parse_args, parse_devices
from pvt_lightning.cli.options import TrainConfig
from pvt_lightning.errors import UsageError
from pvt_lightning.cli.main import main

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "experiments" / "configs").glob("*.yaml"))


def test_configs_exist():
    names = {p.stem for p in CONFIGS}
    assert {f"paper_{v}" for v in ("b0", "b1", "b2", "b2_li", "b3", "b4", "b5")} <= names
    assert {"seed_resnet50_384x224", "seed_b5_384x224", "seed_b5_224x224", "seed_b4_384x224"} <= names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_resolves(config, tmp_path):
    parsed = parse_args(TrainConfig, ["--config", str(config), "--data", str(tmp_path)])
    written = yaml.safe_load(config.read_text())
    assert parsed.variant == written["variant"].removeprefix("pvt_v2_")
    assert parsed.img_size == written["img-size"]
    if config.stem.startswith("paper_"):
        assert parsed.epochs == 300 and parsed.drop_path == written["drop-path"]


def test_command_line_overrides_a_config(tmp_path):
    parsed = parse_args(TrainConfig, ["--config", str(CONFIGS[0]), "--data", str(tmp_path), "--epochs", "7",
                           "--img-size", "64", "48"])
    assert parsed.epochs == 7 and parsed.img_size == [64, 48]


def test_later_config_files_win(tmp_path):
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("epochs: 3\nbatch-size: 8\n")
    second.write_text("epochs: 5\n")
    parsed = parse_args(TrainConfig, ["--config", str(first), "--config", str(second)])
    assert (parsed.epochs, parsed.batch_size) == (5, 8)


def test_yaml_scientific_notation_is_a_float(tmp_path):
    """YAML 1.1 reads `1e-3` as a string; the typed configuration still gets the number."""
    file = tmp_path / "c.yaml"
    file.write_text("lr: 1e-3\nbase_lr: 2E-4\n")
    parsed = parse_args(TrainConfig, ["--config", str(file)])
    assert parsed.lr == 0.001 and isinstance(parsed.lr, float) and parsed.base_lr == 2e-4


@pytest.mark.parametrize("text, key", [
    ('epochs: "two"', "--epochs"), ("batch-size: 8.5", "--batch-size"), ("augment: fancy", "--augment"),
    ("drop-path: 1.5", "--drop-path"), ("mixup: -1", "--mixup"), ("img-size: [384, x]", "--img-size"),
    ("strategy: junk", "--strategy"), ("devices: 0", "--devices"), ("no_such_option: 1", "no_such_option"),
])
def test_bad_values_from_a_file_name_the_key(tmp_path, text, key):
    file = tmp_path / "bad.yaml"
    file.write_text(text + "\n")
    with pytest.raises(UsageError) as caught:
        parse_args(TrainConfig, ["--config", str(file)])
    assert key in str(caught.value)


@pytest.mark.parametrize("argv, shown", [
    (["--epochs", "two"], "--epochs two"), (["--batch-size", "8.5"], "--batch-size 8.5"),
    (["--augment", "fancy"], "basic, strong"), (["--drop-path", "1.5"], "--drop-path 1.5"),
    (["--mixup", "-1"], "--mixup -1"), (["--devices", "0"], "--devices 0"), (["--strategy", "junk"], "junk"),
    (["--accelerator", "quantum"], "--accelerator quantum"), (["--max-time", "12h"], "DD:HH:MM:SS"),
    (["--monitor", "train/loss"], "--monitor train/loss"),
])
def test_bad_flags_exit_2_with_one_line(capsys, argv, shown):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert shown in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_accelerator_that_is_not_present_is_a_usage_error(capsys, tmp_path, make_image_folder):
    data = make_image_folder(tmp_path / "data", per_class=2, size=(32, 32))
    assert main(["--data", str(data), "--variant", "b0", "--img-size", "32", "32", "--accelerator", "tpu",
                 "--logdir", str(tmp_path / "runs"), "--num-workers", "0"]) == 2
    err = capsys.readouterr().err
    assert "--accelerator tpu" in err and "Traceback" not in err
    assert not list((tmp_path / "runs").glob("*/version_*")), "a run that cannot start leaves no folder"


def test_devices_forms():
    assert parse_devices("auto") == "auto" and parse_devices("2") == 2 and parse_devices(-1) == -1
    assert parse_devices("0,1,2,3") == [0, 1, 2, 3] and parse_devices([1]) == [1]
    with pytest.raises(UsageError):
        parse_devices("0")


def test_print_config_round_trips(capsys, tmp_path):
    argv = ["--variant", "b0", "--img-size", "384", "224", "--lr", "0.002", "--no-linear-sra", "--epochs", "3"]
    assert main([*argv, "--print-config"]) == 0
    printed = capsys.readouterr().out
    file = tmp_path / "printed.yaml"
    file.write_text(printed)
    assert parse_args(TrainConfig, ["--config", str(file)]) == parse_args(TrainConfig, argv)
    assert yaml.safe_load(printed)["img-size"] == [384, 224]


def test_every_field_is_a_flag():
    from pvt_lightning.cli.config import build_parser

    options = {o for action in build_parser(TrainConfig)._actions for o in action.option_strings}
    for name in TrainConfig.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in options
