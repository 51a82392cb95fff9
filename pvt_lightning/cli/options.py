"""The typed option groups of every subcommand: one dataclass per group, one flag and YAML key per field.

A subcommand's configuration is the union of the groups it needs (``TrainConfig``, ``EvaluateConfig``,
``PredictConfig``), so a flag means the same thing wherever it appears and ``evaluate --help`` lists no
training flags. Fields left ``None`` are resolved when the job starts: recipe fields by the chosen recipe,
``img_size`` and ``crop_pct`` by the checkpoint or the variant's preprocessing record (models/registry.py),
``lr`` from ``base_lr`` and the real total batch, ``num_workers`` from the CPU count.

To add an option: add a field with ``option(default, help, group)`` to the group it belongs to, with the
narrowest type (``PositiveInt``, ``Literal[...]``...) and, if needed, a check in ``cli/config.validate``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from jsonargparse.typing import (ClosedUnitInterval, NonNegativeFloat, NonNegativeInt, OpenUnitInterval,
                                 PositiveFloat, PositiveInt, restricted_number_type)

from pvt_lightning.data.decode import DEFAULT_MAX_IMAGE_PIXELS
from pvt_lightning.models import VARIANTS
from pvt_lightning.tags import VAL_ACC
from pvt_lightning.training.recipes import RECIPE_NAMES

FractionBelowOne = restricted_number_type("FractionBelowOne", float, [(">=", 0), ("<", 1)])
LayerDecay = restricted_number_type("LayerDecay", float, [(">", 0), ("<=", 1)])
BatchLimit = Union[NonNegativeInt, NonNegativeFloat]
"""Lightning's limit_*_batches / val_check_interval: an int counts batches, a float is a fraction of an epoch."""
PRECISIONS = ("auto", "32", "bf16-mixed", "16-mixed", "64", 32, 64)
"""32 and 64 also as YAML numbers; validate() turns them into strings."""
STRATEGIES = ("auto", "ddp", "ddp_spawn", "ddp_notebook", "ddp_find_unused_parameters_true", "fsdp", "deepspeed",
              "single_device", "dp")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")
GROUPS = {
    "model": "model", "data": "data", "input": "input size and preprocessing (default: the checkpoint's own)",
    "recipe": "recipe (unset values come from --recipe)", "imbalance": "class imbalance",
    "hardware": "hardware and scale", "trainer": "Lightning Trainer options",
    "run": "run folder, logging and checkpoints", "evaluate": "evaluation", "predict": "prediction",
    "export": "export", "compare": "comparing runs", "output": "output files",
}
"""Help-section titles by group key; a group not listed here is titled by its key."""


def option(default: Any, help: str, group: str, **flag: Any) -> Any:
    """A dataclass field that becomes the flag ``--field-name`` in the help section ``group``."""
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
class InputOptions:
    """What the network sees: input size and evaluation crop (training: the run's; inference: the checkpoint's)."""

    img_size: Optional[list[PositiveInt]] = option(None, "input height and width, e.g. 384 224 (train default: "
                                                   "224 224, the demo's own size without --data; evaluate/"
                                                   "predict default: the checkpoint's)", "input", nargs=2,
                                                   metavar=("H", "W"))
    crop_pct: Optional[float] = option(None, "evaluation: resize to size/crop_pct, then centre crop (train "
                                       "default: 0.875; evaluate/predict/export default: the checkpoint's)",
                                       "input")


@dataclass
class LoaderOptions:
    """How image files become batches."""

    batch_size: PositiveInt = option(64, "images per device per step (training: before accumulation)", "data")
    num_workers: Optional[NonNegativeInt] = option(None, "data-loader workers per device (default: min(8, CPUs))",
                                                   "data")
    bad_images: Literal["skip", "error"] = option("skip", "unreadable image files: skip them (listed and counted) "
                                                  "or stop with the path", "data")
    max_image_pixels: NonNegativeInt = option(DEFAULT_MAX_IMAGE_PIXELS, "pixel budget per image, read from the file "
                                              "header before decoding; larger images count as unreadable "
                                              "(decompression bombs); 0: no limit", "data")


@dataclass
class DataOptions:
    """Where the labelled images are."""

    data: Optional[str] = option(None, "ImageFolder root with train/ and val/ (optional test/) class folders, or "
                                 "one class-folder root with --val-split, or a manifest train.csv / .parquet "
                                 "(path,label[,split]; val.csv, test.csv beside it), or a shards folder "
                                 "(pvt-lightning shards); omitted: the built-in demo dataset", "data")
    classes: Optional[str] = option(None, "classes file, one name per line: the class order, or a subset (images "
                                    "of other classes are counted and skipped)", "data", metavar="FILE")
    val_split: Optional[OpenUnitInterval] = option(None, "fraction held out for validation (stratified, seeded) "
                                                   "when --data has no val/ folder", "data")
    seed: int = option(0, "random seed (data split, init, augmentation)", "data")


