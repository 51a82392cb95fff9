"""Epoch-level logging: per-class precision/recall, memory, time/throughput, HParams and a terminal line.

Every scalar here is logged once per epoch with ``step = epoch index``, so TensorBoard x-axes line
up across runs whatever their batch size. Values are reduced across DDP ranks before rank 0 logs
them: metrics through torchmetrics' own synchronisation, counters and memory through the strategy.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Mapping, Sequence

import lightning as L
import psutil
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib.figure import Figure
from torch.utils.tensorboard.summary import hparams as hparams_summary
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    BinaryPrecision,
    BinaryRecall,
    MulticlassConfusionMatrix,
    MulticlassPrecision,
    MulticlassPrecisionRecallCurve,
    MulticlassRecall,
)

MB = 2**20

CUDA_MEMORY_TAGS = ("memory/peak_allocated_mb", "memory/peak_reserved_mb")
CPU_MEMORY_TAGS = ("memory/peak_pss_mb",)
"""Proportional set size: pages shared by the trainer and its loader workers count once in total."""
TIME_TAG = "time/epoch_s"
THROUGHPUT_TAG = "throughput/train_img_s"


def positive_class_tags(class_name: str) -> tuple[str, str]:
    """Tags of the one-class-vs-rest precision and recall at the chosen threshold."""
    return f"val/positive/precision/{class_name}", f"val/positive/recall/{class_name}"


def log_epoch_scalars(trainer: L.Trainer, scalars: Mapping[str, float]) -> None:
    """Log ``scalars`` to every logger at step = current epoch (rank 0 only)."""
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        logger.log_metrics(dict(scalars), step=trainer.current_epoch)


def tensorboard_writers(trainer: L.Trainer) -> list:
    """The SummaryWriters of the run's TensorBoard loggers, on rank 0 (empty elsewhere)."""
    if not trainer.is_global_zero:
        return []
    return [logger.experiment for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]


