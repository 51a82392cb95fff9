"""The one run configuration: every option of ``experiments/run.py``, typed and validated in one place.

``RunConfig`` is a dataclass; each field is one flag (``img_size`` -> ``--img-size``) and one YAML key
(``img-size`` or ``img_size``). jsonargparse reads flags and ``--config FILE`` (repeatable, later files
win, flags win over files) into it and checks every value against the field's type, so a value from
a file gets the same checks as a flag. Checks a type cannot express are in ``validate``.

Fields left ``None`` are resolved when the run starts: recipe fields (``recipes.RECIPE_FIELDS``) by
the chosen recipe, ``img_size`` by the dataset (the demo's own size, else 224x224), ``lr`` from
``base_lr`` and the real total batch, ``num_workers`` from the CPU count.

To add an option: add a field with ``option(default, help, group)`` below, with the narrowest type
(``PositiveInt``, ``Literal[...]``...) and, if needed, a check in ``validate``. It is then a flag, a
YAML key, part of ``--print-config`` and of the run's ``hparams.yaml``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union, get_type_hints

from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser
from jsonargparse.typing import (ClosedUnitInterval, NonNegativeFloat, NonNegativeInt, OpenUnitInterval,
                                 PositiveFloat, PositiveInt, restricted_number_type)

from pvt_lightning.data.decode import DEFAULT_MAX_IMAGE_PIXELS
from pvt_lightning.models import MIN_INPUT_SIZE, VARIANTS, canonical_name
from pvt_lightning.models.registry import is_pvt_v2
from pvt_lightning.training.recipes import RECIPE_NAMES
from pvt_lightning.errors import UsageError


FractionBelowOne = restricted_number_type("FractionBelowOne", float, [(">=", 0), ("<", 1)])
LayerDecay = restricted_number_type("LayerDecay", float, [(">", 0), ("<=", 1)])
BatchLimit = Union[NonNegativeInt, NonNegativeFloat]
"""Lightning's limit_*_batches / val_check_interval: an int counts batches, a float is a fraction of an epoch."""
PRECISIONS = ("auto", "32", "bf16-mixed", "16-mixed", "64", 32, 64)
"""32 and 64 also as YAML numbers; validate() turns them into strings."""
STRATEGIES = ("auto", "ddp", "ddp_spawn", "ddp_notebook", "ddp_find_unused_parameters_true", "fsdp", "deepspeed",
              "single_device", "dp")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")


def option(default: Any, help: str, group: str, **flag: Any) -> Any:
    return field(default=default, metadata={"help": help, "group": group, **flag})


@dataclass
class ModelOptions:
    """Which network, how it starts and how it runs."""

    variant: str = option("b2_li", f"model: {', '.join(VARIANTS)} (pvt_v2_ prefix ok)", "model")
    linear_sra: Optional[bool] = option(None, "force linear SRA on/off (default: the variant's own; b2 + "
                                        "--linear-sra = b2_li)", "model")
    pretrained: Optional[str] = option(None, "initial weights (a local file): official, timm, HF or pvt-lightning "
                                       "layout; the head is re-initialised if your class count differs", "model")
    drop_path: Optional[FractionBelowOne] = option(None, "stochastic depth (default: the recipe's, else the "
                                                   "variant's: 0.1 for b0-b2_li, 0.3 for b3-b5)", "model")
    grad_checkpointing: bool = option(False, "recompute activations in the backward pass: less memory, slower",
                                      "model")
    compile: bool = option(False, "torch.compile each block on its own (regional: short compiles, one recompile "
                           "per new input size)", "model")


