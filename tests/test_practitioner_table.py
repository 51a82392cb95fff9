"""A real run's practitioner figures: recall at a fixed precision (scikit-learn's, from the same validation
probabilities), summary.json's ``metrics`` and ``inference`` block, ``pvt-lightning speed`` adding measurements
without touching them, and plain terminal output even when Lightning believes ``rich`` is installed.

b0 trains for real on scikit-learn's digits (experiments/make_digits.py), in this process, through the CLI.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from lightning.pytorch.trainer.connectors import callback_connector
from sklearn.metrics import precision_recall_curve

from pvt_lightning.cli.main import main
from pvt_lightning.runs.compare import load_scalars
from pvt_lightning.training.inference_speed import INFERENCE_FIELDS

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
CLASSES = [str(d) for d in range(10)]
PRECISIONS = {"0.90": 0.9, "0.50": 0.5}


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """(run folder, data folder, stdout) of 2 short epochs of b0 on the digits, Lightning told rich is there."""
    from make_digits import write_digits

    root = tmp_path_factory.mktemp("digits")
    write_digits(root / "digits", size=32)
    args = ["train", "--variant", "b0", "--data", str(root / "digits"), "--img-size", "32", "32", "--batch-size", "32",
            "--num-workers", "0", "--epochs", "2", "--limit-train-batches", "4", "--accelerator", "cpu",
            "--precision", "32", "--logdir", str(root / "runs"), "--name", "digits", "--report-precision", "0.9",
            "0.5", "--inference-seconds", "1", "--monitor", "val/recall@precision0.50"]
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out):
        patch.setattr(callback_connector, "_RICH_AVAILABLE", True)  # Lightning would pick its rich bar and table
        assert main(args) == 0
    return root / "runs" / "digits" / "version_0", root / "digits", out.getvalue()


@pytest.fixture(scope="module")
def validation_probabilities(digits_run):
    """The final model's probabilities of every validation image (``evaluate`` of last.ckpt, at the training's batch
    size and order), and evaluate's report."""
    run_dir, data, _ = digits_run
    out = run_dir / "eval"
    assert main(["evaluate", "--checkpoint", str(run_dir / "checkpoints" / "last.ckpt"), "--data", str(data),
                 "--split", "val", "--batch-size", "32", "--num-workers", "0", "--accelerator", "cpu",
                 "--output-dir", str(out), "--report-precision", "0.9", "0.5"]) == 0
    with open(out / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    probs = np.array([[float(row[f"prob_{c}"]) for c in CLASSES] for row in rows])
    targets = np.array([CLASSES.index(row["true_class"]) for row in rows])
    return probs, targets, json.loads((out / "report.json").read_text())


def sklearn_recall_at_precision(probs: np.ndarray, targets: np.ndarray, precision: float) -> list[float]:
    values = []
    for c in range(probs.shape[1]):
        p, r, _ = precision_recall_curve(targets == c, probs[:, c])
        values.append(float(r[p >= precision].max()))
    return values


def test_logged_recall_at_precision_equals_sklearn_on_the_validation_probabilities(digits_run,
                                                                                   validation_probabilities):
    run_dir, _, _ = digits_run
    probs, targets, report = validation_probabilities
    assert len(targets) == 360  # the whole validation split, every class
    scalars = load_scalars(run_dir)
    for label, precision in PRECISIONS.items():
        expected = sklearn_recall_at_precision(probs, targets, precision)
        logged = [scalars[f"val/recall@precision{label}/{c}"][-1][1] for c in CLASSES]
        assert logged == pytest.approx(expected, abs=1e-6), label
        assert scalars[f"val/recall@precision{label}"][-1][1] == pytest.approx(np.mean(expected), abs=1e-6)
        assert scalars[f"val/unreached@precision{label}"][-1][1] == sum(v == 0 for v in expected)
        assert [point[0] for point in scalars[f"val/recall@precision{label}"]] == [0, 1]  # every epoch
        assert report["recall_at_precision"]["precisions"][label]["macro"] == pytest.approx(np.mean(expected),
                                                                                            abs=1e-6)
    assert 0 < np.mean(sklearn_recall_at_precision(probs, targets, 0.5))  # a model that learnt something


def test_summary_holds_recall_at_each_precision_and_the_inference_block(digits_run):
    run_dir, _, _ = digits_run
    summary = json.loads((run_dir / "summary.json").read_text())
    scalars = load_scalars(run_dir)
    for label in PRECISIONS:
        tag = f"val/recall@precision{label}"
        assert summary["metrics"][tag] == pytest.approx(scalars[tag][-1][1], abs=1e-6)  # the last epoch
        best = dict(scalars[tag])[summary["best"]["epoch"]]
        assert summary["best"][tag] == pytest.approx(best, abs=1e-6)  # the best epoch's
    monitored = dict(scalars["val/recall@precision0.50"])  # --monitor: the best checkpoint by recall at P 0.5
    assert summary["best"]["metric"] == "val/recall@precision0.50"
    assert summary["best"]["value"] == pytest.approx(max(monitored.values()), abs=1e-6)
    assert monitored[summary["best"]["epoch"]] == pytest.approx(max(monitored.values()), abs=1e-6)
    assert Path(summary["checkpoints"]["best"]).name.startswith(
        f"best-epoch{summary['best']['epoch']:03d}-recall_at_p0.50_")
    at = summary["recall_at_precision"]
    assert at["precisions"] == [0.9, 0.5] and at["method"] == "exact" and set(at["unreached"]) == set(PRECISIONS)
    inference = summary["inference"]
    assert tuple(inference) == INFERENCE_FIELDS
    assert inference["batch_size"] == 32 and inference["img_size"] == [32, 32]
    assert inference["precision"] == "32-true" and inference["device"].startswith("cpu")
    assert inference["img_s"] > 0 and inference["batch1_img_s"] > 0
    assert 0 < inference["latency_ms_p50"] <= inference["latency_ms_p90"]


def test_terminal_output_is_plain_with_rich_around(digits_run):
    run_dir, _, stdout = digits_run
    lines = stdout.splitlines()
    final = [line for line in lines if line.startswith("Run saved to ")]
    assert len(final) == 1 and final[0].startswith(f"Run saved to {run_dir} | val/acc ")  # one line, not wrapped
    assert re.search(r"\| \d+ s$", final[0])
    epoch_lines = [line for line in lines if line.startswith("epoch ")]
    assert len(epoch_lines) == 2 and all("R@P0.50 " in line and "R@P0.90 " in line for line in epoch_lines)
    assert "💡" not in stdout and "Total Flops" not in stdout


def test_speed_adds_measurements_without_touching_the_training_figures(digits_run, capsys):
    run_dir, _, _ = digits_run
    before = (run_dir / "summary.json").read_bytes()
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    assert main(["export", "--checkpoint", str(checkpoint), "--output", str(run_dir / "digits.onnx")]) == 0
    assert main(["speed", "--checkpoint", str(checkpoint), "--seconds", "0.5"]) == 0  # eager, then the export
    assert main(["speed", "--checkpoint", str(checkpoint), "--seconds", "0.5", "--no-exported",
                 "--batch-size", "8"]) == 0
    records = json.loads((run_dir / "inference_measurements.json").read_text())
    assert [(r["runtime"], Path(r["file"]).name, r["batch_size"]) for r in records] == [
        ("eager", "last.ckpt", 32), ("onnxruntime", "digits.onnx", 32), ("eager", "last.ckpt", 8)]
    for record in records:
        assert set(INFERENCE_FIELDS) <= set(record) and record["img_s"] > 0 and record["img_size"] == [32, 32]
    assert (run_dir / "summary.json").read_bytes() == before
    assert "summary.json's training-time figures unchanged" in capsys.readouterr().out
