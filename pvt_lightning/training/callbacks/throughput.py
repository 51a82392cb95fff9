"""Model FLOPs utilisation (MFU): the training FLOP rate of each epoch and its share of the hardware's peak.

Logged once per epoch at step = epoch, like every other scalar of a run (``loggers.py``), next to EpochTimer's
``throughput/train_img_s``:

- ``perf/flops_per_s``: model FLOPs per training image x images/s (all ranks). Per image: 3 x the forward pass
  (forward + backward), the forward counted by ``measure_complexity`` at the run's input size: convolutions,
  linear layers and the attention products, 2 FLOPs per multiply-accumulate; element-wise work is not counted.
  (Counting the backward pass itself would overstate it: torch's FLOP counter prices a depthwise convolution's
  backward like a dense one's, 90x b0's real figure.)
- ``perf/mfu``: that rate / (dense peak of one device at the run's compute dtype x world size), only where the
  peak is known: CUDA GPUs (``device_peak_flops``) or a ``peak_flops`` given by hand. CPUs have no known peak.

Lightning's ``ThroughputMonitor`` computes the same ratio, but logs it every few steps (x-axis: steps, not
epochs) and synchronises CUDA after every batch; this callback reuses its peak table and precision mapping.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch.callbacks.throughput_monitor import _plugin_to_compute_dtype

from pvt_lightning.tags import FLOPS_TAG, MFU_TAG
from pvt_lightning.training.callbacks.loggers import log_epoch_scalars
from pvt_lightning.training.callbacks.timing import EpochTimer

# Dense (not 2:4-sparse) tensor-core peaks from NVIDIA's H200 datasheet. Lightning 2.6 lists the sparse figures
# for H200 and does not recognise the plain "NVIDIA H200" device name.
_H200_DENSE = {
    "sxm": {torch.bfloat16: 989.5e12, torch.float16: 989.5e12, "tfloat32": 494.7e12, torch.float32: 67e12},
    "nvl": {torch.bfloat16: 835.5e12, torch.float16: 835.5e12, "tfloat32": 417.5e12, torch.float32: 60e12},
}


def training_flops_per_image(gmacs_per_image: float) -> float:
    """FLOPs of one training image: forward + backward = 3 forwards of 2 FLOPs per multiply-accumulate."""
    return 3 * 2e9 * gmacs_per_image


def device_peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Dense peak FLOP/s of one ``device`` computing in ``dtype``; None where unknown (CPUs, unlisted GPUs)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        if "h200" in name:
            table = _H200_DENSE["nvl" if "nvl" in name else "sxm"]
            if dtype is torch.float32 and torch.get_float32_matmul_precision() != "highest":
                dtype = "tfloat32"
            return table.get(dtype)
    if device.type == "cpu":
        return None
    peak = get_available_flops(device, dtype)
    return float(peak) if peak else None


class FlopsUtilization(L.Callback):
    """Logs ``perf/flops_per_s`` and, where the device's peak is known, ``perf/mfu`` after every training epoch.

    Needs the run's ``EpochTimer`` earlier in the callback list (its images/s of the epoch). ``flops_per_image``
    defaults to ``training_flops_per_image`` of the LightningModule's ``complexity()`` (counted once, in eager
    mode even if blocks are compiled); ``peak_flops`` (per device) to ``device_peak_flops``.
    """

    def __init__(self, flops_per_image: float | None = None, peak_flops: float | None = None):
        self.flops_per_image = flops_per_image
        self.peak_flops = peak_flops
        self.flops_per_s: list[float] = []
        self.mfu: list[float] = []
        self._timer: EpochTimer | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        timers = [c for c in trainer.callbacks if isinstance(c, EpochTimer)]
        if not timers or trainer.callbacks.index(timers[0]) > trainer.callbacks.index(self):
            raise ValueError("FlopsUtilization needs an EpochTimer before it in the Trainer's callbacks")
        self._timer = timers[0]
        if self.flops_per_image is None:
            with torch.compiler.set_stance("force_eager"):  # FLOP counting sees eager ops only
                self.flops_per_image = training_flops_per_image(pl_module.complexity().total_gmacs)
        if self.peak_flops is None:
            self.peak_flops = device_peak_flops(trainer.strategy.root_device,
                                                _plugin_to_compute_dtype(trainer.precision_plugin))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rate = self.flops_per_image * self._timer.throughputs_img_s[-1]
        self.flops_per_s.append(rate)
        scalars = {FLOPS_TAG: rate}
        if self.peak_flops:
            self.mfu.append(rate / (self.peak_flops * trainer.world_size))
            scalars[MFU_TAG] = self.mfu[-1]
        log_epoch_scalars(trainer, scalars)
