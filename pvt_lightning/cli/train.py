"""``pvt-lightning train``: a resolved TrainConfig -> data, model, callbacks, Trainer -> fit -> summary.json.

Order matters: the data is scanned first (the recipe depends on its size, and every data error
should come before any model is built), the Trainer before the module (the learning rate is
scaled from the Trainer's real world size), the version folder last (a run that cannot start
leaves nothing behind).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import lightning as L

from pvt_lightning.cli.config import given_of, parse_devices, to_yaml
from pvt_lightning.cli.limits import check_devices
from pvt_lightning.cli.options import TrainConfig
from pvt_lightning import tags
from pvt_lightning.tags import VAL_ACC, VAL_PRECISION, VAL_RECALL
from pvt_lightning.cli.resume import ResumePlan, finished_message, plan_resume, summary_parts, total_wall_time
from pvt_lightning.data.datamodule import default_num_workers
from pvt_lightning.models.registry import variant_spec
from pvt_lightning.errors import NonFiniteLossError, RunStopped, UsageError
from pvt_lightning.training.recipes import RECIPE_FIELDS, Recipe, choose_recipe
from pvt_lightning.cli.assemble import make_callbacks, make_datamodule, make_trainer, resolve_precision, say
from pvt_lightning.runs.rundir import RunPaths, open_run, read_summary, release_version_env, remove_if_empty_run, \
    write_hparams, write_summary
from pvt_lightning.training.optim import scaled_lr

Trainer = L.Trainer
CONFIG = TrainConfig


def train(config: TrainConfig) -> int:
    """Fit a classifier as ``config`` says; returns the exit status (0)."""
    given = given_of(config).all  # before any dataclasses.replace (a replaced config no longer knows)
    plan = plan_resume(config, given_of(config), default_img_size(config))
    if plan is not None and plan.finished:
        say(finished_message(plan))
        return 0
    config = plan.config if plan is not None else config
    data_dir, demo = data_source(config)
    L.seed_everything(config.seed, workers=True, verbose=False)
    config = resolve_data_defaults(config, data_dir, demo)
    datamodule = make_datamodule(config, data_dir, augment=config.augment or "basic", sampler=config.sampler)
    datamodule.setup("fit")  # every data error now, before any model is built
    config = resolve_task(config, datamodule, given)
    config, recipe = resolve_recipe(config, datamodule.split_sizes()["train"], demo, resuming=plan is not None)
    datamodule.augment = config.augment  # the recipe's choice; loaders are built later, at fit
    check_class_options(config, datamodule.class_names)
    check_resume(config, datamodule.class_names)
    check_devices(parse_devices(config.devices), config.accelerator)  # before a version folder is claimed

    paths = open_run(config)
    datamodule.bad_images_file = paths.run_dir / "bad_images.txt"  # kept with the run; written only if any
    try:
        callbacks, checkpoint = make_callbacks(config, paths, datamodule.class_names)
        trainer = make_trainer(config, paths, callbacks)
        config = dataclasses.replace(config, lr=config.lr or scaled_lr(total_batch(config, trainer), config.base_lr))
        module = make_module(config, datamodule, plan)
    except BaseException:
        remove_if_empty_run(paths.run_dir)
        raise
    complexity = module.complexity()
    if config.compile:
        from pvt_lightning.training.compile import compile_regions

        compile_regions(module.model)
    if trainer.is_global_zero:
        # Never "resume" in hparams.yaml: --config hparams.yaml reruns the run, it does not continue it.
        write_hparams(paths, to_yaml(dataclasses.replace(config, resume=None)))
        say(banner(config, recipe, module, complexity, datamodule, trainer, paths, plan))

    started = time.perf_counter()
    previous = read_summary(paths.run_dir) if plan is not None else None
    try:
        fit(trainer, module, datamodule, config, paths)
    finally:
        release_version_env()
    if not trainer.is_global_zero:
        return 0
    write_run_summary(trainer, module, datamodule, checkpoint, complexity, config, recipe, paths,
                      plan=plan, previous=previous, wall_time_s=time.perf_counter() - started)
    return 0


def write_run_summary(trainer, module, datamodule, checkpoint, complexity, config, recipe, paths, *, plan,
                      previous, wall_time_s: float) -> None:
    """summary.json (with ``parts``: one per stretch of a resumed run) and the closing lines."""
    from pvt_lightning.training.summary import build_summary

    summary = build_summary(trainer, module, datamodule, checkpoint, complexity, config, recipe)
    summary.update(class_balance(config, datamodule, module))
    summary["parts"] = summary_parts(plan, previous, summary, wall_time_s)
    summary["wall_time_s"] = total_wall_time(summary["parts"])
    write_summary(paths, summary)
    say(final_line(paths, summary))
    if (skipped := datamodule.bad_images_report()) is not None:
        say(skipped)


def default_img_size(config: TrainConfig) -> list[int]:
    """The input size a run of ``config`` defaults to (its name does too): the demo's without --data, else the
    variant's."""
    from pvt_lightning.data.demo import DEMO_IMG_SIZE

    size = config.img_size or (DEMO_IMG_SIZE if config.data is None else None)
    return list(variant_spec(config.variant).preprocessing(size, config.crop_pct).img_size)


