"""Validation that scales (training/curves.py): PR curves, AP and recall at precision exact below a size and binned
above it, with the binned state's memory fixed whatever the number of images; the reports say which.

Expected values come from scikit-learn and from torchmetrics' own binned update, never from the code under test.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, precision_recall_curve
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassPrecisionRecallCurve

from pvt_lightning import tags
from pvt_lightning.evaluation.metrics import classification_report
from pvt_lightning.training import curves
from pvt_lightning.training.callbacks.recall_at_precision import RecallAtPrecisionReport
from pvt_lightning.training.curves import (
    BINNED_THRESHOLDS,
    PrecisionRecallCurve,
    curve_thresholds,
)
from pvt_lightning.training.recall_at_precision import (
    AP_KEY,
    macro_average_precision,
    recall_at_precision_metrics,
    results_from,
)


def noisy(n: int, classes: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, classes, (n,), generator=g)
    logits = torch.randn(n, classes, generator=g)
    logits[torch.arange(n), targets] += 2 * torch.rand(n, generator=g)
    return logits.softmax(-1), targets


def state_bytes(collection) -> int:
    seen, total = set(), 0
    for metric in collection.values(copy_state=False):
        for name in metric._defaults:
            for t in (getattr(metric, name) if isinstance(getattr(metric, name), list) else [getattr(metric, name)]):
                if id(t) not in seen:
                    seen.add(id(t))
                    total += t.numel() * t.element_size()
    return total


@pytest.mark.parametrize("thresholds", [101, BINNED_THRESHOLDS])
def test_the_one_pass_binned_update_gives_torchmetrics_own_counts(thresholds):
    probs, targets = noisy(3000, 7)
    grid = torch.linspace(0, 1, thresholds)
    probs[:40] = grid[torch.randint(0, thresholds, (40, 7))]  # scores exactly on thresholds: >= counts them
    ours, theirs = PrecisionRecallCurve(7, thresholds=thresholds), MulticlassPrecisionRecallCurve(7, thresholds=thresholds)
    for start in range(0, 3000, 256):
        ours.update(probs[start:start + 256], targets[start:start + 256])
        theirs.update(probs[start:start + 256], targets[start:start + 256])
    for a, b in zip(ours.compute(), theirs.compute()):
        assert torch.allclose(a, b, equal_nan=True)
    assert torch.equal(ours.confmat, theirs.confmat)


def test_below_the_limit_ap_and_recall_at_precision_equal_sklearn():
    probs, targets = noisy(800, 6, seed=1)
    assert curve_thresholds(800, 6) is None
    metrics = recall_at_precision_metrics(6, [0.9, 0.5], None)
    for start in range(0, 800, 64):
        metrics.update(probs[start:start + 64], targets[start:start + 64])
    computed = metrics.compute()
    macro, per_class = macro_average_precision(computed)
    y, p = targets.numpy(), probs.double().numpy()
    expected = [average_precision_score(y == c, p[:, c]) for c in range(6)]
    assert per_class == pytest.approx(expected, abs=1e-6)
    assert macro == pytest.approx(np.mean(expected), abs=1e-6)
    for result in results_from(computed, [0.9, 0.5], [str(c) for c in range(6)]):
        want = []
        for c in range(6):
            precision, recall, _ = precision_recall_curve(y == c, p[:, c])
            want.append(float(recall[precision >= result.precision].max()))
        assert result.per_class == pytest.approx(want, abs=1e-6)


def test_above_the_limit_the_state_is_binned_and_does_not_grow_with_images():
    classes = 50
    assert curve_thresholds(100_001, classes) == BINNED_THRESHOLDS  # 5,000,050 scores > EXACT_LIMIT
    binned = recall_at_precision_metrics(classes, [0.9], BINNED_THRESHOLDS)
    exact = recall_at_precision_metrics(classes, [0.9], None)
    sizes = {"binned": [], "exact": []}
    for seed in range(3):
        probs, targets = noisy(2000, classes, seed=seed)
        for name, metrics in (("binned", binned), ("exact", exact)):
            metrics.update(probs, targets)
            sizes[name].append(state_bytes(metrics))
    assert sizes["binned"][0] == sizes["binned"][-1] == (BINNED_THRESHOLDS + 1) * classes * 2 * 8
    assert sizes["exact"][-1] == 3 * sizes["exact"][0]  # every score kept: grows with the images
    # and the binned AP stays close to the exact one
    (binned_ap, _), (exact_ap, _) = macro_average_precision(binned.compute()), macro_average_precision(exact.compute())
    assert binned_ap == pytest.approx(exact_ap, abs=2e-3)


class _Module:
    device = torch.device("cpu")


class _Trainer:
    """What the callback reads of a Trainer during validation."""

    def __init__(self, images: int):
        self.val_dataloaders = DataLoader(TensorDataset(torch.zeros(images)))
        self.sanity_checking, self.current_epoch, self.callback_metrics, self.loggers = False, 0, {}, []
        self.is_global_zero = True


@pytest.mark.parametrize("limit, method", [(None, "exact"), (1000, "binned (1001 thresholds)")])
def test_the_training_callback_logs_ap_and_states_the_method(limit, method):
    probs, targets = noisy(600, 4, seed=2)
    report = RecallAtPrecisionReport(["a", "b", "c", "d"], [0.9], exact_limit=limit or curves.EXACT_LIMIT)
    trainer = _Trainer(600)
    report.on_validation_epoch_start(trainer, _Module())
    for start in range(0, 600, 100):
        report.on_validation_batch_end(trainer, _Module(), {"logits": probs[start:start + 100].log(),
                                                           "target": targets[start:start + 100]}, None, 0)
    report.on_validation_epoch_end(trainer, _Module())
    expected = np.mean([average_precision_score(targets.numpy() == c, probs[:, c].double().numpy()) for c in range(4)])
    ap = float(trainer.callback_metrics[tags.VAL_AP])
    assert ap == pytest.approx(expected, abs=1e-6 if limit is None else 5e-3)
    summary = report.curves_summary()
    assert summary["method"] == method and summary["images"] == 600 and summary["classes"] == 4
    assert summary["metrics"] == [tags.VAL_AP, "val/recall@precision0.90"]
    assert summary["tensorboard_pr_curves"] == "binned (101 thresholds)"
    assert tags.VAL_AP in report.summary_tags()


def test_evaluate_report_states_exact_or_binned(monkeypatch):
    probs, targets = noisy(400, 5, seed=3)
    logits, names = probs.log(), list("abcde")
    exact = classification_report(logits, targets, names)
    assert exact["curves"]["method"] == "exact" and exact["curves"]["exact_limit"] == curves.EXACT_LIMIT
    want = [average_precision_score(targets.numpy() == c, probs[:, c].double().numpy()) for c in range(5)]
    assert [exact["per_class"][n]["average_precision"] for n in names] == pytest.approx(want, abs=1e-6)
    monkeypatch.setattr(curves, "EXACT_LIMIT", 1000)
    binned = classification_report(logits, targets, names)
    assert binned["curves"]["method"] == "binned (1001 thresholds)" and binned["curves"]["exact_limit"] == 1000
    assert binned["macro"]["average_precision"] == pytest.approx(np.mean(want), abs=5e-3)
    assert AP_KEY == "ap"
