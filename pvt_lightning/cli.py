"""Command line: argument parsing and run assembly for ``experiments/run.py`` / ``pvt-lightning``.

This is the one place that wires data, model, callbacks, logger and Trainer together.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import yaml

from .allocator import keep_freed_memory
from .models import MIN_INPUT_SIZE, VARIANTS, canonical_name
from .models.checkpoints import CheckpointError, read_state_dict_file
from .models.registry import DEFAULT_GRAD_CLIP, is_pvt_v2

RUN_VERSION_ENV = "PVT_LIGHTNING_RUN_VERSION"
"""Set by rank 0 before launching DDP workers, so every rank writes to the same version folder."""


class UsageError(ValueError):
    """A mistake in the command line or config file: printed without a traceback, exit status 2."""


# --- arguments -------------------------------------------------------------------------------------

def _img_size(value: str) -> int:
    size = int(value)
    if size < MIN_INPUT_SIZE:
        raise argparse.ArgumentTypeError(f"each side must be at least {MIN_INPUT_SIZE} pixels, got {size}")
    return size


def _limit(value: str) -> int | float:
    """Lightning's limit_*_batches: an int counts batches, a float in (0, 1] is a fraction."""
    number = float(value)
    if number < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return int(number) if number.is_integer() and "." not in value else number


