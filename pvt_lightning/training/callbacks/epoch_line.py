"""One readable terminal line per epoch: loss, validation figures, time, throughput and memory."""

from __future__ import annotations

from typing import Mapping

import lightning as L
import torch

from pvt_lightning import tags
from pvt_lightning.training.callbacks.memory import MemoryMonitor
from pvt_lightning.training.callbacks.timing import EpochTimer

MEMORY_LABELS = {tags.PEAK_PSS_MB: "peak PSS", tags.PEAK_ALLOCATED_MB: "peak alloc", tags.PEAK_RESERVED_MB: "reserved"}
"""How the line names each memory tag, in the order it prints them (other tags follow under their own name)."""


def format_epoch_line(epoch: int, max_epochs: int | None, metrics: Mapping[str, float], epoch_s: float | None,
                      img_s: float | None, memory: Mapping[str, float]) -> str:
    """One line: ``epoch 3/10 | train loss 0.812 | val acc 0.912 P 0.905 R 0.899 F1 0.901 | 41.2 s, 38.7 img/s | ...``
    (with ``R@P0.90 0.874`` after F1 for each macro recall at a fixed precision in ``metrics``).

    Figures missing from ``metrics`` (no validation this epoch) are left out of the line.
    """
    parts = [f"epoch {epoch + 1}/{max_epochs}" if max_epochs and max_epochs > 0 else f"epoch {epoch + 1}"]
    if tags.TRAIN_LOSS in metrics:
        parts.append(f"train loss {metrics[tags.TRAIN_LOSS]:.3f}")
    head = next((tag for tag in (tags.VAL_ACC, tags.VAL_MAP) if tag in metrics), None)  # val/map: multi-label
    if head is not None:
        at_precision = [(parsed[0], tag) for tag in metrics
                        if (parsed := tags.parse_recall_at_precision(tag)) and parsed[1] is None]
        label = "val acc" if head == tags.VAL_ACC else "val mAP"
        parts.append(" ".join([f"{label} {metrics[head]:.3f}"] + [
            f"{label} {metrics[tag]:.3f}" for label, tag in
            (("P", tags.VAL_PRECISION), ("R", tags.VAL_RECALL), ("F1", tags.VAL_F1)) if tag in metrics] + [
            f"R@P{tags.precision_label(p)} {metrics[tag]:.3f}" for p, tag in sorted(at_precision)]))
    if epoch_s is not None:
        parts.append(f"{epoch_s:.1f} s, {img_s:.1f} img/s")
    if memory:
        order = [tag for tag in MEMORY_LABELS if tag in memory] + [tag for tag in memory if tag not in MEMORY_LABELS]
        parts.append(", ".join(f"{MEMORY_LABELS.get(tag, tag)} {memory[tag]:.0f} MB" for tag in order))
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