def fit(trainer: Trainer, module, datamodule, config: TrainConfig, paths: RunPaths) -> None:
    from pvt_lightning.training.reliability import explain_stops

    try:
        with explain_stops(trainer, config):
            trainer.fit(module, datamodule=datamodule,
                        ckpt_path=str(paths.resume_from) if paths.resume_from else None)
    except RunStopped as err:
        if trainer.is_global_zero and not list(paths.checkpoints.glob("*.ckpt")):
            note_failed_start(paths, err)
        if isinstance(err.__context__, NonFiniteLossError) and (suspects := loss_suspects(config, module)):
            raise RunStopped(f"{err} {suspects}", err.exit_code) from None
        raise
    except BaseException as err:
        if trainer.is_global_zero and not list(paths.checkpoints.glob("*.ckpt")):
            note_failed_start(paths, err)
        raise


def loss_suspects(config: TrainConfig, module) -> str:
    """Settings besides --lr and --grad-clip that can make the loss NaN or infinite, where this run sets them far
    from their usual range."""
    suspects = []
    if config.weight_decay and config.weight_decay >= 1:
        suspects.append(f"--weight-decay {config.weight_decay:g} (AdamW uses 0.01-0.1)")
    if config.loss == "focal" and config.focal_gamma > 5:
        suspects.append(f"--focal-gamma {config.focal_gamma:g} (focal loss uses 0-5)")
    weights = module.hparams.get("class_weights")
    if weights and max(weights) > 100:
        largest = max(range(len(weights)), key=lambda i: weights[i])
        suspects.append(f"--class-weights {config.class_weights} (a weight of {weights[largest]:g} for "
                        f"{module.hparams.class_names[largest]!r})")
    if config.head_lr_scale and config.head_lr_scale > 10:
        suspects.append(f"--head-lr-scale {config.head_lr_scale:g}")
    return f"Also check {', '.join(suspects)}." if suspects else ""


def note_failed_start(paths: RunPaths, err: BaseException) -> None:
    """A run that stopped before its first checkpoint says why in its folder (``failed.txt``)."""
    from pvt_lightning.runs.io import write_file

    reason = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
    write_file(paths.run_dir / "failed.txt", f"This run stopped before its first checkpoint.\n{reason}\n",
               overwrite=True)


def data_source(config: TrainConfig) -> tuple[Path, bool]:
    """``--data``, or the built-in demo dataset (generated once) when it is omitted."""
    if config.data is not None:
        root = Path(config.data).expanduser()
        check_split_folders(root)
        return root, False
    from pvt_lightning.data.demo import ensure_demo_dataset

    data_dir = ensure_demo_dataset()
    say(f"No --data given: training on the built-in demo dataset at {data_dir}.\n"
        "  To train on your own images: --data /path/to/root with train/ and val/ class folders "
        "(or one class-folder root plus --val-split 0.1).")
    return data_dir, True