@dataclass
class TaskOptions:
    """Single- or multi-label training."""

    task: Literal["auto", "multiclass", "multilabel"] = option(
        "auto", "multiclass: one class per image (softmax); multilabel: any number of classes per image (one sigmoid "
        "each; a manifest with a labels column or 0/1 class columns, docs/multilabel.md); auto: multilabel for such "
        "a manifest", "data")


@dataclass
class AugmentOptions:
    """Training-time augmentation and the image checks before a fit."""

    augment: Optional[Literal["basic", "strong"]] = option(None, "basic: random resized crop + flip; strong: adds "
                                                           "RandAugment-like ops, colour jitter, random erasing "
                                                           "(default: the recipe's)", "data")
    augment_device: Literal["auto", "cpu", "gpu"] = option("auto", "where training augmentation runs: gpu = per "
                                                            "batch on the device (loader workers only decode), cpu "
                                                            "= in the loader workers, auto = gpu when training on "
                                                            "CUDA", "data")
    verify_images: bool = option(False, "decode every image once before training and exclude the bad ones", "data")


@dataclass
class OutputOptions:
    """Files the user asked for."""

    overwrite: bool = option(False, "allow replacing existing output files (never needed for run folders)", "output")


@dataclass
class RecipeOptions:
    """Optimisation and regularisation; unset values come from the recipe."""

    recipe: Literal[RECIPE_NAMES] = option("auto", "defaults for the fields below that you leave unset; auto "
                                           "chooses from the data (see docs/recipe.md)", "recipe")
    epochs: Optional[PositiveInt] = option(None, "epochs (default: the recipe's)", "recipe")
    lr: Optional[PositiveFloat] = option(None, "peak learning rate; default: --base-lr x total batch / 512, the "
                                         "total batch being batch size x devices x nodes x accumulation", "recipe")
    base_lr: Optional[PositiveFloat] = option(None, "learning rate per 512 images of total batch (default: the "
                                              "recipe's, 5e-4 in the paper recipe)", "recipe")
    weight_decay: Optional[NonNegativeFloat] = option(None, "AdamW weight decay, not on norms and biases", "recipe")
    warmup_epochs: Optional[NonNegativeFloat] = option(None, "linear warm-up before the cosine decay (one as long "
                                                       "as the run is cut to 1/4 of it)", "recipe")
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
    loss: Literal["ce", "focal", "bce", "asl"] = option(
        "ce", "training loss: cross-entropy or focal (with --focal-gamma); multi-label: bce (binary cross-entropy, "
        "its default) or asl (asymmetric loss, --asl-*)", "imbalance")
    focal_gamma: NonNegativeFloat = option(2.0, "focal loss exponent: (1 - p)^gamma down-weights easy images; "
                                           "0 = cross-entropy", "imbalance")
    asl_gamma_neg: NonNegativeFloat = option(4.0, "asymmetric loss: focusing exponent of the negatives", "imbalance")
    asl_gamma_pos: NonNegativeFloat = option(0.0, "asymmetric loss: focusing exponent of the positives (0 or 1)",
                                             "imbalance")
    asl_clip: FractionBelowOne = option(0.05, "asymmetric loss: probability margin m; negatives with p < m add no "
                                        "loss", "imbalance")


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
    progress_bar: bool = option(True, "tqdm progress bars; --no-progress-bar: one line per epoch only (logs, "
                                "notebooks)", "trainer")
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
    resume: Optional[str] = option(None, "continue a run from its checkpoint, in the same version folder, with its "
                                   "saved settings (hparams.yaml); only flags like --epochs, --max-steps, --devices "
                                   "may change (docs/resume.md); 'last' = newest last.ckpt of the run --name", "run",
                                   metavar="PATH|last")
    monitor: str = option(VAL_ACC, "metric that picks the best checkpoint: any logged val/... tag, e.g. val/f1 "
                          "or val/recall/<class>", "run")
    monitor_mode: Literal["max", "min"] = option("max", "whether larger or smaller --monitor is better", "run")
    early_stopping: NonNegativeInt = option(0, "stop after N epochs without --monitor improving (0 = off)", "run")
    checkpoint_every_steps: NonNegativeInt = option(0, "also save last.ckpt every N training steps (0 = off)",
                                                    "run")
    checkpoint_every_minutes: NonNegativeFloat = option(30.0, "also save last.ckpt every M minutes of training "
                                                        "(0 = off); SIGTERM always saves it", "run")
    positive_class: Optional[str] = option(None, "also report precision/recall of this class (one-vs-rest)", "run")
    threshold: ClosedUnitInterval = option(0.5, "probability threshold for --positive-class; multi-label: of "
                                           "val/precision, val/recall, val/f1 and predict's labels", "run")
    report_precision: Optional[list[ClosedUnitInterval]] = option(
        None, "every validation epoch, per class the highest recall with at least this precision (one-vs-rest), "
        "logged as val/recall@precision0.90[/<class>]; several values allowed, at most two decimals each (default: "
        "0.9)", "run", nargs="+", metavar="P")
    inference_seconds: NonNegativeFloat = option(3.0, "at the end of training, measure inference speed (batch "
                                                 "size and batch 1) for this many seconds; 0 = off", "run")


