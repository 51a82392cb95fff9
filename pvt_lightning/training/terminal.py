"""What Lightning prints to the terminal, made plain and the same whether or not ``rich`` is installed.

Lightning picks ``RichProgressBar`` and ``RichModelSummary`` when ``rich`` is importable; rich then renders
what the run prints through its console (lines wrapped at 80 columns when output is not a terminal, which
breaks log parsing). ``plain_output_callbacks`` passes the tqdm bar (or none, for one line per epoch from
``EpochLine``) and ``ModelTable`` explicitly, so Lightning never chooses. ``quiet_lightning`` drops, by their
exact message, Lightning's tips advertising its cloud services, its note that our summary callback replaces its
own, and a deprecation warning raised inside Lightning itself (not the user's code to fix); other warnings stay.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Sequence

import lightning as L
from lightning.pytorch.callbacks import ModelSummary, ProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks import model_summary as lightning_model_summary
from lightning.pytorch.utilities.model_summary.model_summary import _format_summary_table

TIP_PREFIX = "💡 Tip:"
"""Lightning's advertisements (litlogger, litmodels) start with this (``rank_zero_info``)."""
RANK_ZERO_LOGGER = "lightning.pytorch.utilities.rank_zero"
INTERNAL_DEPRECATIONS = (
    # torch 2.10+ deprecates LeafSpec; Lightning's own _pytree.py still builds one for every batch it moves.
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, r"lightning\.pytorch\.utilities\._pytree"),
)
"""(message regex, category, module regex) of warnings raised by Lightning's internals, filtered out."""


OUR_SUMMARY_NOTE = "Trainer already configured with model summary callbacks"
"""Lightning's note that a summary callback was given (ours, ``ModelTable``): dropped when it names ours."""


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not (message.startswith(TIP_PREFIX)
                    or (message.startswith(OUR_SUMMARY_NOTE) and ModelTable.__name__ in message))


def quiet_lightning() -> None:
    """Filter Lightning's cloud tips and its internal deprecation warnings (idempotent)."""
    logger = logging.getLogger(RANK_ZERO_LOGGER)
    if not any(isinstance(f, _DropTips) for f in logger.filters):
        logger.addFilter(_DropTips())
    for message, category, module in INTERNAL_DEPRECATIONS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


class ModelTable(ModelSummary):
    """Lightning's model summary, without the FLOPs column and total when they were not measured (Lightning
    counts FLOPs only with an ``example_input_array``; the run's banner gives GMACs at its input size)."""

    @staticmethod
    def summarize(summary_data: list[tuple[str, list[str]]], total_parameters: int, trainable_parameters: int,
                  model_size: float, total_training_modes: dict[str, int], total_flops: int,
                  **summarize_kwargs: Any) -> None:
        if total_flops:
            return ModelSummary.summarize(summary_data, total_parameters, trainable_parameters, model_size,
                                          total_training_modes, total_flops, **summarize_kwargs)
        columns = [(name, values) for name, values in summary_data if name != "FLOPs"]
        table = _format_summary_table(total_parameters, trainable_parameters, model_size, total_training_modes,
                                      total_flops, *columns)
        table = "\n".join(line for line in table.splitlines() if not line.endswith("Total Flops"))
        lightning_model_summary.log.info("\n" + table)


def plain_output_callbacks(callbacks: Sequence[L.Callback], progress_bar: bool = True,
                           model_summary: bool = True) -> list[L.Callback]:
    """``callbacks`` plus a tqdm progress bar (if ``progress_bar`` and none is there) and ``ModelTable`` (if
    ``model_summary`` and no summary is there), so Lightning does not pick its rich versions."""
    callbacks = list(callbacks)
    if progress_bar and not any(isinstance(c, ProgressBar) for c in callbacks):
        callbacks.append(TQDMProgressBar())
    if model_summary and not any(isinstance(c, ModelSummary) for c in callbacks):
        callbacks.append(ModelTable(max_depth=1))
    return callbacks