SPLIT_FOLDERS = ("train", "val", "test")


def check_split_folders(root: Path) -> None:
    """A root holding split folders but no train/ (e.g. only test/) would be read as classes named after the
    splits: refuse it, saying what training needs."""
    if not root.is_dir():
        return
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if folders and "train" not in folders and set(folders) <= set(SPLIT_FOLDERS):
        raise UsageError(f"--data {root} holds only {', '.join(f + '/' for f in folders)}: training needs "
                         f"{root}/train/<class>/ and {root}/val/<class>/ (or one folder per class with --val-split); "
                         "a test/ split is for pvt-lightning evaluate --split test")


def resolve_data_defaults(config: TrainConfig, data_dir: Path, demo: bool) -> TrainConfig:
    """Absolute --data, preprocessing (the demo's own size, else the variant's record), loader workers and
    precision, where unset."""
    from pvt_lightning.data.demo import DEMO_IMG_SIZE

    preprocessing = variant_spec(config.variant).preprocessing(config.img_size or (DEMO_IMG_SIZE if demo else None),
                                                               config.crop_pct)
    workers = config.num_workers if config.num_workers is not None else default_num_workers()
    return dataclasses.replace(config, data=None if demo else str(data_dir.resolve()),
                               img_size=list(preprocessing.img_size), crop_pct=preprocessing.crop_pct,
                               num_workers=workers,
                               precision=resolve_precision(config.precision, config.accelerator))


def resolve_task(config: TrainConfig, datamodule, given: frozenset[str] = frozenset()) -> TrainConfig:
    """``--task`` resolved from the data; multi-label: bce unless --loss says asl, val/map for the default monitor,
    and a UsageError for options that only mean something with one softmax over classes."""
    task = datamodule.task
    if task == "multiclass":
        if config.loss in ("bce", "asl"):
            raise UsageError(f"--loss {config.loss} is a multi-label loss (one sigmoid per class) but the data is "
                             "single-label; use ce or focal, or a multi-label manifest (docs/multilabel.md)")
        return dataclasses.replace(config, task=task)
    if config.loss in ("ce", "focal") and (config.loss in ("focal",) or "loss" in given):
        raise UsageError(f"--loss {config.loss} needs one class per image (softmax); multi-label trains with "
                         "--loss bce (default) or asl")
    if config.sampler != "none":
        raise UsageError(f"--sampler {config.sampler} draws images by their one class; multi-label images have "
                         "several: use --class-weights balanced (positive weights per class) instead")
    if "label_smoothing" in given and config.label_smoothing:
        raise UsageError("--label-smoothing smooths a softmax target; multi-label (one sigmoid per class) has none")
    monitor = tags.VAL_MAP if config.monitor == VAL_ACC else config.monitor  # val/acc is single-label only
    return dataclasses.replace(config, task=task, loss="bce" if config.loss == "ce" else config.loss,
                               label_smoothing=0.0, monitor=monitor)