@dataclass
class EvaluateOptions:
    """Evaluating a trained checkpoint on one split of labelled data."""

    checkpoint: Optional[str] = option(None, "the .ckpt, or an exported .onnx / .pt2 file, to evaluate (required)",
                                       "evaluate", metavar="CKPT")
    split: Literal["val", "test"] = option("val", "which split of --data", "evaluate")
    output: Optional[str] = option(None, "also write the macro metrics as JSON here", "evaluate", metavar="FILE")
    output_dir: Optional[str] = option(None, "folder for report.json, per_class.csv, predictions.csv, the plots and "
                                       "operating_point.json (default: eval_<split>_<checkpoint> in the "
                                       "checkpoint's run folder)", "evaluate", metavar="DIR")
    calibrate: bool = option(False, "fit temperature scaling on --split and report ECE/NLL before and after",
                             "evaluate")
    target_precision: Optional[ClosedUnitInterval] = option(None, "per class, the lowest probability threshold with "
                                                            "at least this precision on --split; writes "
                                                            "operating_point.json", "evaluate", metavar="P")
    target_recall: Optional[ClosedUnitInterval] = option(None, "per class, the highest threshold with at least "
                                                         "this recall on --split (instead of --target-precision)",
                                                         "evaluate", metavar="R")
    operating_point: Optional[str] = option(None, "measure this operating_point.json on --split (e.g. thresholds "
                                            "chosen on val, checked on test)", "evaluate", metavar="FILE")
    tta: bool = option(False, "test-time augmentation: mean of the logits of each image and its horizontal flip",
                       "evaluate")
    limit_val_batches: Optional[BatchLimit] = option(None, "evaluate only this many batches (int) or this "
                                                     "fraction (float) of the split", "evaluate")
    explain: NonNegativeInt = option(0, "Grad-CAM maps of the N most confident mistakes and of right and wrong "
                                     "answers of the lowest-recall classes: explanations.png and explanations/ in "
                                     "--output-dir (needs pvt-lightning[explain])", "evaluate", metavar="N")
    report_precision: Optional[list[ClosedUnitInterval]] = option(
        None, "per class, the highest recall with at least this precision (one-vs-rest), in report.json and "
        "per_class.csv; several values allowed (default: 0.9)", "evaluate", nargs="+", metavar="P")


@dataclass
class PredictOptions:
    """Predicting every image under a folder with a checkpoint or an exported model."""

    checkpoint: Optional[str] = option(None, "a .ckpt, or an exported .onnx / .pt2 file (required)", "predict",
                                       metavar="CKPT")
    input: Optional[str] = option(None, "folder of images to predict, searched recursively, or one image file "
                                  "(required)", "predict", metavar="DIR|FILE")
    output: Optional[str] = option(None, "a .csv or .parquet file, the format by its extension, same columns "
                                   "(default: predictions.csv in the checkpoint's run); a stopped run keeps its "
                                   "parts next to it and the same command resumes (docs/large_datasets.md)",
                                   "predict", metavar="FILE")
    topk: NonNegativeInt = option(0, "also write the K most probable classes as columns top1_class, top1_prob ... "
                                  "topK_class, topK_prob (0: none)", "predict", metavar="K")
    operating_point: Optional[str] = option(None, "apply this operating_point.json (temperature and per-class "
                                            "thresholds): adds a decision column, probabilities become calibrated",
                                            "predict", metavar="FILE")
    tta: bool = option(False, "test-time augmentation: mean of the logits of each image and its horizontal flip",
                       "predict")


@dataclass
class TrainConfig(OutputOptions, RunOptions, TrainerOptions, HardwareOptions, ImbalanceOptions, RecipeOptions,
                  AugmentOptions, LoaderOptions, InputOptions, TaskOptions, DataOptions, ModelOptions):
    """``pvt-lightning train``: every option of a fit (``None``: resolved when the run starts)."""


@dataclass
class EvaluateConfig(OutputOptions, EvaluateOptions, HardwareOptions, LoaderOptions, InputOptions, DataOptions):
    """``pvt-lightning evaluate``: a checkpoint measured on one split of labelled data."""


@dataclass
class PredictConfig(OutputOptions, PredictOptions, HardwareOptions, LoaderOptions, InputOptions):
    """``pvt-lightning predict``: a checkpoint or exported file applied to a folder of images."""