@dataclass
class DataOptions:
    """Where the images are and how they become batches."""

    data: Optional[str] = option(None, "ImageFolder root with train/ and val/ (optional test/) class folders, or "
                                 "one class-folder root with --val-split; omitted: the built-in demo dataset", "data")
    val_split: Optional[OpenUnitInterval] = option(None, "fraction held out for validation (stratified, seeded) "
                                                   "when --data has no val/ folder", "data")
    img_size: Optional[list[PositiveInt]] = option(None, "input height and width, e.g. 384 224 (default: 224 224; "
                                                   "the demo's own size without --data)", "data", nargs=2,
                                                   metavar=("H", "W"))
    crop_pct: float = option(0.875, "evaluation: resize to size/crop_pct, then centre crop", "data")
    augment: Optional[Literal["basic", "strong"]] = option(None, "basic: random resized crop + flip; strong: adds "
                                                           "RandAugment-like ops, colour jitter, random erasing "
                                                           "(default: the recipe's)", "data")
    augment_device: Literal["auto", "cpu", "gpu"] = option("auto", "where training augmentation runs: gpu = per "
                                                            "batch on the device (loader workers only decode), cpu "
                                                            "= in the loader workers, auto = gpu when training on "
                                                            "CUDA", "data")
    num_workers: Optional[NonNegativeInt] = option(None, "data-loader workers per device (default: min(8, CPUs))",
                                                   "data")
    bad_images: Literal["skip", "error"] = option("skip", "unreadable image files: skip them (listed and counted) "
                                                  "or stop with the path", "data")
    verify_images: bool = option(False, "decode every image once before training and exclude the bad ones", "data")
    max_image_pixels: NonNegativeInt = option(DEFAULT_MAX_IMAGE_PIXELS, "pixel budget per image, read from the file "
                                              "header before decoding; larger images count as unreadable "
                                              "(decompression bombs); 0: no limit", "data")


@dataclass
class RecipeOptions:
    """Optimisation and regularisation; unset values come from the recipe."""

    recipe: Literal[RECIPE_NAMES] = option("auto", "defaults for the fields below that you leave unset; auto "
                                           "chooses from the data (see README)", "recipe")
    epochs: Optional[PositiveInt] = option(None, "epochs (default: the recipe's)", "recipe")
    batch_size: PositiveInt = option(64, "images per device per optimizer step (before accumulation)", "recipe")
    lr: Optional[PositiveFloat] = option(None, "peak learning rate; default: --base-lr x total batch / 512, the "
                                         "total batch being batch size x devices x nodes x accumulation", "recipe")
    base_lr: Optional[PositiveFloat] = option(None, "learning rate per 512 images of total batch (default: the "
                                              "recipe's, 5e-4 in the paper recipe)", "recipe")
    weight_decay: Optional[NonNegativeFloat] = option(None, "AdamW weight decay, not on norms and biases", "recipe")
    warmup_epochs: Optional[NonNegativeFloat] = option(None, "linear warm-up before the cosine decay", "recipe")
    label_smoothing: Optional[FractionBelowOne] = option(None, "cross-entropy label smoothing", "recipe")
    mixup: Optional[NonNegativeFloat] = option(None, "MixUp alpha (0 = off)", "recipe")
    cutmix: Optional[NonNegativeFloat] = option(None, "CutMix alpha (0 = off)", "recipe")
    grad_clip: Optional[NonNegativeFloat] = option(None, "gradient-norm clipping, 0 = off (default: 1.0 for "
                                                   "b3-b5, off otherwise)", "recipe")
    layer_decay: Optional[LayerDecay] = option(None, "layer-wise lr decay: each layer learns at this fraction of "
                                               "the next one's rate, the head at the full rate, the stem lowest; "
                                               "1 = off (finetune recipe: the stem at 1/10 of the head)", "recipe")
    head_lr_scale: Optional[PositiveFloat] = option(None, "lr multiplier of the classifier head (recipes: 1)",
                                                    "recipe")
    freeze_backbone_epochs: Optional[NonNegativeInt] = option(None, "train only the head for the first N epochs, "
                                                              "then everything (recipes: 0)", "recipe")
    ema: bool = option(False, "keep an EMA of the weights for validation and checkpoints", "recipe")
    ema_decay: OpenUnitInterval = option(0.9998, "EMA decay per step", "recipe")
    seed: int = option(0, "random seed (data split, init, augmentation)", "recipe")