def resolve_recipe(config: TrainConfig, num_train_images: int, demo: bool,
                   resuming: bool = False) -> tuple[TrainConfig, Recipe]:
    """Fill every recipe field the user left unset from the recipe (then the variant's own defaults); the recipe's
    name is kept, so hparams.yaml reruns the same recipe. A fresh run's warm-up is capped (``capped_warmup``)."""
    from pvt_lightning.models.registry import DEFAULT_DROP_PATH, DEFAULT_GRAD_CLIP

    try:
        recipe = choose_recipe(config.recipe, pretrained=config.pretrained is not None,
                               num_train_images=num_train_images, demo=demo, variant=config.variant)
    except ValueError as err:
        raise UsageError(f"--recipe: {err}") from None
    if recipe.name == "finetune" and config.pretrained is None:
        recipe = dataclasses.replace(recipe, reason=recipe.reason.replace(
            "fine-tuning pretrained weights", "the fine-tuning schedule, here from random weights (no --pretrained)"))
    variant_defaults = {"drop_path": DEFAULT_DROP_PATH[config.variant],
                        "grad_clip": DEFAULT_GRAD_CLIP.get(config.variant, 0.0)}
    values = recipe.resolve(vars(config), variant_defaults)
    asked = values["warmup_epochs"]
    if not resuming and (capped := capped_warmup(asked, values["epochs"])) != asked:  # resumed: the run's schedule
        values["warmup_epochs"] = capped
        recipe = dataclasses.replace(recipe, reason=f"{recipe.reason}; warm-up capped from {asked:g} to {capped:g} "
                                     f"epochs, {WARMUP_SHARE:.0%} of a run it would fill")
    return dataclasses.replace(config, recipe=recipe.name, **values), recipe


WARMUP_SHARE = 0.25
"""A warm-up as long as the run or longer is cut to this share of its epochs."""


def capped_warmup(warmup_epochs: float, epochs: int) -> float:
    """``warmup_epochs``, or ``WARMUP_SHARE`` x ``epochs`` when the warm-up would last the whole run (the learning
    rate would still be rising when training ends)."""
    return WARMUP_SHARE * epochs if warmup_epochs >= epochs else warmup_epochs


def check_class_options(config: TrainConfig, class_names: list[str]) -> None:
    """--positive-class and a per-class --monitor must name a class of the data."""
    if config.positive_class is not None and config.positive_class not in class_names:
        raise UsageError(f"--positive-class {config.positive_class!r} is not a class of the data; choose one of: "
                         f"{', '.join(class_names)}")
    parts = config.monitor.split("/", 2)
    if len(parts) == 3 and parts[2] not in class_names:
        raise UsageError(f"--monitor {config.monitor}: {parts[2]!r} is not a class of the data; classes: "
                         f"{', '.join(class_names)}")


def check_resume(config: TrainConfig, class_names: list[str]) -> None:
    """``--resume`` only continues the same run: same model, input size and classes (else use --pretrained)."""
    from pvt_lightning.runs.checkpoint_info import check_resume_compatible, inspect_checkpoint
    from pvt_lightning.runs.rundir import resume_checkpoint

    checkpoint = resume_checkpoint(config)
    if checkpoint is not None:
        check_resume_compatible(inspect_checkpoint(checkpoint), config.variant, config.img_size, class_names,
                                config.linear_sra)


def total_batch(config: TrainConfig, trainer: Trainer) -> int:
    """Images per optimizer step over every device, node and accumulation step (``scaled_lr``'s total batch)."""
    return config.batch_size * trainer.world_size * trainer.accumulate_grad_batches


def make_module(config: TrainConfig, datamodule, plan: ResumePlan | None = None):
    """The ImageClassifier of ``config``; resumed, it takes its weights from the checkpoint, not --pretrained."""
    from pvt_lightning.data.sampling import class_counts, resolve_class_weights
    from pvt_lightning.training.module import ImageClassifier

    train_counts = class_counts(datamodule.samples("train"), datamodule.num_classes)
    if config.task == "multilabel" and config.class_weights == "balanced":  # positive weights: negatives / positives
        total = len(datamodule.samples("train"))
        weights = [(total - n) / max(n, 1) for n in train_counts]
    else:
        weights = resolve_class_weights(config.class_weights, datamodule.class_names, train_counts)
    extra = {}
    if plan is not None:
        extra["pretrained"] = None
        if plan.class_weights is not None and config.class_weights == "none":  # no hparams.yaml: the checkpoint's
            weights = plan.class_weights
    # Every option named like a constructor parameter (variant, img_size, crop_pct, lr, ...) passes through.
    return ImageClassifier.from_options(config, num_classes=datamodule.num_classes,
                                        class_names=datamodule.class_names, class_weights=weights, **extra)


