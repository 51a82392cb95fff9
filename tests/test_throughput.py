"""The FLOPs-utilisation callback (training/callbacks/throughput.py): real Trainer fits, real TensorBoard events."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from lightning.fabric.utilities.throughput import measure_flops
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pvt_lightning.tags import FLOPS_TAG, MFU_TAG, THROUGHPUT_TAG
from pvt_lightning.training.callbacks.timing import EpochTimer
from pvt_lightning.training.compile import compile_regions
from pvt_lightning.data import ImageFolderDataModule
from pvt_lightning.training.module import ImageClassifier
from pvt_lightning.training.callbacks.throughput import FlopsUtilization, device_peak_flops


def fit(tmp_path, image_folder, callbacks, epochs: int = 2, model=None):
    dm = ImageFolderDataModule(image_folder, img_size=(32, 32), batch_size=4, num_workers=0)
    L.seed_everything(0)
    model = model or ImageClassifier("b0", num_classes=2, img_size=(32, 32), warmup_epochs=0)
    trainer = L.Trainer(accelerator="cpu", max_epochs=epochs, limit_train_batches=2, limit_val_batches=1,
                        logger=TensorBoardLogger(tmp_path, name="run"), callbacks=callbacks,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    events = EventAccumulator(trainer.logger.log_dir)
    events.Reload()
    return model, events


def scalars(events: EventAccumulator, tag: str) -> dict[int, float]:
    return {e.step: e.value for e in events.Scalars(tag)}


def test_flops_per_second_lands_in_tensorboard_next_to_throughput(tmp_path, image_folder):
    callback = FlopsUtilization()
    model, events = fit(tmp_path, image_folder, [EpochTimer(), callback])
    flops, throughput = scalars(events, FLOPS_TAG), scalars(events, THROUGHPUT_TAG)
    assert list(flops) == [0, 1] == list(throughput)  # one value per epoch, at step = epoch
    assert MFU_TAG not in events.Tags()["scalars"]  # a CPU has no known peak

    # FLOPs per image, counted independently: Lightning's measure_flops over one image's forward, x3 for training
    # (its backward count is no reference: torch's counter prices a depthwise conv's backward as a dense one).
    probe = copy.deepcopy(model.model).eval()
    counted = 3 * measure_flops(probe, lambda: probe(torch.randn(1, 3, 32, 32)))
    for epoch in (0, 1):
        assert flops[epoch] / throughput[epoch] == pytest.approx(counted, rel=0.01)  # ours adds attention products
    assert callback.flops_per_s == pytest.approx(list(flops.values()), rel=1e-6)


def test_mfu_is_the_share_of_a_known_peak(tmp_path, image_folder):
    _, events = fit(tmp_path, image_folder, [EpochTimer(), FlopsUtilization(peak_flops=1e12)], epochs=1)
    mfu, flops = scalars(events, MFU_TAG), scalars(events, FLOPS_TAG)
    assert list(mfu) == [0] and mfu[0] == pytest.approx(flops[0] / 1e12, rel=1e-5) and 0 < mfu[0] < 1


@pytest.mark.slow
def test_flop_count_ignores_compiled_blocks(tmp_path, image_folder):
    """Compiled code is invisible to FLOP counters: the callback counts in eager mode, so the figure is the same."""
    eager_callback, compiled_callback = FlopsUtilization(), FlopsUtilization()
    fit(tmp_path / "eager", image_folder, [EpochTimer(), eager_callback], epochs=1)
    model = ImageClassifier("b0", num_classes=2, img_size=(32, 32), warmup_epochs=0)
    compile_regions(model.model, backend="eager")
    fit(tmp_path / "compiled", image_folder, [EpochTimer(), compiled_callback], epochs=1, model=model)
    assert compiled_callback.flops_per_image == pytest.approx(eager_callback.flops_per_image, rel=1e-9)


def test_needs_the_epoch_timer_before_it(tmp_path, image_folder):
    with pytest.raises(ValueError, match="EpochTimer before it"):
        fit(tmp_path, image_folder, [FlopsUtilization(), EpochTimer()], epochs=1)


def test_peaks_are_known_for_gpus_only():
    assert device_peak_flops(torch.device("cpu"), torch.bfloat16) is None