@dataclass
class ImbalanceOptions:
    """Loss weights, sampling and loss for long-tailed data."""

    class_weights: str = option("none", "loss weight per class: none, balanced (inverse class frequency, mean 1 "
                                "over the training images) or a JSON file {\"class\": weight}", "imbalance",
                                metavar="none|balanced|FILE.json")
    sampler: Literal["none", "balanced", "sqrt"] = option("none", "training sampler: none (shuffle), balanced "
                                                          "(every class drawn equally often), sqrt (each class in "
                                                          "proportion to the square root of its count); epochs "
                                                          "keep their length, DDP ranks split the draws", "imbalance")
    loss: Literal["ce", "focal"] = option("ce", "training loss: cross-entropy or focal (with --focal-gamma)",
                                          "imbalance")
    focal_gamma: NonNegativeFloat = option(2.0, "focal loss exponent: (1 - p)^gamma down-weights easy images; "
                                           "0 = cross-entropy", "imbalance")


@dataclass
class HardwareOptions:
    """Devices, nodes, strategy and numeric precision."""

    precision: Literal[PRECISIONS] = option("auto", "auto: bf16-mixed on GPUs that support it, else 32", "hardware")
    accelerator: Literal[ACCELERATORS] = option("auto", "where to train", "hardware")
    devices: Union[int, str, list[NonNegativeInt]] = option("auto", "devices per node: a count, -1 (all), a list "
                                                            "such as 0,1,2,3, or auto", "hardware")
    num_nodes: PositiveInt = option(1, "nodes (torchrun / SLURM set up the rest)", "hardware")
    strategy: str = option("auto", f"Lightning strategy: {', '.join(STRATEGIES)}", "hardware")


@dataclass
class TrainerOptions:
    """Lightning Trainer options, passed through."""

    accumulate_grad_batches: PositiveInt = option(1, "accumulate gradients over N batches per optimizer step",
                                                  "trainer")
    max_steps: int = option(-1, "stop after N optimizer steps (-1 = no limit)", "trainer")
    max_time: Optional[str] = option(None, "stop after this much time, DD:HH:MM:SS", "trainer")
    val_check_interval: Optional[BatchLimit] = option(None, "validate every N training batches (int) or fraction "
                                                      "of an epoch (float)", "trainer")
    deterministic: bool = option(False, "deterministic algorithms (slower; some ops have none)", "trainer")
    fast_dev_run: NonNegativeInt = option(0, "smoke test: run N train/val batches, no checkpoints (0 = off)",
                                          "trainer")
    log_every_n_steps: PositiveInt = option(10, "how often the progress bar and step logs update", "trainer")
    limit_train_batches: Optional[BatchLimit] = option(None, "batches (int) or fraction (float) of each training "
                                                       "epoch", "trainer")
    limit_val_batches: Optional[BatchLimit] = option(None, "same, for validation", "trainer")


@dataclass
class RunOptions:
    """The run folder, logging and checkpoints."""

    logdir: str = option("runs", "root of all runs", "run")
    name: Optional[str] = option(None, "run name (default: variant, li, HxW, e.g. b2_li_384x224)", "run")
    logger: Literal["tensorboard", "csv"] = option("tensorboard", "tensorboard event files, or Lightning's "
                                                   "metrics.csv", "run")
    resume: Optional[str] = option(None, "continue a run from its checkpoint, in the same version folder; 'last' "
                                   "= newest last.ckpt of the run --name", "run", metavar="PATH|last")
    monitor: str = option("val/acc", "metric that picks the best checkpoint: any logged val/... tag, e.g. val/f1 "
                          "or val/recall/<class>", "run")
    monitor_mode: Literal["max", "min"] = option("max", "whether larger or smaller --monitor is better", "run")
    early_stopping: NonNegativeInt = option(0, "stop after N epochs without --monitor improving (0 = off)", "run")
    checkpoint_every_steps: NonNegativeInt = option(0, "also save last.ckpt every N training steps (0 = off)",
                                                    "run")
    checkpoint_every_minutes: NonNegativeFloat = option(30.0, "also save last.ckpt every M minutes of training "
                                                        "(0 = off); SIGTERM always saves it", "run")
    positive_class: Optional[str] = option(None, "also report precision/recall of this class (one-vs-rest)", "run")
    threshold: ClosedUnitInterval = option(0.5, "probability threshold for --positive-class", "run")
    overwrite: bool = option(False, "allow replacing existing output files (never needed for run folders)", "run")


