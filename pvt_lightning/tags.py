"""Every tag a run logs (TensorBoard scalars, images, PR curves; the same names in metrics.csv), named once.

Writers (``training/module.py``, ``training/callbacks/``) log these names and readers (``runs/compare.py``,
``training/summary.py``, the HParams tab) look them up, so a tag is spelled in one place. The names are a
contract: runs already on disk, dashboards and ``--monitor`` values use them. Every epoch-level scalar is
logged at step = epoch index. This module imports nothing from the package.
"""

from __future__ import annotations

# --- ImageClassifier's metrics: "<stage>/<metric>", for stage "val" and "test" ---------------------------------

VAL = "val"
TEST = "test"

ACC = "acc"
ACC5 = "acc5"
PRECISION = "precision"
RECALL = "recall"
F1 = "f1"
LOSS = "loss"
AP = "ap"
"""Metric names inside a stage: top-1/top-5 accuracy, macro precision/recall/F1, cross-entropy, macro average
precision (single-label: ``val/ap``, logged by ``RecallAtPrecisionReport``, exact or binned by size:
``training/curves.py``)."""
MAP = "map"
"""Multi-label (docs/multilabel.md): ``map`` is the macro average precision over classes, ``ap/<class>`` each
class's; ``precision``, ``recall`` and ``f1`` are then macro figures at ``--threshold`` on each class's sigmoid, and
``loss`` the training loss's BCE (summed over classes, mean over images)."""


def stage_tag(stage: str, metric: str) -> str:
    """``val/acc``, ``test/f1``..."""
    return f"{stage}/{metric}"


VAL_ACC = stage_tag(VAL, ACC)
VAL_ACC5 = stage_tag(VAL, ACC5)
VAL_PRECISION = stage_tag(VAL, PRECISION)
VAL_RECALL = stage_tag(VAL, RECALL)
VAL_F1 = stage_tag(VAL, F1)
VAL_LOSS = stage_tag(VAL, LOSS)
VAL_AP = stage_tag(VAL, AP)
VAL_MAP = stage_tag(VAL, MAP)


def ap_tag(class_name: str, stage: str = VAL) -> str:
    """Multi-label: ``val/ap/<class>``, the class's average precision."""
    return f"{stage}/{AP}/{class_name}"


SUMMARY_METRICS = (VAL_ACC, VAL_ACC5, VAL_PRECISION, VAL_RECALL, VAL_F1, VAL_LOSS, VAL_MAP)
"""The final values summary.json keeps under ``metrics`` (those the run logs: ``val/map`` is multi-label's)."""
MULTILABEL_HEADLINE_METRICS = (VAL_MAP, VAL_PRECISION, VAL_RECALL, VAL_F1)
HEADLINE_METRICS = (VAL_ACC, VAL_PRECISION, VAL_RECALL, VAL_F1)
"""Macro figures the HParams tab lists for every run."""

TRAIN_LOSS = "train/loss"
TRAIN_LR = "train/lr"
"""Training loss (epoch mean) and the schedule's lr at scale 1."""
PROGRESS_LOSS = "loss"
"""The step loss on the progress bar only (not sent to the loggers)."""
EPOCH_STEP = "step"
"""Lightning's key for the x-axis of epoch-level scalars: logged as the epoch index."""

# --- per-class figures (ClassificationReport) -------------------------------------------------------------------

PER_CLASS_PREFIXES = {PRECISION: f"{VAL_PRECISION}/", RECALL: f"{VAL_RECALL}/"}
"""Tag prefixes of the per-class precision and recall scalars: ``val/precision/<class>``, ``val/recall/<class>``."""


def per_class_tags(class_name: str) -> tuple[str, str]:
    """``val/precision/<class>`` and ``val/recall/<class>``."""
    return PER_CLASS_PREFIXES[PRECISION] + class_name, PER_CLASS_PREFIXES[RECALL] + class_name


POSITIVE_PREFIXES = {PRECISION: f"{VAL}/positive/{PRECISION}/", RECALL: f"{VAL}/positive/{RECALL}/"}
"""Tag prefixes of one class's one-vs-rest precision and recall at ``--threshold``."""


def positive_class_tags(class_name: str) -> tuple[str, str]:
    """Tags of the one-class-vs-rest precision and recall at the chosen threshold."""
    return POSITIVE_PREFIXES[PRECISION] + class_name, POSITIVE_PREFIXES[RECALL] + class_name