def class_balance(config: TrainConfig, datamodule, module) -> dict:
    """summary.json's ``class_counts``, ``imbalance_ratio`` and ``imbalance_handling`` (data/sampling.py)."""
    from pvt_lightning.data.sampling import imbalance_summary

    handling = {"class_weights": config.class_weights, "sampler": config.sampler, "loss": config.loss}
    if config.loss == "focal":
        handling["focal_gamma"] = config.focal_gamma
    if config.loss == "asl":
        handling.update(asl_gamma_neg=config.asl_gamma_neg, asl_gamma_pos=config.asl_gamma_pos,
                        asl_clip=config.asl_clip)
    splits = {split: datamodule.samples(split) for split in ("train", "val")}
    return imbalance_summary(datamodule.class_names, splits, module.hparams.class_weights, handling)


def banner(config: TrainConfig, recipe: Recipe, module, complexity, datamodule, trainer: Trainer,
           paths: RunPaths, plan: ResumePlan | None = None) -> str:
    """What is about to run, with the recipe, why it was chosen, every value it resolved to, and warnings about
    schedules that cannot do what they say."""
    h, w = config.img_size
    devices = f"{config.batch_size} x {trainer.world_size} device(s)"
    if trainer.accumulate_grad_batches > 1:
        devices += f" x {trainer.accumulate_grad_batches} accumulated"
    from pvt_lightning.data.sampling import imbalance_line

    recipe_values = ", ".join(f"{key} {getattr(config, key)}" for key in RECIPE_FIELDS)
    lines = [f"{config.variant}{' (linear SRA)' if module.linear_sra_enabled else ''} | {h}x{w} | "
             f"{complexity.params_m:.2f} M params, {complexity.gmacs:.2f} GMACs | {datamodule.num_classes} classes | "
             f"batch {devices} = {total_batch(config, trainer)} | lr {config.lr:.2e} | precision "
             f"{trainer.precision} | run dir {paths.run_dir}",
             f"recipe {recipe.name} ({recipe.reason}): {recipe_values}",
             imbalance_line(class_balance(config, datamodule, module))]
    if config.task == "multilabel":
        lines.append(task_line(datamodule))
    if plan is not None:
        lines.append(plan.describe())
    return "\n".join(lines + schedule_warnings(config))


def task_line(datamodule) -> str:
    """Multi-label's banner line: the task, labels per image and the images without a label, per split."""
    parts = []
    for split in ("train", "val"):
        targets = datamodule.samples(split).targets
        parts.append(f"{split} {targets.sum(axis=1).mean():.2f} labels per image, {datamodule.unlabelled(split)} "
                     "unlabelled")
    return f"task multilabel (one sigmoid per class): {'; '.join(parts)}"


def schedule_warnings(config: TrainConfig) -> list[str]:
    """Banner lines for schedules that do not do what their flags suggest."""
    warnings = []
    if config.freeze_backbone_epochs and config.freeze_backbone_epochs >= config.epochs:
        warnings.append(f"warning: --freeze-backbone-epochs {config.freeze_backbone_epochs} >= --epochs "
                        f"{config.epochs}: the backbone never trains, the whole run is a linear probe of the head")
    return warnings


def final_line(paths: RunPaths, summary: dict) -> str:
    m, best = summary["metrics"], summary["best"]
    head = tags.VAL_MAP if tags.VAL_MAP in m else VAL_ACC
    return (f"Run saved to {paths.run_dir} | {head} {_fmt(m.get(head))} P {_fmt(m.get(VAL_PRECISION))} "
            f"R {_fmt(m.get(VAL_RECALL))} | best {best['metric']} {_fmt(best['value'])} at epoch "
            f"{best['epoch']} | {summary['wall_time_s']:.0f} s")


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


run = train