@dataclass
class InferOptions:
    """Evaluation and prediction of a trained checkpoint."""

    evaluate: Optional[str] = option(None, "evaluate this checkpoint on --split of --data", "infer", metavar="CKPT")
    split: Literal["val", "test"] = option("val", "split for --evaluate", "infer")
    predict: Optional[str] = option(None, "predict every image under this folder into a CSV", "infer",
                                    metavar="DIR")
    checkpoint: Optional[str] = option(None, "checkpoint for --predict", "infer", metavar="CKPT")
    output: Optional[str] = option(None, "--predict: CSV path (default: predictions.csv in the checkpoint's run); "
                                   "--evaluate: also write the metrics as JSON here", "infer", metavar="FILE")
    output_dir: Optional[str] = option(None, "--evaluate: folder for report.json, per_class.csv, predictions.csv, "
                                       "the plots and operating_point.json (default: eval_<split>_<checkpoint> in "
                                       "the checkpoint's run folder)", "infer", metavar="DIR")
    calibrate: bool = option(False, "--evaluate: fit temperature scaling on --split and report ECE/NLL before and "
                             "after", "infer")
    target_precision: Optional[ClosedUnitInterval] = option(None, "--evaluate: per class, the lowest probability "
                                                            "threshold with at least this precision on --split; "
                                                            "writes operating_point.json", "infer", metavar="P")
    target_recall: Optional[ClosedUnitInterval] = option(None, "--evaluate: per class, the highest threshold with "
                                                         "at least this recall on --split (instead of "
                                                         "--target-precision)", "infer", metavar="R")
    operating_point: Optional[str] = option(None, "--predict: apply this operating_point.json (temperature and "
                                            "per-class thresholds): adds a decision column, probabilities become "
                                            "calibrated; --evaluate: measure it on --split (e.g. thresholds chosen "
                                            "on val, checked on test)", "infer", metavar="FILE")
    tta: bool = option(False, "--evaluate/--predict: test-time augmentation, mean of the logits of each image and "
                       "its horizontal flip", "infer")


@dataclass
class RunConfig(InferOptions, RunOptions, TrainerOptions, HardwareOptions, ImbalanceOptions, RecipeOptions,
                DataOptions, ModelOptions):
    """Everything a run needs, one flat set of options (fields in the order of the groups above).

    ``None`` means "resolved at run time" (see the module docstring).
    """