def build_parser(suppress_defaults: bool = False) -> argparse.ArgumentParser:
    """All flags. With ``suppress_defaults`` only flags actually given appear (to layer recipes)."""
    parser = argparse.ArgumentParser(
        prog="pvt-lightning",
        description="Train, evaluate or predict with PVTv2 (b0..b5, b2_li) or a ResNet-50 baseline on an "
                    "ImageFolder dataset. Without --data it trains on a built-in demo dataset.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        argument_default=argparse.SUPPRESS if suppress_defaults else None,
    )
    d = (lambda value: argparse.SUPPRESS) if suppress_defaults else (lambda value: value)
    model = parser.add_argument_group("model")
    model.add_argument("--variant", default=d("b2_li"), help=f"model: {', '.join(VARIANTS)} (pvt_v2_ prefix ok)")
    model.add_argument("--linear-sra", action=argparse.BooleanOptionalAction, default=d(None),
                       help="force linear SRA on/off (default: the variant's own; b2 + --linear-sra = b2_li)")
    model.add_argument("--pretrained", default=d(None), metavar="PATH",
                       help="initial weights: official, timm, HF or pvt-lightning layout (head re-initialised "
                            "if your class count differs)")
    model.add_argument("--drop-path", type=float, default=d(None), help="stochastic depth (default per variant: "
                       "0.1 for b0-b2_li, 0.3 for b3-b5)")
    model.add_argument("--grad-checkpointing", action="store_true", default=d(False),
                       help="recompute activations in the backward pass: less memory, slower")
    model.add_argument("--compile", action="store_true", default=d(False), help="torch.compile the model")

    data = parser.add_argument_group("data")
    data.add_argument("--data", default=d(None), metavar="DIR",
                      help="ImageFolder root with train/ and val/ (optional test/) class folders, or one class-folder "
                           "root with --val-split; omitted: the built-in demo dataset")
    data.add_argument("--val-split", type=float, default=d(None), help="fraction held out for validation "
                      "(stratified, seeded) when --data has no val/ folder")
    data.add_argument("--img-size", type=_img_size, nargs=2, metavar=("H", "W"), default=d([224, 224]),
                      help="input height and width, e.g. 384 224 (demo default: its own small size)")
    data.add_argument("--crop-pct", type=float, default=d(0.875), help="eval: resize to size/crop_pct, centre crop")
    data.add_argument("--augment", choices=["basic", "strong"], default=d("strong"),
                      help="basic: random resized crop + flip; strong: adds RandAugment-like ops, colour jitter, "
                           "random erasing")
    data.add_argument("--num-workers", type=int, default=d(min(8, os.cpu_count() or 1)), help="data-loader workers")
    data.add_argument("--bad-images", choices=["skip", "error"], default=d("skip"),
                      help="unreadable image files: skip them (listed and counted) or stop with the path")
    data.add_argument("--verify-images", action="store_true", default=d(False),
                      help="decode every image once before training and exclude the bad ones")

    recipe = parser.add_argument_group("recipe (official PVTv2 recipe by default)")
    recipe.add_argument("--epochs", type=int, default=d(100), help="epochs (demo default: its own)")
    recipe.add_argument("--batch-size", type=int, default=d(64), help="images per device per step")
    recipe.add_argument("--lr", type=float, default=d(None), help="peak learning rate (default: 5e-4 x total "
                        "batch / 512)")
    recipe.add_argument("--weight-decay", type=float, default=d(0.05), help="AdamW weight decay (not on norms/biases)")
    recipe.add_argument("--warmup-epochs", type=float, default=d(5.0), help="linear warm-up before the cosine decay")
    recipe.add_argument("--label-smoothing", type=float, default=d(0.1), help="cross-entropy label smoothing")
    recipe.add_argument("--mixup", type=float, default=d(0.8), help="MixUp alpha (0 = off)")
    recipe.add_argument("--cutmix", type=float, default=d(1.0), help="CutMix alpha (0 = off)")
    recipe.add_argument("--grad-clip", type=float, default=d(None), help="gradient-norm clipping (default: 1.0 for "
                        "b3-b5, off otherwise)")
    recipe.add_argument("--ema", action="store_true", default=d(False), help="keep an EMA of the weights for "
                        "validation and checkpoints")
    recipe.add_argument("--ema-decay", type=float, default=d(0.9998), help="EMA decay per step")
    recipe.add_argument("--seed", type=int, default=d(0), help="random seed (data split, init, augmentation)")

    hardware = parser.add_argument_group("hardware and scale")
    hardware.add_argument("--precision", choices=["auto", "32", "bf16-mixed", "16-mixed"], default=d("auto"),
                          help="auto: bf16-mixed on GPUs that support it, else 32")
    hardware.add_argument("--accelerator", default=d("auto"), help="cpu, gpu, auto")
    hardware.add_argument("--devices", default=d("auto"), help="number of devices per node, or auto")
    hardware.add_argument("--num-nodes", type=int, default=d(1), help="nodes (torchrun / SLURM set up the rest)")
    hardware.add_argument("--strategy", default=d("auto"), help="Lightning strategy: auto, ddp, ddp_spawn, fsdp...")

    run = parser.add_argument_group("run")
    run.add_argument("--logdir", default=d("runs"), help="root of all runs")
    run.add_argument("--name", default=d(None), help="run name (default: variant, li, HxW, e.g. b2_li_384x224)")
    run.add_argument("--resume", default=d(None), metavar="PATH|last",
                     help="continue from a checkpoint; 'last' = newest last.ckpt of the run --name")
    run.add_argument("--checkpoint-every-steps", type=int, default=d(0), metavar="N",
                     help="also save last.ckpt every N training steps (0 = off)")
    run.add_argument("--checkpoint-every-minutes", type=float, default=d(30.0), metavar="M",
                     help="also save last.ckpt every M minutes of training (0 = off); SIGTERM always saves it")
    run.add_argument("--config", default=d(None), metavar="FILE.yaml",
                     help="YAML of flag: value (any flag above); the command line overrides it")
    run.add_argument("--limit-train-batches", type=_limit, default=d(None), help="quick look: batches (int) or "
                     "fraction (float) of an epoch")
    run.add_argument("--limit-val-batches", type=_limit, default=d(None), help="same, for validation")
    run.add_argument("--positive-class", default=d(None), metavar="NAME",
                     help="also report precision/recall of this class (one-vs-rest)")
    run.add_argument("--threshold", type=float, default=d(0.5), help="probability threshold for --positive-class")

    infer = parser.add_argument_group("evaluation and prediction")
    infer.add_argument("--evaluate", default=d(None), metavar="CKPT", help="evaluate a checkpoint on --split")
    infer.add_argument("--split", choices=["val", "test"], default=d("val"), help="split for --evaluate")
    infer.add_argument("--predict", default=d(None), metavar="DIR", help="predict every image under DIR to CSV")
    infer.add_argument("--checkpoint", default=d(None), metavar="CKPT", help="checkpoint for --predict")
    infer.add_argument("--output", default=d(None), metavar="FILE", help="--predict: CSV path (default: "
                       "predictions.csv next to the checkpoint's run); --evaluate: also write metrics JSON here")
    return parser