def confusion_matrix_figure(confusion: torch.Tensor, class_names: Sequence[str]) -> Figure:
    """Rows are true classes, columns predicted; counts written in the cells while they stay legible."""
    num_classes = len(class_names)
    side = min(2 + 0.5 * num_classes, 20)
    figure = Figure(figsize=(side, side), dpi=100)
    ax = figure.add_subplot()
    counts = confusion.cpu().numpy()
    ax.imshow(counts, cmap="Blues")
    if num_classes <= 50:
        ax.set_xticks(range(num_classes), class_names, rotation=90)
        ax.set_yticks(range(num_classes), class_names)
    if num_classes <= 20:
        threshold = counts.max() / 2
        for i in range(num_classes):
            for j in range(num_classes):
                ax.text(j, i, str(counts[i, j]), ha="center", va="center",
                        color="white" if counts[i, j] > threshold else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    figure.tight_layout()
    return figure


class ClassificationReport(L.Callback):
    """Per-class precision/recall, confusion matrix, PR curves and optional one-class-vs-rest figures.

    Macro precision/recall/F1/accuracy are logged by ``ImageClassifier`` itself; this adds what a
    macro average hides. It reads the ``{"logits", "target"}`` dict that ``validation_step`` returns.
    Tags: ``val/precision/<class>``, ``val/recall/<class>`` (scalars), ``val/confusion_matrix``
    (image), ``val/pr_curve/<class>`` (PR-curve plugin) and, with ``positive_class``,
    ``val/positive/{precision,recall}/<class>`` at ``threshold`` on that class's softmax probability.
    """

    def __init__(self, class_names: Sequence[str], positive_class: str | None = None, threshold: float = 0.5,
                 pr_curve_thresholds: int = 101):
        if positive_class is not None and positive_class not in class_names:
            raise ValueError(f"positive class {positive_class!r} is not one of the classes {list(class_names)}; "
                             "pass one of these names to --positive-class")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold {threshold} is not a probability; pass a value in [0, 1] to --threshold")
        self.class_names = list(class_names)
        self.positive_class = positive_class
        self.threshold = threshold
        num_classes = len(self.class_names)
        self.per_class = MetricCollection({
            "precision": MulticlassPrecision(num_classes, average=None),
            "recall": MulticlassRecall(num_classes, average=None),
            "confusion": MulticlassConfusionMatrix(num_classes),
        }, compute_groups=[["precision", "recall"], ["confusion"]])  # explicit: inferred groups can merge wrongly
        # Binned: memory O(thresholds x classes) however large the validation set.
        self.pr_curve = MulticlassPrecisionRecallCurve(num_classes, thresholds=pr_curve_thresholds)
        self.positive = None
        if positive_class is not None:
            self.positive_index = self.class_names.index(positive_class)
            self.positive = MetricCollection(
                {"precision": BinaryPrecision(threshold), "recall": BinaryRecall(threshold)},
                compute_groups=[["precision", "recall"]],
            )
        self.last_scalars: dict[str, float] = {}
        """Scalars of the latest validation epoch, by tag (the CLI can copy the positive-class ones)."""

    def _metrics(self) -> list:
        return [m for m in (self.per_class, self.pr_curve, self.positive) if m is not None]

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for metric in self._metrics():
            metric.to(pl_module.device)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for metric in self._metrics():
            metric.reset()

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if trainer.sanity_checking or outputs is None:  # None: a batch of unreadable images only, skipped
            return
        logits, target = outputs["logits"], outputs["target"]
        probs = logits.float().softmax(dim=-1)
        self.per_class.update(probs, target)
        self.pr_curve.update(probs, target)
        if self.positive is not None:
            self.positive.update(probs[:, self.positive_index], (target == self.positive_index).long())

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        # compute() is a collective under DDP: every rank calls it, rank 0 logs.
        per_class = self.per_class.compute()
        scalars = {}
        for i, name in enumerate(self.class_names):
            scalars[f"val/precision/{name}"] = per_class["precision"][i].item()
            scalars[f"val/recall/{name}"] = per_class["recall"][i].item()
        if self.positive is not None:
            positive = self.positive.compute()
            precision_tag, recall_tag = positive_class_tags(self.positive_class)
            scalars[precision_tag] = positive["precision"].item()
            scalars[recall_tag] = positive["recall"].item()
        precision, recall, _ = self.pr_curve.compute()
        with self.pr_curve.sync_context():
            # Per threshold and class, [[TN, FP], [FN, TP]], summed over ranks: the counts the plugin shows.
            counts = self.pr_curve.confmat.clone()
        self.last_scalars = scalars
        # On every rank (the values are synced), so --monitor val/recall/<class> can pick checkpoints and stop early.
        trainer.callback_metrics.update({tag: torch.tensor(value) for tag, value in scalars.items()})
        log_epoch_scalars(trainer, scalars)
        for writer in tensorboard_writers(trainer):
            self._write_figures(writer, trainer.current_epoch, per_class["confusion"], precision, recall, counts)

    def _write_figures(self, writer, epoch: int, confusion: torch.Tensor, precision: torch.Tensor,
                       recall: torch.Tensor, counts: torch.Tensor) -> None:
        writer.add_figure("val/confusion_matrix", confusion_matrix_figure(confusion, self.class_names),
                          global_step=epoch, close=False)
        num_thresholds = counts.shape[0]
        for i, name in enumerate(self.class_names):
            class_counts = counts[:, i].cpu()
            writer.add_pr_curve_raw(
                f"val/pr_curve/{name}",
                true_positive_counts=class_counts[:, 1, 1], false_positive_counts=class_counts[:, 0, 1],
                true_negative_counts=class_counts[:, 0, 0], false_negative_counts=class_counts[:, 1, 0],
                # torchmetrics appends a final (precision 1, recall 0) point beyond the last threshold.
                precision=precision[i, :num_thresholds].cpu(), recall=recall[i, :num_thresholds].cpu(),
                global_step=epoch, num_thresholds=num_thresholds,
            )


class EpochTimer(L.Callback):
    """Training time per epoch (validation excluded) and training throughput in images/s over all ranks.

    ``epoch_times_s`` and ``throughputs_img_s`` hold one value per finished epoch (slowest rank's time;
    images summed over ranks), logged as ``time/epoch_s`` and ``throughput/train_img_s``.
    """

    def __init__(self):
        self.epoch_times_s: list[float] = []
        self.throughputs_img_s: list[float] = []
        self._epoch_start = self._validation_start = 0.0
        self._validation_s = 0.0
        self._images = 0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_start = time.perf_counter()
        self._validation_s = 0.0
        self._images = 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        self._images += len(images)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._validation_start = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._validation_s += time.perf_counter() - self._validation_start

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning runs the epoch's validation before this hook, so its time is taken out.
        seconds = time.perf_counter() - self._epoch_start - self._validation_s
        strategy = trainer.strategy
        seconds = strategy.reduce(torch.tensor(seconds, dtype=torch.float64, device=pl_module.device), reduce_op="max")
        images = strategy.reduce(torch.tensor(self._images, dtype=torch.float64, device=pl_module.device),
                                 reduce_op="sum")
        self.epoch_times_s.append(seconds.item())
        self.throughputs_img_s.append(images.item() / max(seconds.item(), 1e-9))
        log_epoch_scalars(trainer, {TIME_TAG: self.epoch_times_s[-1], THROUGHPUT_TAG: self.throughputs_img_s[-1]})


class CudaPeakMemory:
    """Peak allocated and reserved CUDA memory of one device since the last reset, in MB."""

    tags = CUDA_MEMORY_TAGS

    def __init__(self, device: torch.device):
        self.device = device

    def start(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def stop(self) -> list[float]:
        return [torch.cuda.max_memory_allocated(self.device) / MB, torch.cuda.max_memory_reserved(self.device) / MB]


def proportional_set_size(pid: int) -> int:
    """Bytes of ``pid``'s memory, each page shared with N processes counted 1/N (Linux smaps_rollup).

    Falls back to the resident size where ``/proc`` has no smaps_rollup (macOS, Windows, old kernels).
    """
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return psutil.Process(pid).memory_info().rss


def process_tree_pss(process: psutil.Process, skip_pids: frozenset[int] = frozenset()) -> int:
    """Proportional set size of ``process`` and its descendants, leaving out ``skip_pids`` and their subtrees.

    Unlike summed RSS, the libraries and copy-on-write pages the data-loader workers share with the
    trainer count once, so the figure is what the run really adds to the machine's memory.
    """
    try:
        total = proportional_set_size(process.pid)
        children = process.children()
    except (psutil.NoSuchProcess, ProcessLookupError):
        return 0
    return total + sum(process_tree_pss(child, skip_pids) for child in children if child.pid not in skip_pids)


class ProcessTreePeakPss:
    """Peak proportional set size of this process plus its data-loader workers, sampled by a thread, in MB.

    ``skip_pids`` are the other DDP ranks: Lightning starts them as children of rank 0, and each
    rank reports its own tree.
    """

    tags = CPU_MEMORY_TAGS

    def __init__(self, interval_s: float = 0.1, skip_pids: frozenset[int] = frozenset()):
        self.interval_s = interval_s
        self.skip_pids = skip_pids
        self._process = psutil.Process()
        self._peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        self._peak = max(self._peak, process_tree_pss(self._process, self.skip_pids))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def start(self) -> None:
        self._peak = 0
        self._sample()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="peak-memory-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> list[float]:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        self._sample()
        return [self._peak / MB]


def worst_rank(tags: Sequence[str], per_rank: Sequence[Sequence[float]]) -> dict[str, float]:
    """For each tag, the largest value over ranks: memory budgets are set by the fullest device."""
    return {tag: max(rank_values[i] for rank_values in per_rank) for i, tag in enumerate(tags)}


class MemoryMonitor(L.Callback):
    """Peak memory per epoch (training and its validation), worst rank under DDP.

    On CUDA: ``memory/peak_allocated_mb`` and ``memory/peak_reserved_mb`` (peaks reset at epoch
    start). On CPU: ``memory/peak_pss_mb``, the proportional set size of the process and its data-loader workers.
    ``peaks_mb`` holds one value per epoch (reserved on CUDA, which is what ``nvidia-smi`` shows
    as used; PSS on CPU), ``memory_device`` is ``"cuda"`` or ``"cpu"`` and ``history`` every tag.
    """

    def __init__(self, interval_s: float = 0.1):
        self.interval_s = interval_s
        self.peaks_mb: list[float] = []
        self.history: list[dict[str, float]] = []
        self.memory_device: str | None = None
        self.probe: CudaPeakMemory | ProcessTreePeakPss | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        device = pl_module.device
        if device.type == "cuda":
            self.memory_device, self.probe = "cuda", CudaPeakMemory(device)
        else:
            pids = trainer.strategy.all_gather(torch.tensor([os.getpid()], device=device)).flatten().tolist()
            skip = frozenset(pid for pid in pids if pid != os.getpid())
            self.memory_device, self.probe = "cpu", ProcessTreePeakPss(self.interval_s, skip)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.probe.start()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        local = torch.tensor(self.probe.stop(), dtype=torch.float64, device=pl_module.device)
        per_rank = trainer.strategy.all_gather(local).reshape(-1, len(self.probe.tags)).tolist()
        peaks = worst_rank(self.probe.tags, per_rank)
        self.history.append(peaks)
        self.peaks_mb.append(peaks[self.probe.tags[-1]])
        log_epoch_scalars(trainer, peaks)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if isinstance(self.probe, ProcessTreePeakPss):
            self.probe.stop()  # an interrupted epoch may have left the sampler running


def hparam_value(value: Any) -> int | float | str:
    """A value as the HParams tab shows it best: booleans and None as words.

    ``torch.utils.tensorboard.summary.hparams`` would store a bool as the number 0/1 and drop None.
    """
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


def scalar_hparams(hparams: Mapping[str, Any]) -> dict[str, int | float | str]:
    """The entries of ``hparams`` the HParams tab can show (lists such as class names are left out)."""
    return {key: hparam_value(value) for key, value in hparams.items()
            if value is None or isinstance(value, (bool, int, float, str))}


class HParamsSummary(L.Callback):
    """Writes the run's hyperparameters for TensorBoard's HParams tab at the start of training.

    The listed metrics are the tags the other callbacks and the module log; the tab shows their
    latest value, so no placeholder scalars are written (``TensorBoardLogger.log_hyperparams`` with
    ``metrics`` would log them as real points, and without them, under ``default_hp_metric=False``,
    it writes no HParams data at all).
    """

    def __init__(self, positive_class: str | None = None, threshold: float = 0.5):
        self.positive_class = positive_class
        self.threshold = threshold
        self.params: dict[str, Any] = {}
        self.metric_tags: list[str] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        params = scalar_hparams(pl_module.hparams)
        img_size = pl_module.hparams.get("img_size")
        if img_size is not None:
            params["img_size"] = "x".join(str(int(side)) for side in img_size)
        if hasattr(pl_module, "linear_sra_enabled"):
            params["linear_sra"] = hparam_value(bool(pl_module.linear_sra_enabled))
        batch_size = getattr(trainer.train_dataloader, "batch_size", None)
        params.update(
            batch_size=batch_size if batch_size is not None else "unknown",
            world_size=trainer.world_size,
            precision=str(trainer.precision),
            max_epochs=trainer.max_epochs if trainer.max_epochs is not None else -1,
        )
        if self.positive_class is not None:
            params.update(positive_class=self.positive_class, threshold=self.threshold)
        memory_tags = CUDA_MEMORY_TAGS if pl_module.device.type == "cuda" else CPU_MEMORY_TAGS
        metric_tags = ["val/acc", "val/precision", "val/recall", "val/f1", TIME_TAG, THROUGHPUT_TAG, *memory_tags]
        if self.positive_class is not None:
            metric_tags += positive_class_tags(self.positive_class)
        self.params, self.metric_tags = params, metric_tags
        for writer in tensorboard_writers(trainer):
            file_writer = writer._get_file_writer()  # what TensorBoardLogger.log_hyperparams writes to as well
            for summary in hparams_summary(params, {tag: 0.0 for tag in metric_tags}):
                file_writer.add_summary(summary)


def format_epoch_line(epoch: int, max_epochs: int | None, metrics: Mapping[str, float], epoch_s: float | None,
                      img_s: float | None, memory: Mapping[str, float]) -> str:
    """One line: ``epoch 3/10 | train loss 0.812 | val acc 0.912 P 0.905 R 0.899 F1 0.901 | 41.2 s, 38.7 img/s | ...``.

    Figures missing from ``metrics`` (no validation this epoch) are left out of the line.
    """
    parts = [f"epoch {epoch + 1}/{max_epochs}" if max_epochs and max_epochs > 0 else f"epoch {epoch + 1}"]
    if "train/loss" in metrics:
        parts.append(f"train loss {metrics['train/loss']:.3f}")
    if "val/acc" in metrics:
        parts.append(" ".join([f"val acc {metrics['val/acc']:.3f}"] + [
            f"{label} {metrics[tag]:.3f}" for label, tag in
            (("P", "val/precision"), ("R", "val/recall"), ("F1", "val/f1")) if tag in metrics]))
    if epoch_s is not None:
        parts.append(f"{epoch_s:.1f} s, {img_s:.1f} img/s")
    labels = {"memory/peak_pss_mb": "peak PSS", "memory/peak_allocated_mb": "peak alloc",
              "memory/peak_reserved_mb": "reserved"}
    if memory:
        parts.append(", ".join(f"{labels.get(tag, tag)} {value:.0f} MB" for tag, value in memory.items()))
    return " | ".join(parts)


class EpochLine(L.Callback):
    """One readable line per epoch on rank 0, next to (not instead of) the progress bar.

    Reads the epoch's figures from ``timer`` and ``memory``, so it must come after them in the
    callback list (``default_callbacks`` orders them so).
    """

    def __init__(self, timer: EpochTimer | None = None, memory: MemoryMonitor | None = None):
        self.timer = timer
        self.memory = memory
        self.lines: list[str] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = {key: float(value) for key, value in trainer.callback_metrics.items()
                   if isinstance(value, (int, float)) or (torch.is_tensor(value) and value.numel() == 1)}
        timer_ready = self.timer is not None and self.timer.epoch_times_s
        line = format_epoch_line(
            trainer.current_epoch, trainer.max_epochs, metrics,
            self.timer.epoch_times_s[-1] if timer_ready else None,
            self.timer.throughputs_img_s[-1] if timer_ready else None,
            self.memory.history[-1] if self.memory is not None and self.memory.history else {},
        )
        self.lines.append(line)
        if trainer.is_global_zero:
            bar = trainer.progress_bar_callback
            (bar.print if bar is not None else print)(line)


def default_callbacks(class_names: Sequence[str], positive_class: str | None = None,
                      threshold: float = 0.5) -> list[L.Callback]:
    """The callbacks ``run.py`` adds to every run: report, timer, memory, HParams and the epoch line."""
    timer, memory = EpochTimer(), MemoryMonitor()
    return [
        ClassificationReport(class_names, positive_class, threshold),
        timer,
        memory,
        HParamsSummary(positive_class, threshold),
        EpochLine(timer, memory),
    ]


def run_figures(trainer: L.Trainer) -> dict[str, Any]:
    """summary.json's timing and memory fields: mean epoch time and throughput, peak memory and what it measures."""
    timer = next((c for c in trainer.callbacks if isinstance(c, EpochTimer)), None)
    memory = next((c for c in trainer.callbacks if isinstance(c, MemoryMonitor)), None)

    def mean(values):
        return round(sum(values) / len(values), 3) if values else None

    peak = round(max(memory.peaks_mb), 1) if memory and memory.peaks_mb else None
    measure = {"cuda": "cuda_peak_reserved", "cpu": "cpu_process_tree_pss"}.get(memory.memory_device if memory else None)
    figures = {
        "epoch_time_s": mean(timer.epoch_times_s) if timer else None,
        "throughput_img_s": mean(timer.throughputs_img_s) if timer else None,
        "peak_memory_mb": peak,
        "memory_device": memory.memory_device if memory else None,
        "memory_measure": measure,
    }
    if measure == "cpu_process_tree_pss":
        figures["peak_pss_mb"] = peak
    return figures