GROUPS = {
    "model": "model", "data": "data", "recipe": "recipe (unset values come from --recipe)",
    "imbalance": "class imbalance",
    "hardware": "hardware and scale", "trainer": "Lightning Trainer options",
    "run": "run folder, logging and checkpoints", "infer": "evaluation and prediction",
    "export": "export (experiments/export.py)",
}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser(schema: type = RunConfig, prog: str = "pvt-lightning", description: str | None = None) -> ArgumentParser:
    """One flag per field of ``schema``: RunConfig, or another entry point's dataclass (``export.ExportConfig``)."""
    parser = ArgumentParser(
        prog=prog, exit_on_error=False,
        description=description or "Train, evaluate or predict with PVTv2 (b0..b5, b2_li) or a ResNet-50 baseline on an "
                    "ImageFolder dataset. Without --data it trains on a built-in demo dataset. Every option is "
                    "also a key of a YAML --config file.",
    )
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file of option: value (repeatable, later "
                        "files win, flags win over files)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved configuration as YAML "
                        "and exit; feed it back with --config to rerun it")
    used = {spec.metadata["group"] for spec in dataclasses.fields(schema)}
    groups = {key: parser.add_argument_group(title) for key, title in GROUPS.items() if key in used}
    hints = get_type_hints(schema)
    for spec in dataclasses.fields(schema):
        meta = dict(spec.metadata)
        group = groups[meta.pop("group")]
        kwargs: dict[str, Any] = {"default": spec.default, "help": meta.pop("help"), **meta}
        if hints[spec.name] in (bool, Optional[bool]):
            kwargs["action"] = ActionYesNo(no_prefix="no-")
        else:
            kwargs["type"] = hints[spec.name]
            if "nargs" in kwargs:  # --img-size H W: jsonargparse types each of the N values
                kwargs["type"] = Optional[PositiveInt]
        group.add_argument(flag(spec.name), dest=spec.name, **kwargs)
    return parser


def parse_config(argv: Sequence[str] | None = None) -> RunConfig | None:
    """Flags and YAML files -> a validated RunConfig; ``None`` after ``--print-config`` printed it."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        namespace = parser.parse_args(argv)
    except argparse.ArgumentError as err:
        raise UsageError(explain(err, argv)) from None
    values = {spec.name: plain(namespace[spec.name]) for spec in dataclasses.fields(RunConfig)}
    config = RunConfig(**values)
    validate(config)
    if namespace["print_config"]:
        print(to_yaml(config), end="")
        return None
    return config


def plain(value: Any) -> Any:
    """jsonargparse's restricted numbers (PositiveInt...) as plain int/float, so YAML and pickling see builtins."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def to_yaml(config: RunConfig) -> str:
    """The configuration as YAML that ``--config`` reads back to the same RunConfig."""
    import yaml

    return yaml.safe_dump({key.replace("_", "-"): plain(value) for key, value in dataclasses.asdict(config).items()},
                          sort_keys=False)


_KEY = re.compile(r'Parser key "([\w.]+)"')


def explain(err: argparse.ArgumentError, argv: Sequence[str] = ()) -> str:
    """One line from jsonargparse's message: the flag, the value given and what is allowed."""
    text = str(err)
    key = _KEY.search(text)
    if not key:
        return text.splitlines()[0] if text else "invalid arguments (see --help)"
    name = key.group(1)
    given = re.search(r"(?:Got value|Given value): (.*)", text)
    reasons = [line.strip()[2:] for line in text.splitlines() if line.strip().startswith("- ")]
    reasons = [r for r in reasons if "NoneType" not in r] or [line.strip() for line in text.splitlines()[1:2]]
    allowed = "; ".join(reason.replace("Not of type ", "") for reason in reasons)
    value = given.group(1).strip() if given else _flag_value(argv, flag(name))
    choices = _choices(name)
    return (f"{flag(name)} {value}: not allowed ({allowed})" + (f"; choose one of: {choices}" if choices else "")
            + f". Fix the flag or the key '{name.replace('_', '-')}' in your --config file.")


def _flag_value(argv: Sequence[str], option: str) -> str:
    """The value given to ``option`` on the command line (the last one wins), or "?" if it came from a file."""
    value = "?"
    for i, arg in enumerate(argv):
        if arg == option and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(option + "="):
            value = arg.split("=", 1)[1]
    return value


def _choices(name: str) -> str:
    hint = get_type_hints(RunConfig).get(name)
    args = getattr(hint, "__args__", ())
    literals = [a for a in args if getattr(a, "__origin__", None) is Literal]
    if getattr(hint, "__origin__", None) is Literal:
        literals = [hint]
    return ", ".join(str(v) for lit in literals for v in lit.__args__)