def _flag_names(parser: argparse.ArgumentParser) -> dict[str, str]:
    """'img_size' and 'img-size' -> dest 'img_size', for config-file keys."""
    names = {}
    for action in parser._actions:
        for option in action.option_strings:
            if option.startswith("--") and not option.startswith("--no-"):
                names[option[2:]] = names[option[2:].replace("-", "_")] = action.dest
    names.pop("help", None)
    return names


def load_config(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    file = Path(path).expanduser()
    if not file.is_file():
        raise UsageError(f"--config {path}: file not found")
    try:
        raw = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as err:
        raise UsageError(f"--config {path}: not valid YAML ({err})") from None
    if not isinstance(raw, dict):
        raise UsageError(f"--config {path}: expected a mapping of flag: value")
    names = _flag_names(parser)
    unknown = [k for k in raw if k not in names or names[k] == "config"]
    if unknown:
        valid = sorted({k for k in names if "-" in k or "_" not in k} - {"config"})
        raise UsageError(f"--config {path}: unknown key(s) {', '.join(map(str, unknown))}; valid keys: "
                         f"{', '.join(valid)}")
    return {names[k]: v for k, v in raw.items()}


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, set[str]]:
    """Parse flags, layering: built-in defaults < demo recipe < --config file < command line.

    Returns the resolved namespace and the names of the settings the user chose explicitly.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    explicit = vars(build_parser(suppress_defaults=True).parse_args(argv))
    config = load_config(args.config, parser) if args.config else {}
    chosen = {**config, **explicit}
    if args.data is None and chosen.get("data") is None and not (chosen.get("evaluate") or chosen.get("predict")):
        base = demo_recipe()
    else:
        base = {}
    for key, value in {**base, **chosen}.items():
        setattr(args, key, value)
    if isinstance(args.img_size, (list, tuple)):
        args.img_size = [int(v) for v in args.img_size]
    validate_args(args)
    return args, set(chosen)


def demo_recipe() -> dict[str, Any]:
    """Defaults for the built-in demo: small images and a short schedule that a laptop CPU finishes in minutes."""
    from .data.demo import DEMO_EPOCHS, DEMO_IMG_SIZE

    return {"img_size": list(DEMO_IMG_SIZE), "epochs": DEMO_EPOCHS, "batch_size": 32, "lr": 1e-3,
            "warmup_epochs": 1.0, "mixup": 0.0, "cutmix": 0.0, "augment": "basic", "num_workers": 2}


def validate_args(args: argparse.Namespace) -> None:
    try:
        args.variant = canonical_name(str(args.variant))
    except ValueError as err:
        raise UsageError(f"--variant: {err}") from None
    if not (isinstance(args.img_size, list) and len(args.img_size) == 2):
        raise UsageError(f"--img-size takes two numbers, H W (e.g. --img-size 384 224), got {args.img_size!r}")
    if min(args.img_size) < MIN_INPUT_SIZE:
        raise UsageError(f"--img-size {args.img_size[0]} {args.img_size[1]}: each side must be at least "
                         f"{MIN_INPUT_SIZE} pixels")
    checks = [
        (args.epochs >= 1, "--epochs must be at least 1"),
        (args.batch_size >= 1, "--batch-size must be at least 1"),
        (args.val_split is None or 0 < args.val_split < 1, "--val-split must be a fraction between 0 and 1"),
        (args.lr is None or args.lr > 0, "--lr must be positive"),
        (0 <= args.label_smoothing < 1, "--label-smoothing must be in [0, 1)"),
        (0 < args.crop_pct <= 1, "--crop-pct must be in (0, 1]"),
        (0 <= args.threshold <= 1, "--threshold must be in [0, 1]"),
        (args.num_workers >= 0, "--num-workers must be >= 0"),
        (args.checkpoint_every_steps >= 0, "--checkpoint-every-steps must be >= 0 (0 = off)"),
        (args.checkpoint_every_minutes >= 0, "--checkpoint-every-minutes must be >= 0 (0 = off)"),
        (is_pvt_v2(args.variant) or not args.linear_sra, "--linear-sra applies to PVTv2 variants, not resnet50"),
        (is_pvt_v2(args.variant) or not args.grad_checkpointing, "--grad-checkpointing applies to PVTv2 variants"),
        (not (args.predict and not args.checkpoint), "--predict DIR needs --checkpoint CKPT"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    for flag in ("data", "pretrained", "evaluate", "checkpoint", "predict"):
        value = getattr(args, flag)
        if value is not None and not Path(value).expanduser().exists():
            raise UsageError(f"--{flag} {value}: no such file or folder")
    if args.resume not in (None, "last") and not Path(args.resume).expanduser().is_file():
        raise UsageError(f"--resume {args.resume}: no such checkpoint file (or use --resume last with --name)")


# --- run directory -------------------------------------------------------------------------------------

def default_run_name(args: argparse.Namespace) -> str:
    """e.g. b2_li_384x224, b2+li_224x224 (linear SRA forced on), resnet50_384x224."""
    from .models.registry import PVT_V2_CONFIGS

    name = args.variant
    if is_pvt_v2(args.variant) and args.linear_sra is not None:
        if args.linear_sra and not PVT_V2_CONFIGS[args.variant].linear_sra:
            name += "_li"
        elif not args.linear_sra and PVT_V2_CONFIGS[args.variant].linear_sra:
            name = name.removesuffix("_li") + "_noli"
    return f"{name}_{args.img_size[0]}x{args.img_size[1]}"


def next_version(run_root: Path) -> int:
    existing = [int(m.group(1)) for p in run_root.glob("version_*") if (m := re.fullmatch(r"version_(\d+)", p.name))]
    return max(existing, default=-1) + 1


def find_last_checkpoint(run_root: Path) -> Path:
    """Newest ``last.ckpt`` among a run's versions (``--resume last``)."""
    candidates = sorted(run_root.glob("version_*/checkpoints/last*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise UsageError(f"--resume last: no last.ckpt under {run_root}/version_*/checkpoints; "
                         f"check --logdir and --name")
    return candidates[-1]


# --- assembling a run -----------------------------------------------------------------------------------

def resolve_precision(precision: str, accelerator: str) -> str:
    import torch

    if precision != "auto":
        return precision
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    return "bf16-mixed" if on_gpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32"


def _devices(value: str | int) -> int | str:
    return int(value) if str(value).isdigit() else value


def make_datamodule(args: argparse.Namespace, data_dir: Path):
    from .data import ImageFolderDataModule

    return ImageFolderDataModule(
        data_dir, img_size=tuple(args.img_size), batch_size=args.batch_size, num_workers=args.num_workers,
        val_split=args.val_split, seed=args.seed, augment=args.augment, crop_pct=args.crop_pct,
        bad_images=args.bad_images, verify_images=args.verify_images,
    )


def make_trainer(args: argparse.Namespace, logger, callbacks, plugins=None):
    import lightning as L

    grad_clip = args.grad_clip if args.grad_clip is not None else DEFAULT_GRAD_CLIP.get(args.variant)
    return L.Trainer(
        max_epochs=args.epochs, accelerator=args.accelerator, devices=_devices(args.devices),
        num_nodes=args.num_nodes, strategy=args.strategy, precision=args.precision, logger=logger,
        callbacks=callbacks, plugins=plugins, gradient_clip_val=grad_clip, deterministic=False,
        limit_train_batches=args.limit_train_batches, limit_val_batches=args.limit_val_batches,
        log_every_n_steps=10, benchmark=None,
    )


def train(args: argparse.Namespace) -> int:
    import lightning as L
    from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    from .callbacks import default_callbacks
    from .checkpointing import AtomicCheckpointIO
    from .module import ImageClassifier, scaled_lr
    from .reliability import LastCheckpointSaver, StopOnNonFiniteLoss, explain_stops

    demo = args.data is None
    if demo:
        from .data.demo import ensure_demo_dataset

        data_dir = ensure_demo_dataset()
        _say(f"No --data given: training on the built-in demo dataset at {data_dir}.\n"
             f"  To train on your own images: --data /path/to/root with train/ and val/ class folders "
             f"(or one class-folder root plus --val-split 0.1).")
    else:
        data_dir = Path(args.data).expanduser()
    L.seed_everything(args.seed, workers=True, verbose=False)
    datamodule = make_datamodule(args, data_dir)
    datamodule.setup("fit")  # validates the folders now, before any model is built
    if args.positive_class is not None and args.positive_class not in datamodule.class_names:
        raise UsageError(f"--positive-class {args.positive_class!r} is not a class of {data_dir}; choose one of: "
                         f"{', '.join(datamodule.class_names)}")

    name = args.name or default_run_name(args)
    run_root = Path(args.logdir).expanduser() / name
    resume_from = None
    if args.resume == "last":
        resume_from = find_last_checkpoint(run_root)
    elif args.resume:
        resume_from = Path(args.resume).expanduser()
    launcher = RUN_VERSION_ENV not in os.environ  # DDP workers inherit the launcher's choice
    version = int(os.environ.setdefault(RUN_VERSION_ENV, str(next_version(run_root))))
    logger = TensorBoardLogger(save_dir=str(Path(args.logdir).expanduser()), name=name, version=version,
                               default_hp_metric=False)
    run_dir = Path(logger.log_dir)

    world_batch = args.batch_size * _world_size(args)
    lr = args.lr if args.lr is not None else scaled_lr(world_batch)
    module = ImageClassifier(
        args.variant, num_classes=datamodule.num_classes, class_names=datamodule.class_names,
        img_size=args.img_size, lr=lr, weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs,
        drop_path=args.drop_path, label_smoothing=args.label_smoothing, mixup=args.mixup, cutmix=args.cutmix,
        linear_sra=args.linear_sra, pretrained=args.pretrained, grad_checkpointing=args.grad_checkpointing,
    )
    complexity = module.complexity()
    if args.compile:
        module.model.compile()

    checkpoint = ModelCheckpoint(
        dirpath=run_dir / "checkpoints", filename="best-epoch{epoch:03d}-acc{val/acc:.4f}",
        auto_insert_metric_name=False, monitor="val/acc", mode="max", save_last=True, save_top_k=1,
    )
    callbacks = [checkpoint, StopOnNonFiniteLoss(),
                 LastCheckpointSaver(checkpoint, args.checkpoint_every_steps, args.checkpoint_every_minutes),
                 *default_callbacks(datamodule.class_names, positive_class=args.positive_class,
                                    threshold=args.threshold)]
    if args.ema:
        callbacks.append(EMAWeightAveraging(decay=args.ema_decay))
    args.precision = resolve_precision(args.precision, args.accelerator)
    trainer = make_trainer(args, logger, callbacks, plugins=[AtomicCheckpointIO()])
    if trainer.is_global_zero:
        _save_hparams_yaml(run_dir, args, name, lr, world_batch, complexity, data_dir)
        _say(f"{args.variant}{' (linear SRA)' if module.linear_sra_enabled else ''} | {args.img_size[0]}x"
             f"{args.img_size[1]} | {complexity.params_m:.2f} M params, {complexity.gmacs:.2f} GMACs | "
             f"{datamodule.num_classes} classes | batch {args.batch_size} x {_world_size(args)} | lr {lr:.2e} | "
             f"precision {args.precision} | run dir {run_dir}")

    started = time.perf_counter()
    try:
        with explain_stops(trainer, args):
            trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume_from) if resume_from else None)
    finally:
        if launcher:  # a later run in this process (a notebook, a test) picks its own version
            os.environ.pop(RUN_VERSION_ENV, None)
    if not trainer.is_global_zero:
        return 0
    summary = build_summary(trainer, module, datamodule, checkpoint, complexity, args)
    summary["wall_time_s"] = round(time.perf_counter() - started, 1)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    m = summary["metrics"]
    _say(f"Run saved to {run_dir} | val/acc {_fmt(m.get('val/acc'))} P {_fmt(m.get('val/precision'))} "
         f"R {_fmt(m.get('val/recall'))} | best val/acc {_fmt(summary['best']['val/acc'])} at epoch "
         f"{summary['best']['epoch']} | {summary['wall_time_s']:.0f} s")
    return 0