CONFUSION_MATRIX = f"{VAL}/confusion_matrix"
"""Image: the validation confusion matrix, rows true, columns predicted."""
PR_CURVE_PREFIX = f"{VAL}/pr_curve/"
"""PR-curve plugin data per class: ``val/pr_curve/<class>``."""


def pr_curve_tag(class_name: str) -> str:
    return PR_CURVE_PREFIX + class_name


# --- recall at a fixed precision (RecallAtPrecisionReport, --report-precision) ----------------------------------

RECALL_AT_PRECISION = "recall@precision"
"""One-vs-rest, per class: the highest recall whose precision is at least P (0 where P is never reached)."""
UNREACHED_AT_PRECISION = "unreached@precision"
"""How many classes never reach precision P (their recall at P is reported as 0)."""


def precision_label(precision: float) -> str:
    """P as tags name it: two decimals, ``0.9`` -> ``"0.90"``."""
    return f"{precision:.2f}"


def recall_at_precision_tag(precision: float, class_name: str | None = None, stage: str = VAL) -> str:
    """``val/recall@precision0.90`` (macro mean over classes) or ``val/recall@precision0.90/<class>``."""
    tag = f"{stage}/{RECALL_AT_PRECISION}{precision_label(precision)}"
    return tag if class_name is None else f"{tag}/{class_name}"


def unreached_tag(precision: float, stage: str = VAL) -> str:
    """``val/unreached@precision0.90``: the number of classes whose precision never reaches P."""
    return f"{stage}/{UNREACHED_AT_PRECISION}{precision_label(precision)}"


_RECALL_AT_PRECISION_PREFIX = f"{VAL}/{RECALL_AT_PRECISION}"


def parse_recall_at_precision(tag: str) -> tuple[float, str | None] | None:
    """``(P, class or None)`` of a ``val/recall@precisionP[/<class>]`` tag; None for any other tag."""
    if not tag.startswith(_RECALL_AT_PRECISION_PREFIX):
        return None
    label, _, class_name = tag[len(_RECALL_AT_PRECISION_PREFIX):].partition("/")
    try:
        precision = float(label)
    except ValueError:
        return None
    if label != precision_label(precision):
        return None
    return precision, class_name or None


# --- time, throughput, FLOPs ------------------------------------------------------------------------------------

TIME_TAG = "time/epoch_s"
"""Training time of the epoch, validation excluded (slowest rank)."""
THROUGHPUT_TAG = "throughput/train_img_s"
"""Training images per second over all ranks."""
FLOPS_TAG = "perf/flops_per_s"
"""Model FLOPs per second of training (all ranks)."""
MFU_TAG = "perf/mfu"
"""``perf/flops_per_s`` as a share of the devices' dense peak, where the peak is known."""

# --- memory -----------------------------------------------------------------------------------------------------

PEAK_RESERVED_MB = "memory/peak_reserved_mb"
"""CUDA: peak memory reserved by torch's caching allocator (what nvidia-smi shows as used)."""
PEAK_ALLOCATED_MB = "memory/peak_allocated_mb"
"""CUDA: peak memory held by live tensors."""
PEAK_PSS_MB = "memory/peak_pss_mb"
"""CPU: proportional set size of the process and its loader workers (pages they share count once in total)."""
PEAK_RSS_MB = "memory/peak_rss_mb"
"""CPU, runs logged before PSS replaced it: read back, no longer written."""

CUDA_MEMORY_TAGS = (PEAK_RESERVED_MB, PEAK_ALLOCATED_MB)
"""What a run on CUDA logs every epoch; the first is the run's memory figure."""
CPU_MEMORY_TAGS = (PEAK_PSS_MB,)
"""What a run on CPU logs every epoch; the first is the run's memory figure."""
MEMORY_TAGS = CUDA_MEMORY_TAGS + CPU_MEMORY_TAGS + (PEAK_RSS_MB,)
"""Every memory tag, in order of preference for a run's one memory figure (each family's figure first)."""


def memory_device(tag: str) -> str:
    """``"cuda"`` or ``"cpu"``: the device a memory tag measures."""
    return "cuda" if tag in CUDA_MEMORY_TAGS else "cpu"
