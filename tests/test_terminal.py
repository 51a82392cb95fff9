"""Terminal output (training/terminal.py): the same with and without ``rich``, without Lightning's noise.

Lightning picks ``RichProgressBar`` / ``RichModelSummary`` when ``rich`` is importable; the tests force that
choice by setting Lightning's availability flag, so they run whether or not rich is installed here.
"""

from __future__ import annotations

import logging
import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.trainer.connectors import callback_connector
from lightning.pytorch.utilities.model_summary import summarize
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from pvt_lightning import ImageClassifier
from pvt_lightning.cli.assemble import checked_trainer
from pvt_lightning.cli.options import TrainConfig
from pvt_lightning.training.terminal import ModelTable, quiet_lightning


@pytest.fixture
def rich_available(monkeypatch):
    """What Lightning sees when rich is installed."""
    monkeypatch.setattr(callback_connector, "_RICH_AVAILABLE", True)


def plain_trainer(**kwargs) -> L.Trainer:
    return checked_trainer(TrainConfig(accelerator="cpu"), accelerator="cpu", logger=False,
                           enable_checkpointing=False, **kwargs)


def test_our_trainers_use_tqdm_and_the_plain_table_even_when_rich_is_there(rich_available):
    trainer = plain_trainer()
    assert type(trainer.progress_bar_callback) is TQDMProgressBar
    summaries = [c for c in trainer.callbacks if "Summary" in type(c).__name__ or isinstance(c, ModelTable)]
    assert [type(c) for c in summaries] == [ModelTable]
    assert plain_trainer(enable_progress_bar=False).progress_bar_callback is None  # --no-progress-bar


def test_bare_lightning_would_pick_rich(rich_available):
    """The flag the other test sets really decides Lightning's choice (needs rich itself)."""
    pytest.importorskip("rich")
    from lightning.pytorch.callbacks import RichProgressBar

    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False)
    assert isinstance(trainer.progress_bar_callback, RichProgressBar)


class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def lightning_log():
    """Lightning's own loggers do not propagate to the root logger: listen to them directly."""
    handler = Records()
    logger = logging.getLogger("lightning.pytorch")
    logger.addHandler(handler)
    yield handler.messages
    logger.removeHandler(handler)


def test_cloud_tips_are_dropped_other_info_stays(lightning_log):
    quiet_lightning()
    quiet_lightning()  # idempotent
    rank_zero_info("💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger](...)")
    rank_zero_info("`Trainer.fit` stopped: `max_epochs=2` reached.")
    plain_trainer()  # would print the litlogger tip and the note about our summary callback
    assert not any(m.startswith("💡") for m in lightning_log), lightning_log
    assert not any("model summary callbacks" in m for m in lightning_log), lightning_log
    assert "`Trainer.fit` stopped: `max_epochs=2` reached." in lightning_log


def test_lightnings_internal_deprecation_is_filtered_other_warnings_stay():
    from lightning.pytorch.utilities._pytree import _tree_flatten

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _tree_flatten(torch.zeros(1))  # Lightning builds torch's deprecated LeafSpec here
        assert any("LeafSpec" in str(w.message) for w in caught), "torch no longer warns: drop the filter"
        caught.clear()
        quiet_lightning()
        _tree_flatten(torch.zeros(1))
        warnings.warn("a warning the user should see", FutureWarning)
    assert [str(w.message) for w in caught] == ["a warning the user should see"]


def test_model_table_leaves_out_flops_it_did_not_measure(lightning_log):
    module = ImageClassifier("b0", num_classes=2, img_size=(32, 32))
    summary = summarize(module, max_depth=1)
    assert summary.total_flops == 0  # no example_input_array: Lightning counts nothing
    ModelTable.summarize(summary._get_summary_data(), summary.total_parameters, summary.trainable_parameters,
                         summary.model_size, summary.total_training_modes, summary.total_flops)
    [table] = lightning_log
    assert "Total params" in table and "PyramidVisionTransformerV2" in table
    assert "Flops" not in table and "FLOPs" not in table
