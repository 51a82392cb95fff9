"""Recall at a fixed precision (training/recall_at_precision.py), its tags, options and checkpoint names.

Expected values come from scikit-learn's ``precision_recall_curve``, never from the code under test.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from sklearn.metrics import precision_recall_curve

from pvt_lightning import tags
from pvt_lightning.cli.assemble import checkpoint_filename
from pvt_lightning.cli.config import parse_args
from pvt_lightning.cli.options import EvaluateConfig, TrainConfig
from pvt_lightning.errors import UsageError
from pvt_lightning.training.recall_at_precision import (BINNED_THRESHOLDS, EXACT_LIMIT, check_precisions,
                                                        curve_thresholds, recall_at_precision,
                                                        recall_at_precision_metrics, results_from)


def sklearn_recall_at_precision(probs: np.ndarray, targets: np.ndarray, precision: float) -> list[float]:
    """Per class, one-vs-rest: the highest recall on scikit-learn's curve whose precision is at least P."""
    values = []
    for c in range(probs.shape[1]):
        p, r, _ = precision_recall_curve(targets == c, probs[:, c])
        values.append(float(r[p >= precision].max()))  # the curve ends at (precision 1, recall 0): 0 if unreached
    return values


def mediocre_classifier(num_classes: int = 6, n: int = 500, seed: int = 0):
    """Softmax probabilities of a noisy classifier; the last class scores high on other classes' images only."""
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, num_classes, (n,), generator=g)
    logits = torch.randn(n, num_classes, generator=g)
    logits[torch.arange(n), targets] += torch.linspace(0.5, 3.0, num_classes)[targets]  # some classes easy
    hopeless = num_classes - 1
    logits[targets != hopeless, hopeless] += 2
    logits[targets == hopeless, hopeless] -= 4
    return logits.softmax(-1), targets


@pytest.mark.parametrize("precision", [0.9, 0.95, 0.5])
def test_exact_recall_at_precision_equals_sklearn_per_class_and_macro(precision):
    probs, targets = mediocre_classifier()
    names = [f"c{i}" for i in range(probs.shape[1])]
    [result], thresholds = recall_at_precision(probs, targets, names, [precision])
    assert thresholds is None  # 500 x 6 scores: exact
    expected = sklearn_recall_at_precision(probs.numpy(), targets.numpy(), precision)
    assert result.per_class == pytest.approx(expected, abs=1e-6)
    assert result.macro == pytest.approx(np.mean(expected), abs=1e-6)
    assert result.unreached == [name for name, value in zip(names, expected) if value == 0]
    assert "c5" in result.unreached  # the hopeless class counts as 0 in the macro mean
    assert 0 < len(result.unreached) < len(names) or precision == 0.5


def test_batches_and_several_precisions_share_one_state():
    """Updating batch by batch, every P read off one curve, gives what one update of everything gives."""
    probs, targets = mediocre_classifier(seed=1)
    names = [str(i) for i in range(probs.shape[1])]
    precisions = [0.95, 0.9, 0.6]
    metrics = recall_at_precision_metrics(len(names), precisions, None)
    for start in range(0, len(targets), 64):
        metrics.update(probs[start:start + 64], targets[start:start + 64])
    batched = results_from(metrics.compute(), precisions, names)
    for result in batched:
        expected = sklearn_recall_at_precision(probs.numpy(), targets.numpy(), result.precision)
        assert result.per_class == pytest.approx(expected, abs=1e-6), result.precision
    metrics.reset()  # a new epoch starts from nothing
    metrics.update(probs[:100], targets[:100])
    again = results_from(metrics.compute(), [0.9], names)[0]
    assert again.per_class == pytest.approx(sklearn_recall_at_precision(probs[:100].numpy(), targets[:100].numpy(),
                                                                        0.9), abs=1e-6)


def test_binned_above_the_size_limit_and_close_to_exact():
    assert curve_thresholds(50_000, 100) is None and EXACT_LIMIT == 5_000_000
    assert curve_thresholds(50_001, 100) == BINNED_THRESHOLDS
    probs, targets = mediocre_classifier(n=2000, seed=2)
    names = [str(i) for i in range(probs.shape[1])]
    [exact], _ = recall_at_precision(probs, targets, names, [0.9], thresholds=None)
    [binned], used = recall_at_precision(probs, targets, names, [0.9], thresholds=BINNED_THRESHOLDS)
    assert used == BINNED_THRESHOLDS
    # Bins can only move a threshold up to the next multiple of 0.001: a little recall lost, never gained.
    for b, e in zip(binned.per_class, exact.per_class):
        assert e - 0.02 <= b <= e + 1e-6


def test_precision_values_are_checked():
    assert check_precisions([0.9, 0.95]) == [0.9, 0.95]
    for bad, message in (([0.999], "two decimals"), ([0.9, 0.90], "repeat"), ([0.0], r"not in \(0, 1\]")):
        with pytest.raises(ValueError, match=message):
            check_precisions(bad)


def test_tags_name_p_with_two_decimals_and_parse_back():
    assert tags.recall_at_precision_tag(0.9) == "val/recall@precision0.90"
    assert tags.recall_at_precision_tag(0.95, "cat") == "val/recall@precision0.95/cat"
    assert tags.unreached_tag(0.9) == "val/unreached@precision0.90"
    assert tags.recall_at_precision_tag(0.9, stage="test") == "test/recall@precision0.90"
    assert tags.parse_recall_at_precision("val/recall@precision0.90") == (0.9, None)
    assert tags.parse_recall_at_precision("val/recall@precision0.95/cat") == (0.95, "cat")
    assert tags.parse_recall_at_precision("val/recall/cat") is None
    assert tags.parse_recall_at_precision("val/recall@precision0.9") is None  # not a name we write


@pytest.mark.parametrize("monitor, name", [
    ("val/recall@precision0.90", "best-epoch003-recall_at_p0.90_0.8125.ckpt"),
    ("val/recall@precision0.90/cat", "best-epoch003-recall_at_p0.90_cat0.8125.ckpt"),
    ("val/recall/cat", "best-epoch003-recall_cat0.8125.ckpt"),
    ("val/acc", "best-epoch003-acc0.8125.ckpt"),
])
def test_checkpoint_names_of_monitored_recall_at_precision(tmp_path, monitor, name):
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename=checkpoint_filename(monitor), monitor=monitor,
                                 auto_insert_metric_name=False)
    assert checkpoint.format_checkpoint_name({"epoch": 3, monitor: torch.tensor(0.8125)}) == str(tmp_path / name)


def test_report_precision_option(tmp_path):
    assert parse_args(TrainConfig, []).report_precision is None  # 0.9 where it is used
    config = parse_args(TrainConfig, ["--report-precision", "0.9", "0.95", "--monitor", "val/recall@precision0.95"])
    assert config.report_precision == [0.9, 0.95]
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("report-precision: [0.8, 0.85]\nmonitor: val/recall@precision0.80/cat\n")
    assert parse_args(TrainConfig, ["--config", str(yaml_file)]).report_precision == [0.8, 0.85]
    assert parse_args(EvaluateConfig, ["--report-precision", "0.5"]).report_precision == [0.5]
    for args, message in ((["--report-precision", "0.999"], "two decimals"),
                          (["--report-precision", "1.5"], "--report-precision"),
                          (["--monitor", "val/recall@precision0.95"], "add it to --report-precision")):
        with pytest.raises(UsageError, match=message):
            parse_args(TrainConfig, args)
