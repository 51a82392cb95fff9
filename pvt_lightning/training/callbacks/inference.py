"""Inference speed of the trained model, measured where it was trained, once training ends (rank 0 only).

Eval mode, the run's precision (the Trainer's precision plugin), device and input size: images/s at the
training batch size and at batch 1, batch-1 latency p50/p90 (``training/inference_speed.py``). The result
is summary.json's ``inference`` block; ``pvt-lightning speed`` re-measures a checkpoint elsewhere.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

from pvt_lightning.training.inference_speed import DEFAULT_SECONDS, measure_inference_speed


class InferenceSpeed(L.Callback):
    """Measures inference speed in ``on_fit_end`` for ``seconds`` (0: off); ``result`` holds the figures (None
    where not measured: other ranks, sharded strategies, or an error, then ``error`` says which)."""

    def __init__(self, batch_size: int | None = None, seconds: float = DEFAULT_SECONDS):
        self.batch_size = batch_size
        self.seconds = seconds
        self.result: dict[str, Any] | None = None
        self.error: str | None = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Sharded strategies (FSDP, DeepSpeed) need every rank for a forward pass: not measured there.
        if self.seconds <= 0 or not trainer.is_global_zero or trainer.interrupted or not isinstance(
                trainer.strategy, (SingleDeviceStrategy, DDPStrategy)):
            return
        batch_size = self.batch_size or getattr(trainer.train_dataloader, "batch_size", None) or 1
        was_training = pl_module.training
        pl_module.eval()
        try:
            self.result = measure_inference_speed(pl_module, pl_module.hparams.img_size, batch_size, pl_module.device,
                                                  precision=str(trainer.precision), seconds=self.seconds,
                                                  context=trainer.precision_plugin.forward_context)
        except (RuntimeError, torch.OutOfMemoryError) as err:  # e.g. no memory left for the batch: say so, go on
            self.error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            print(f"inference speed not measured: {self.error}", flush=True)
        finally:
            pl_module.train(was_training)