def _world_size(args: argparse.Namespace) -> int:
    devices = _devices(args.devices)
    per_node = devices if isinstance(devices, int) else 1
    return per_node * args.num_nodes


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _say(message: str) -> None:
    print(message, flush=True)


def _resolved_config(args, name, lr, world_batch, complexity) -> dict[str, Any]:
    config = {k: v for k, v in vars(args).items() if k not in ("config", "explicit")}
    config.update(name=name, lr=lr, total_batch_size=world_batch, params_m=round(complexity.params_m, 3),
                  gmacs=round(complexity.gmacs, 3))
    return config


def _save_hparams_yaml(run_dir: Path, args, name, lr, world_batch, complexity, data_dir: Path) -> None:
    """The resolved configuration: rerun it with ``--config run_dir/hparams.yaml``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    config = _resolved_config(args, name, lr, world_batch, complexity)
    config["data"] = str(data_dir.resolve()) if args.data else None
    rerunnable = {k.replace("_", "-"): v for k, v in config.items()
                  if k not in ("name", "total_batch_size", "params_m", "gmacs", "resume", "evaluate", "predict",
                               "checkpoint", "output", "split")}
    (run_dir / "hparams.yaml").write_text(yaml.safe_dump(rerunnable, sort_keys=True))


def build_summary(trainer, module, datamodule, checkpoint, complexity, args) -> dict[str, Any]:
    """summary.json: the run's final figures (field names are a contract other tools read)."""
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
               if k in ("val/acc", "val/acc5", "val/precision", "val/recall", "val/f1", "val/loss")}
    best_path = checkpoint.best_model_path or None
    best_epoch = int(m.group(1)) if best_path and (m := re.search(r"best-epoch(\d+)", best_path)) else None
    best_score = checkpoint.best_model_score
    figures = callback_figures(trainer)
    return {
        "variant": args.variant,
        "linear_sra": module.linear_sra_enabled,
        "img_size": list(args.img_size),
        "num_classes": datamodule.num_classes,
        "class_names": list(datamodule.class_names),
        "params_m": round(complexity.params_m, 3),
        "gmacs": round(complexity.gmacs, 3),
        "attention_gmacs": round(complexity.attention_gmacs, 3),
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "metrics": metrics,
        "best": {"epoch": best_epoch, "val/acc": None if best_score is None else float(best_score)},
        "epoch_time_s": figures["epoch_time_s"],
        "peak_memory_mb": figures["peak_memory_mb"],
        "memory_device": figures["memory_device"],
        "throughput_img_s": figures["throughput_img_s"],
        "bad_images": len(datamodule.bad_image_paths()),
        "checkpoints": {"best": best_path, "last": checkpoint.last_model_path or None},
        "precision": args.precision,
        "batch_size": args.batch_size,
        "positive_class": args.positive_class,
    }