def validate(config: RunConfig) -> None:
    """Checks that a type alone cannot express; raises UsageError naming the flag and the fix."""
    try:
        config.variant = canonical_name(str(config.variant))
    except ValueError as err:
        raise UsageError(f"--variant: {err}") from None
    if config.img_size is not None and min(config.img_size) < MIN_INPUT_SIZE:
        raise UsageError(f"--img-size {config.img_size[0]} {config.img_size[1]}: each side must be at least "
                         f"{MIN_INPUT_SIZE} pixels")
    config.precision = str(config.precision)
    checks = [
        (0 < config.crop_pct <= 1, "--crop-pct must be in (0, 1]"),
        (config.max_steps >= -1, "--max-steps must be -1 (no limit) or a number of steps"),
        (config.max_time is None or re.fullmatch(r"\d+:\d{1,2}:\d{1,2}:\d{1,2}", config.max_time),
         f"--max-time {config.max_time}: use DD:HH:MM:SS, e.g. 00:12:00:00 for 12 hours"),
        (config.strategy in STRATEGIES or config.strategy.startswith(("ddp", "fsdp", "deepspeed")),
         f"--strategy {config.strategy}: not a Lightning strategy; choose one of: {', '.join(STRATEGIES)}"),
        (config.monitor.startswith("val/"), f"--monitor {config.monitor}: choose a validation metric such as "
                                            "val/acc, val/f1, val/loss or val/recall/<class>"),
        (is_pvt_v2(config.variant) or not config.linear_sra, "--linear-sra applies to PVTv2 variants, not resnet50"),
        (not (config.predict and not config.checkpoint), "--predict DIR needs --checkpoint CKPT"),
        (not (config.evaluate and config.predict), "--evaluate and --predict are separate jobs: give one of them"),
        (config.target_precision is None or config.target_recall is None,
         "--target-precision and --target-recall choose the same thresholds two ways: give one of them"),
        (config.evaluate or not (config.output_dir or config.calibrate or config.target_precision is not None
                                 or config.target_recall is not None),
         "--output-dir, --calibrate, --target-precision and --target-recall go with --evaluate CKPT"),
        (config.predict or config.evaluate or not config.operating_point,
         "--operating-point goes with --predict DIR --checkpoint CKPT or --evaluate CKPT (it is written by "
         "--evaluate ... --target-precision P)"),
        (not (config.operating_point and (config.calibrate or config.target_precision is not None
                                          or config.target_recall is not None)),
         "--operating-point brings its own temperature and thresholds: leave out --calibrate, --target-precision "
         "and --target-recall, or leave out --operating-point to choose new ones"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    parse_devices(config.devices)
    for name in ("data", "pretrained", "evaluate", "checkpoint", "predict", "operating_point"):
        value = getattr(config, name)
        if value is not None and not Path(value).expanduser().exists():
            raise UsageError(f"{flag(name)} {value}: no such file or folder")
    if config.class_weights not in ("none", "balanced") and not Path(config.class_weights).expanduser().is_file():
        raise UsageError(f"--class-weights {config.class_weights}: choose none, balanced or an existing JSON file "
                         "of {\"class name\": weight}")
    if config.resume not in (None, "last") and not Path(config.resume).expanduser().is_file():
        raise UsageError(f"--resume {config.resume}: no such checkpoint file (or use --resume last with --name)")


def parse_devices(devices: int | str | list[int]) -> int | str | list[int]:
    """``--devices`` as Lightning takes it: a count, -1, "auto" or a list of indices."""
    if isinstance(devices, list):
        return devices
    text = str(devices).strip()
    if text == "auto":
        return "auto"
    if re.fullmatch(r"-?\d+", text):
        if int(text) >= 1 or int(text) == -1:
            return int(text)
    elif re.fullmatch(r"\d+(,\d+)*,?", text):
        return [int(i) for i in text.split(",") if i]
    raise UsageError(f"--devices {devices}: use a count (1, 2...), -1 for all, a list such as 0,1,2,3, or auto "
                     "(0 devices would train on nothing)")


def default_num_workers() -> int:
    return min(8, os.cpu_count() or 1)