def callback_figures(trainer) -> dict[str, Any]:
    """Mean epoch time, training throughput and peak memory, as measured by the logging callbacks."""
    from .callbacks import EpochTimer, MemoryMonitor

    timer = next((c for c in trainer.callbacks if isinstance(c, EpochTimer)), None)
    memory = next((c for c in trainer.callbacks if isinstance(c, MemoryMonitor)), None)

    def mean(values):
        return round(sum(values) / len(values), 3) if values else None

    return {
        "epoch_time_s": mean(timer.epoch_times_s) if timer else None,
        "throughput_img_s": mean(timer.throughputs_img_s) if timer else None,
        "peak_memory_mb": round(max(memory.peaks_mb), 1) if memory and memory.peaks_mb else None,
        "memory_device": memory.memory_device if memory else None,
    }


# --- evaluation and prediction ---------------------------------------------------------------------------

def load_classifier(path: str | Path):
    """An ImageClassifier from one of our .ckpt files, read with weights_only=True."""
    from .module import ImageClassifier

    checkpoint = read_state_dict_file(path)  # refuses unsafe pickles with a clear message
    if not isinstance(checkpoint, dict) or "hyper_parameters" not in checkpoint:
        raise CheckpointError(f"{path} is not a pvt-lightning training checkpoint (.ckpt from runs/.../checkpoints)")
    hparams = {**checkpoint["hyper_parameters"], "pretrained": None}
    module = ImageClassifier(**hparams)
    module.load_state_dict(checkpoint["state_dict"])
    return module.eval()


def evaluate(args: argparse.Namespace) -> int:
    import lightning as L

    module = load_classifier(args.evaluate)
    hp = module.hparams
    data_dir = Path(args.data).expanduser() if args.data else _demo_dir()
    args.img_size = list(hp.img_size) if "img_size" not in args.explicit else args.img_size
    datamodule = make_datamodule(args, data_dir)
    datamodule.setup("validate" if args.split == "val" else "test")
    if list(datamodule.class_names) != list(hp.class_names):
        raise UsageError(f"--evaluate: the checkpoint's classes {list(hp.class_names)} differ from {data_dir}'s "
                         f"{list(datamodule.class_names)}")
    trainer = L.Trainer(accelerator=args.accelerator, devices=1, logger=False, precision=resolve_precision(
        args.precision, args.accelerator), limit_val_batches=args.limit_val_batches,
        limit_test_batches=args.limit_val_batches)
    run = trainer.validate if args.split == "val" else trainer.test
    results = run(module, datamodule=datamodule, verbose=False)[0]
    results = {k: float(v) for k, v in results.items()}
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    _say(" | ".join(f"{k} {v:.4f}" for k, v in sorted(results.items())))
    return 0


def predict(args: argparse.Namespace) -> int:
    import torch

    from .data import ImageFolderDataModule

    module = load_classifier(args.checkpoint)
    hp = module.hparams
    img_size = args.img_size if "img_size" in args.explicit else list(hp.img_size)
    datamodule = ImageFolderDataModule.for_prediction(
        Path(args.predict).expanduser(), img_size=tuple(img_size), batch_size=args.batch_size,
        num_workers=args.num_workers, crop_pct=args.crop_pct, bad_images=args.bad_images,
    )
    output = Path(args.output) if args.output else Path(args.checkpoint).expanduser().parent.parent / "predictions.csv"
    if output.exists():
        raise UsageError(f"{output} exists; pass --output NEW.csv (pvt-lightning never overwrites your files)")
    device = torch.device("cuda" if torch.cuda.is_available() and args.accelerator != "cpu" else "cpu")
    module.to(device)
    names = list(hp.class_names)
    k = min(5, len(names))
    rows = 0
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_suffix(output.suffix + ".tmp")
    with torch.inference_mode(), open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "class", "probability", "top5"])
        for images, paths in datamodule.predict_dataloader():
            probs = module(datamodule.normalize(images.to(device))).softmax(dim=-1).float().cpu()
            top_p, top_i = probs.topk(k, dim=-1)
            for path, p, i in zip(paths, top_p.tolist(), top_i.tolist()):
                writer.writerow([path, names[i[0]], f"{p[0]:.6f}",
                                 ";".join(f"{names[c]}:{q:.4f}" for c, q in zip(i, p))])
                rows += 1
    os.replace(tmp, output)
    _say(f"Predicted {rows} images -> {output}")
    return 0


def _demo_dir() -> Path:
    from .data.demo import ensure_demo_dataset

    return ensure_demo_dataset()


# --- entry point --------------------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    from .data import DataError
    from .reliability import RunStopped

    try:
        args, explicit = parse_args(argv)
        args.explicit = explicit
        keep_freed_memory()  # CPU steps stop page-faulting their activations back in (see allocator.py)
        if args.evaluate:
            return evaluate(args)
        if args.predict:
            return predict(args)
        return train(args)
    except (UsageError, DataError, CheckpointError) as err:
        print(f"pvt-lightning: error: {err}", file=sys.stderr)
        return 2
    except RunStopped as err:
        print(f"pvt-lightning: stopped: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
