"""Evaluation after training (pvt_lightning.evaluation): files, calibration, operating points, plots, compare.

Expected values come from scikit-learn or from plain NumPy written here, never from the code under test.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import average_precision_score, log_loss, precision_recall_fscore_support, top_k_accuracy_score
from torch.utils.tensorboard import SummaryWriter

from pvt_lightning.errors import DataError
from pvt_lightning.errors import OutputExistsError
from pvt_lightning.evaluation.calibration import fit_temperature
from pvt_lightning.evaluation.operating_point import OPERATING_POINT_FILE, OperatingPoint, choose_thresholds, decide
from pvt_lightning.evaluation.report import evaluation_file_names, evaluation_files, write_outputs

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def synthetic_logits(num_classes: int, n: int = 600, scale: float = 3.0, seed: int = 0):
    """Over-confident logits of a mediocre classifier; class 0 is rare, the last class is never predicted."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.ones(num_classes)
    weights[0] = 0.2
    targets = torch.multinomial(weights, n, replacement=True, generator=g)
    logits = torch.randn(n, num_classes, generator=g)
    logits[torch.arange(n), targets] += 1.5
    logits[:, -1] -= 6  # (almost) never the argmax: precision 0 by convention
    return logits * scale, targets


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def evaluate_to(folder: Path, logits, targets, names, **kwargs) -> dict:
    paths = [f"/data/val/{names[t]}/{i:04d}.jpg" for i, t in enumerate(targets.tolist())]
    report, files = evaluation_files(logits, targets, paths, names, **kwargs)
    write_outputs(folder, files)
    return report


def probability_matrix(rows: list[dict[str, str]], names) -> np.ndarray:
    return np.array([[float(row[f"prob_{name}"]) for name in names] for row in rows])


# --- metrics and files ---------------------------------------------------------------------------------------

def test_per_class_csv_equals_sklearn_on_predictions_csv(tmp_path):
    names = ["cat", "dog", "fox", "owl"]
    logits, targets = synthetic_logits(len(names))
    evaluate_to(tmp_path, logits, targets, names, split="val")
    predictions = read_rows(tmp_path / "predictions.csv")
    per_class = read_rows(tmp_path / "per_class.csv")
    assert list(per_class[0])[:5] == ["class", "precision", "recall", "f1", "support"]
    assert [row["class"] for row in per_class] == names
    true = [row["true_class"] for row in predictions]
    predicted = [row["predicted_class"] for row in predictions]
    precision, recall, f1, support = precision_recall_fscore_support(true, predicted, labels=names, zero_division=0)
    for i, row in enumerate(per_class):
        assert float(row["precision"]) == pytest.approx(precision[i], abs=1e-6), row
        assert float(row["recall"]) == pytest.approx(recall[i], abs=1e-6), row
        assert float(row["f1"]) == pytest.approx(f1[i], abs=1e-6), row
        assert int(row["support"]) == support[i]
    assert float(per_class[-1]["precision"]) == 0.0  # "owl" is never predicted
    with Image.open(tmp_path / "reliability.png") as image:
        assert image.size == (600, 600)  # not calibrated: one panel


def test_report_json_matches_sklearn(tmp_path):
    names = ["a", "b", "c", "d", "e", "f", "g"]
    logits, targets = synthetic_logits(len(names), seed=1)
    evaluate_to(tmp_path, logits, targets, names, split="test", checkpoint="best.ckpt",
                extra={"skipped_images": 2})
    report = json.loads((tmp_path / "report.json").read_text())
    probs = logits.double().softmax(-1).numpy()
    y = targets.numpy()
    assert report["split"] == "test" and report["checkpoint"] == "best.ckpt" and report["skipped_images"] == 2
    assert report["num_images"] == len(y)
    assert report["accuracy"] == pytest.approx(float((probs.argmax(1) == y).mean()), abs=1e-6)
    assert report["top5_accuracy"] == pytest.approx(top_k_accuracy_score(y, probs, k=5), abs=1e-6)
    assert report["log_loss"] == pytest.approx(log_loss(y, probs, labels=range(len(names))), rel=1e-5)
    ap = [average_precision_score(y == i, probs[:, i]) for i in range(len(names))]
    for i, name in enumerate(names):
        assert report["per_class"][name]["average_precision"] == pytest.approx(ap[i], abs=1e-5)
    assert report["macro"]["average_precision"] == pytest.approx(np.mean(ap), abs=1e-5)
    precision, recall, f1, _ = precision_recall_fscore_support(y, probs.argmax(1), labels=range(len(names)),
                                                               zero_division=0)
    assert report["macro"]["recall"] == pytest.approx(recall.mean(), abs=1e-6)
    assert report["macro"]["f1"] == pytest.approx(f1.mean(), abs=1e-6)
    # ECE by hand: 15 equal-width (lo, hi] bins of the top-1 probability
    confidence, correct = probs.max(1), probs.argmax(1) == y
    bins = np.clip(np.ceil(confidence * 15).astype(int), 1, 15)
    ece = sum(abs(confidence[bins == b].mean() - correct[bins == b].mean()) * (bins == b).mean()
              for b in range(1, 16) if (bins == b).any())
    assert report["ece"] == pytest.approx(ece, abs=1e-4)
    confused = report["most_confused"][0]
    confusion = np.zeros((len(names), len(names)), int)
    np.add.at(confusion, (y, probs.argmax(1)), 1)
    np.fill_diagonal(confusion, 0)
    assert confused["count"] == confusion.max()


def test_a_class_absent_from_the_split_has_no_ap_and_the_report_stays_strict_json(tmp_path):
    names = ["a", "b", "absent"]
    logits, targets = synthetic_logits(2, seed=6)
    logits = torch.cat([logits, torch.zeros(len(targets), 1)], dim=1)  # a third class no image belongs to
    evaluate_to(tmp_path, logits, targets, names)
    report = json.loads((tmp_path / "report.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert report["per_class"]["absent"]["average_precision"] is None
    assert report["per_class"]["absent"]["support"] == 0
    probs = logits.double().softmax(-1).numpy()
    ap = [average_precision_score(targets.numpy() == i, probs[:, i]) for i in range(2)]
    assert report["macro"]["average_precision"] == pytest.approx(np.mean(ap), abs=1e-5)  # over present classes
    assert read_rows(tmp_path / "per_class.csv")[2]["average_precision"] == ""


def test_temperature_scaling_lowers_nll_on_the_split_it_was_fitted_on(tmp_path):
    names = ["a", "b", "c"]
    logits, targets = synthetic_logits(len(names), scale=4.0, seed=2)
    report = evaluate_to(tmp_path, logits, targets, names, calibrate=True)
    calibration = json.loads((tmp_path / "report.json").read_text())["calibration"]
    y = targets.numpy()

    def nll(t: float) -> float:
        return log_loss(y, (logits.double() / t).softmax(-1).numpy(), labels=range(len(names)))

    temperature = calibration["temperature"]
    assert temperature > 1  # these logits are over-confident
    assert calibration["nll_before"] == pytest.approx(nll(1.0), rel=1e-6)
    assert calibration["nll_after"] == pytest.approx(nll(temperature), rel=1e-6)
    assert calibration["nll_after"] < calibration["nll_before"] - 0.05
    assert calibration["ece_after"] < calibration["ece_before"]
    grid = np.linspace(0.5, 8.0, 76)  # LBFGS found the minimum a grid search finds
    assert nll(temperature) <= min(nll(t) for t in grid) + 1e-6
    assert report["calibration"] == calibration
    # already calibrated logits: T stays near 1 and NLL does not get worse
    assert fit_temperature(logits / temperature, targets) == pytest.approx(1.0, abs=1e-3)


def precision_at(scores: np.ndarray, positive: np.ndarray, threshold: float) -> float:
    chosen = scores >= threshold
    return positive[chosen].mean() if chosen.any() else 0.0


def test_thresholds_reach_target_precision_and_are_the_lowest_that_do(tmp_path):
    names = ["a", "b", "c", "hopeless"]
    logits, targets = synthetic_logits(len(names), seed=3)
    logits[targets != 3, 3] += 3  # "hopeless" scores higher on every other class's images than on its own:
    logits[targets == 3, 3] -= 10  # its precision never exceeds its share of the images, at any threshold
    report = evaluate_to(tmp_path, logits, targets, names, calibrate=True, target_precision=0.9, split="val",
                         checkpoint="x.ckpt")
    point = json.loads((tmp_path / OPERATING_POINT_FILE).read_text())
    assert set(point) == {"temperature", "thresholds", "target", "split", "checkpoint"}
    assert point["target"] == {"precision": 0.9} and point["split"] == "val" and point["checkpoint"] == "x.ckpt"
    assert point["temperature"] == report["calibration"]["temperature"]
    probs = (logits / point["temperature"]).softmax(-1).numpy()
    y = targets.numpy()
    expected_unreachable = []
    for i, name in enumerate(names):
        scores, positive = probs[:, i], y == i
        candidates = np.unique(scores)
        reaching = [t for t in candidates if precision_at(scores, positive, t) >= 0.9]
        if not reaching:
            expected_unreachable.append(name)
            assert point["thresholds"][name] is None
            continue
        threshold = point["thresholds"][name]
        assert np.float32(threshold) == min(reaching)  # the lowest threshold that reaches the target
        assert precision_at(scores, positive, threshold) >= 0.9
        assert report["operating_point"]["per_class"][name]["precision"] >= 0.9
    assert "hopeless" in expected_unreachable and len(expected_unreachable) < len(names) - 1
    assert report["operating_point"]["unreachable"] == expected_unreachable
    per_class = read_rows(tmp_path / "per_class.csv")
    for row in per_class:
        assert (row["threshold"] == "") == (row["class"] in expected_unreachable)
        assert row["threshold"] == "" or float(row["precision_at_threshold"]) >= 0.9


def test_recall_at_fixed_precision_equals_sklearn_and_its_columns_come_last(tmp_path):
    from sklearn.metrics import precision_recall_curve

    from pvt_lightning.evaluation.report import headline_metrics

    names = ["a", "b", "c", "hopeless"]
    logits, targets = synthetic_logits(len(names), seed=3)
    logits[targets != 3, 3] += 3  # "hopeless" never reaches any useful precision (as above)
    logits[targets == 3, 3] -= 10
    report = evaluate_to(tmp_path, logits, targets, names, split="val", target_precision=0.9,
                         report_precisions=[0.9, 0.5])
    probs, y = logits.softmax(-1).numpy(), targets.numpy()
    at = report["recall_at_precision"]
    assert at["method"] == "exact" and list(at["precisions"]) == ["0.90", "0.50"]
    for label, precision in (("0.90", 0.9), ("0.50", 0.5)):
        expected = []
        for i, name in enumerate(names):
            p, r, _ = precision_recall_curve(y == i, probs[:, i])
            expected.append(r[p >= precision].max())
            assert at["precisions"][label]["per_class"][name] == pytest.approx(expected[-1], abs=1e-6)
            assert report["per_class"][name][f"recall@precision{label}"] == pytest.approx(expected[-1], abs=1e-6)
        assert at["precisions"][label]["macro"] == pytest.approx(np.mean(expected), abs=1e-6)
        assert at["precisions"][label]["unreached"] == [n for n, v in zip(names, expected) if v == 0]
    assert "hopeless" in at["precisions"]["0.90"]["unreached"]
    # The same figure as the recall the operating point for --target-precision 0.9 gives (the lowest threshold with
    # that precision), for every class that reaches it.
    operating = report["operating_point"]
    assert operating["unreachable"] == at["precisions"]["0.90"]["unreached"]
    for name in names:
        if name not in operating["unreachable"]:
            assert operating["per_class"][name]["recall"] == pytest.approx(
                at["precisions"]["0.90"]["per_class"][name], abs=1e-6)
    rows = read_rows(tmp_path / "per_class.csv")
    assert list(rows[0]) == ["class", "precision", "recall", "f1", "support", "average_precision", "threshold",
                             "precision_at_threshold", "recall_at_threshold", "recall@precision0.90",
                             "recall@precision0.50"]  # the old columns first, unchanged
    assert float(rows[0]["recall@precision0.90"]) == pytest.approx(at["precisions"]["0.90"]["per_class"]["a"],
                                                                    abs=1e-6)
    assert headline_metrics(report)["val/recall@precision0.90"] == at["precisions"]["0.90"]["macro"]


def test_recall_target_gives_the_highest_threshold_with_that_recall():
    logits, targets = synthetic_logits(3, seed=4)
    probs = logits.softmax(-1)
    thresholds = choose_thresholds(probs, targets, ["a", "b", "c"], target_recall=0.8)
    for i, name in enumerate("abc"):
        scores, positive = probs[:, i].numpy(), (targets == i).numpy()
        t = thresholds[name]
        assert positive[scores >= t].sum() / positive.sum() >= 0.8
        higher = np.unique(scores[scores > t])
        assert all(positive[scores >= h].sum() / positive.sum() < 0.8 for h in higher)
    with pytest.raises(ValueError, match="exactly one"):
        choose_thresholds(probs, targets, ["a", "b", "c"])


def test_decisions_equal_thresholding_the_calibrated_probabilities(tmp_path):
    names = ["a", "b", "c", "d"]
    logits, targets = synthetic_logits(len(names), seed=5)
    evaluate_to(tmp_path, logits, targets, names, calibrate=True, target_precision=0.8)
    thresholds = json.loads((tmp_path / OPERATING_POINT_FILE).read_text())["thresholds"]
    rows = read_rows(tmp_path / "predictions.csv")
    probs = probability_matrix(rows, names).astype(np.float32)
    limits = np.array([np.inf if thresholds[n] is None else thresholds[n] for n in names], dtype=np.float32)
    expected = []
    for p in probs:
        cleared = [i for i in range(len(names)) if p[i] >= limits[i]]
        expected.append(names[max(cleared, key=lambda i: p[i])] if cleared else "abstain")
    assert [row["decision"] for row in rows] == expected
    assert "abstain" in expected and len(set(expected)) > 2
    # the written probability is the calibrated one
    assert [float(row["probability"]) for row in rows] == pytest.approx(probs.max(1).tolist(), abs=1e-7)


def test_decide_picks_the_most_probable_class_that_clears_its_threshold():
    probs = torch.tensor([[0.5, 0.4, 0.1], [0.5, 0.4, 0.1], [0.2, 0.3, 0.5]])
    assert decide(probs, [0.6, 0.35, None]).tolist() == [1, 1, -1]
    assert decide(probs, [0.45, 0.3, 0.5]).tolist() == [0, 0, 2]


def test_operating_point_file_is_checked(tmp_path):
    point = OperatingPoint(1.5, {"a": 0.7, "b": None}, {"precision": 0.9}, "val", "x.ckpt")
    path = tmp_path / "op.json"
    path.write_text(point.to_json())
    assert OperatingPoint.load(path, ["a", "b"]) == point
    with pytest.raises(DataError, match="classes"):
        OperatingPoint.load(path, ["a", "c"])
    with pytest.raises(DataError, match="not found"):
        OperatingPoint.load(tmp_path / "absent.json")
    path.write_text('{"temperature": -1, "thresholds": {}}')
    with pytest.raises(DataError, match="not an operating point"):
        OperatingPoint.load(path)
    path.write_text("{")
    with pytest.raises(DataError, match="not valid JSON"):
        OperatingPoint.load(path)


def test_existing_files_are_never_overwritten(tmp_path):
    names = ["a", "b"]
    logits, targets = synthetic_logits(2)
    (tmp_path / "report.json").write_text("mine")
    _, files = evaluation_files(logits, targets, [str(i) for i in range(len(targets))], names)
    assert set(files) == set(evaluation_file_names(operating_point=False))
    with pytest.raises(OutputExistsError, match="report.json.*--overwrite"):
        write_outputs(tmp_path, files)
    assert (tmp_path / "report.json").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]  # nothing written, no temp files left
    write_outputs(tmp_path, files, overwrite=True)
    assert json.loads((tmp_path / "report.json").read_text())["num_images"] == len(targets)


# --- plots -----------------------------------------------------------------------------------------------------

def test_plots_are_pngs_whose_size_follows_the_class_count(tmp_path):
    sizes = {}
    for num_classes in (2, 200):
        names = [f"class_{i:03d}" for i in range(num_classes)]
        logits, targets = synthetic_logits(num_classes, n=2000)
        folder = tmp_path / str(num_classes)
        evaluate_to(folder, logits, targets, names, calibrate=True)
        for plot in ("confusion_matrix.png", "pr_curves.png", "reliability.png"):
            data = (folder / plot).read_bytes()
            assert data[:8] == PNG_SIGNATURE
            with Image.open(io.BytesIO(data)) as image:
                image.load()  # decodes every pixel
                pixels = np.asarray(image.convert("L"))
                sizes[num_classes, plot] = image.size
            assert pixels.std() > 10, (plot, num_classes)  # something is drawn
    for plot in ("confusion_matrix.png", "pr_curves.png"):
        small, large = sizes[2, plot], sizes[200, plot]
        assert large[0] > small[0] and large[1] >= small[1], plot
        assert max(large) <= 3000, plot  # top-N and aggregates, not a 200x200 grid
    assert sizes[2, "reliability.png"] == sizes[200, "reliability.png"]
    assert sizes[2, "reliability.png"][0] == 1200  # before and after calibration side by side


# --- compare.py --per-class ------------------------------------------------------------------------------------

def write_per_class_run(run_dir: Path, classes, precision_by_epoch: list[list[float]]) -> None:
    """Events as ClassificationReport writes them, plus the macro tags compare's main table reads."""
    writer = SummaryWriter(str(run_dir))
    for epoch, values in enumerate(precision_by_epoch):
        writer.add_scalar("val/acc", sum(values) / len(values), epoch)
        for name, value in zip(classes, values):
            writer.add_scalar(f"val/precision/{name}", value, epoch)
            writer.add_scalar(f"val/recall/{name}", value / 2, epoch)
            writer.add_scalar(f"val/recall@precision0.90/{name}", value / 4, epoch)
        writer.add_scalar("val/positive/precision/" + classes[0], 0.123, epoch)  # must not become a class
    writer.close()


def test_compare_per_class_reads_the_last_epoch_per_dataset(tmp_path, capsys):
    from pvt_lightning.cli.main import main

    def compare_main(args: list[str]) -> int:  # experiments/compare.py is `pvt-lightning compare`
        return main(["compare", *args])

    logdir = tmp_path / "runs"
    classes = ["cat", "dog", "rare"]
    write_per_class_run(logdir / "resnet50_64x64" / "version_0", classes, [[0.1, 0.2, 0.3], [0.8, 0.6, 0.2]])
    write_per_class_run(logdir / "b5_64x64" / "version_0", classes, [[0.5, 0.5, 0.5], [0.9, 0.7, 0.6]])
    write_per_class_run(logdir / "other_data" / "version_0", ["x", "y"], [[0.4, 0.2]])
    out = tmp_path / "out"
    assert compare_main(["--logdir", str(logdir), "--out", str(out), "--per-class"]) == 0
    rows = read_rows(out / "per_class.csv")
    values = {(row["run"], row["class"]): (float(row["precision"]), float(row["recall"])) for row in rows}
    assert len(values) == 8 and ("b5_64x64/version_0", "positive") not in {(r, c) for r, c in values}
    assert values["b5_64x64/version_0", "rare"] == pytest.approx((0.6, 0.3))
    assert values["resnet50_64x64/version_0", "rare"] == pytest.approx((0.2, 0.1))
    assert values["other_data/version_0", "y"] == pytest.approx((0.2, 0.1))
    at_precision = {(row["run"], row["class"]): (float(row["recall_at_precision"]), float(row["at_precision"]))
                    for row in rows}
    assert at_precision["b5_64x64/version_0", "rare"] == pytest.approx((0.15, 0.9))  # recall at precision 0.9
    markdown = (out / "per_class.md").read_text()
    assert markdown.count("| class |") == 2  # one table per dataset
    assert ("| rare | 60.0 | 30.0 | 15.0 | 20.0 | 10.0 | 5.0 |" in markdown
            or "| rare | 20.0 | 10.0 | 5.0 | 60.0 | 30.0 | 15.0 |" in markdown)
    printed = capsys.readouterr().out
    assert "P b5_64x64/version_0" in printed and "R@P0.90 b5_64x64/version_0" in printed and "rare" in printed


# --- end to end: a checkpoint trained through the entry point, then --evaluate and --predict in-process ----------

CLASSES = ("a", "b", "c")
CPU = ["--num-workers", "0", "--precision", "32", "--accelerator", "cpu"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """b0 trained a few steps on 3 colour classes; a held-out test/ split (other seed) with one corrupt file."""
    from conftest import make_image_folder
    from pvt_lightning.cli.main import main

    base = tmp_path_factory.mktemp("evaluation")
    data = make_image_folder(base / "data", classes=CLASSES, per_class=8, size=(32, 32))
    held_out = make_image_folder(base / "held_out", classes=CLASSES, per_class=8, size=(32, 32), seed=1)
    (held_out / "val").rename(data / "test")
    (data / "test" / "a" / "broken.jpg").write_bytes(b"not a jpeg")
    assert main(["--variant", "b0", "--img-size", "32", "32", *CPU, "--data", str(data), "--batch-size", "8",
                 "--epochs", "1", "--limit-train-batches", "4", "--lr", "1e-3", "--logdir", str(base / "runs"),
                 "--name", "b0"]) == 0
    checkpoint = base / "runs" / "b0" / "version_0" / "checkpoints" / "last.ckpt"
    return data, checkpoint


def run_main(*args: str) -> int:
    from pvt_lightning.cli.main import main

    return main([*args, *CPU])


def test_evaluate_writes_every_file_from_a_real_checkpoint(trained, tmp_path, capsys):
    data, checkpoint = trained
    out = tmp_path / "eval"
    assert run_main("--evaluate", str(checkpoint), "--data", str(data), "--split", "test", "--output-dir", str(out),
                    "--calibrate", "--target-precision", "0.6", "--output", str(tmp_path / "metrics.json")) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(evaluation_file_names(operating_point=True))
    report = json.loads((out / "report.json").read_text())
    metrics = json.loads((tmp_path / "metrics.json").read_text())  # --output: the tags training logs
    assert metrics["test/acc"] == report["accuracy"] and metrics["test/recall"] == report["macro"]["recall"]
    assert report["split"] == "test" and report["checkpoint"] == str(checkpoint)
    assert report["skipped_images"] == 1 and report["skipped_paths"][0].endswith("broken.jpg")
    predictions = read_rows(out / "predictions.csv")
    assert len(predictions) == report["num_images"] == 3 * 8  # the corrupt file is counted, not predicted
    assert {Path(row["path"]).parent.parent for row in predictions} == {data / "test"}
    # per_class.csv is scikit-learn's precision_recall_fscore_support of predictions.csv
    per_class = read_rows(out / "per_class.csv")
    precision, recall, f1, support = precision_recall_fscore_support(
        [row["true_class"] for row in predictions], [row["predicted_class"] for row in predictions],
        labels=list(CLASSES), zero_division=0)
    for i, row in enumerate(per_class):
        assert row["class"] == CLASSES[i] and int(row["support"]) == support[i] == 8
        assert [float(row[k]) for k in ("precision", "recall", "f1")] == pytest.approx(
            [precision[i], recall[i], f1[i]], abs=1e-6)
    # temperature scaling did not raise the NLL of the split it was fitted on (the library test shows it lowers it)
    calibration = report["calibration"]
    assert calibration["nll_after"] <= calibration["nll_before"] + 1e-9
    # thresholds give at least the target precision on this split, on the calibrated probabilities written
    point = json.loads((out / OPERATING_POINT_FILE).read_text())
    assert point["temperature"] == calibration["temperature"] and point["split"] == "test"
    probs = probability_matrix(predictions, CLASSES).astype(np.float32)
    true = np.array([CLASSES.index(row["true_class"]) for row in predictions])
    for i, name in enumerate(CLASSES):
        if point["thresholds"][name] is not None:
            assert precision_at(probs[:, i], true == i, np.float32(point["thresholds"][name])) >= 0.6
    assert any(t is not None for t in point["thresholds"].values())
    for plot in ("confusion_matrix.png", "pr_curves.png", "reliability.png"):
        with Image.open(out / plot) as image:
            image.load()
    printed = capsys.readouterr().out
    assert "calibration: T" in printed and f"--operating-point {out / OPERATING_POINT_FILE}" in printed


def test_predict_with_the_operating_point_decides_by_its_thresholds(trained, tmp_path, capsys):
    data, checkpoint = trained
    out = tmp_path / "eval"
    assert run_main("--evaluate", str(checkpoint), "--data", str(data), "--split", "val", "--output-dir", str(out),
                    "--calibrate", "--target-precision", "0.5") == 0
    point = json.loads((out / OPERATING_POINT_FILE).read_text())
    csv_path = tmp_path / "predicted.csv"
    assert run_main("--predict", str(data / "val"), "--checkpoint", str(checkpoint), "--operating-point",
                    str(out / OPERATING_POINT_FILE), "--output", str(csv_path)) == 0
    assert "Applying" in capsys.readouterr().out
    rows = read_rows(csv_path)
    assert list(rows[0])[:5] == ["path", "class", "probability", "decision", "top5"]
    probs = probability_matrix(rows, CLASSES).astype(np.float32)
    limits = np.array([np.inf if point["thresholds"][n] is None else point["thresholds"][n] for n in CLASSES],
                      dtype=np.float32)
    cleared = probs >= limits
    expected = [CLASSES[int(np.where(c, p, -1).argmax())] if c.any() else "abstain" for p, c in zip(probs, cleared)]
    assert [row["decision"] for row in rows] == expected
    assert [float(row["probability"]) for row in rows] == pytest.approx(probs.max(1).tolist(), abs=1e-7)
    # the calibrated probabilities are the ones --evaluate saw for the same images
    evaluated = {row["path"]: row for row in read_rows(out / "predictions.csv")}
    assert len(evaluated) == len(rows)
    for row in rows:
        assert [float(row[f"prob_{n}"]) for n in CLASSES] == pytest.approx(
            [float(evaluated[row["path"]][f"prob_{n}"]) for n in CLASSES], abs=1e-5)


def test_predict_uses_an_operating_point_next_to_the_checkpoint(trained, tmp_path, capsys):
    data, checkpoint = trained
    folder = tmp_path / "shipped"
    folder.mkdir()
    (folder / "model.ckpt").write_bytes(checkpoint.read_bytes())
    (folder / OPERATING_POINT_FILE).write_text(OperatingPoint(2.0, {n: 0.5 for n in CLASSES}).to_json())
    csv_path = tmp_path / "predicted.csv"
    assert run_main("--predict", str(data / "val"), "--checkpoint", str(folder / "model.ckpt"), "--output",
                    str(csv_path)) == 0
    assert f"Found {folder / OPERATING_POINT_FILE}" in capsys.readouterr().out
    rows = read_rows(csv_path)
    assert list(rows[0]) == ["path", "class", "probability", "top5", "calibrated_probability"]
    for row in rows:  # T = 2 > 1 flattens the softmax: the top class's probability drops towards 1/3
        assert 1 / 3 - 1e-6 <= float(row["calibrated_probability"]) <= float(row["probability"]) + 1e-6


def test_tta_makes_predictions_invariant_to_a_horizontal_flip(trained, tmp_path):
    """Mean of the logits of x and flip(x): flipping every input image cannot change it (lossless PNGs, no crop)."""
    import cv2

    data, checkpoint = trained
    for name in ("plain", "flipped"):
        (tmp_path / name).mkdir()
    for path in sorted((data / "val" / "a").glob("*.jpg"))[:4]:
        image = cv2.imread(str(path))
        image[:, :16] //= 2  # a left/right asymmetric picture
        cv2.imwrite(str(tmp_path / "plain" / f"{path.stem}.png"), image)
        cv2.imwrite(str(tmp_path / "flipped" / f"{path.stem}.png"), np.ascontiguousarray(image[:, ::-1]))
    probabilities = {}
    for name in ("plain", "flipped"):
        for tta in (False, True):
            out = tmp_path / f"{name}_{tta}.csv"
            assert run_main("--predict", str(tmp_path / name), "--checkpoint", str(checkpoint), "--output", str(out),
                            "--crop-pct", "1.0", *(["--tta"] if tta else [])) == 0
            rows = read_rows(out)
            probabilities[name, tta] = {Path(r["path"]).name: float(r["probability"]) for r in rows}
    assert probabilities["plain", True] == pytest.approx(probabilities["flipped", True], abs=1e-5)
    assert probabilities["plain", False] != pytest.approx(probabilities["flipped", False], abs=1e-5)


def test_evaluate_refuses_existing_files_before_any_work(trained, tmp_path, capsys):
    data, checkpoint = trained
    out = tmp_path / "eval"
    out.mkdir()
    (out / "per_class.csv").write_text("mine\n")
    assert run_main("--evaluate", str(checkpoint), "--data", str(data), "--output-dir", str(out)) == 2
    error = capsys.readouterr().err
    assert "per_class.csv" in error and "--overwrite" in error and "Traceback" not in error
    assert [p.name for p in out.iterdir()] == ["per_class.csv"] and (out / "per_class.csv").read_text() == "mine\n"
    assert run_main("--evaluate", str(checkpoint), "--data", str(data), "--output-dir", str(out), "--overwrite") == 0
    assert read_rows(out / "per_class.csv")[0]["class"] == "a"


@pytest.mark.parametrize("args, message", [
    (["--target-precision", "0.9", "--target-recall", "0.9"], "give one of them"),
    (["--target-precision", "1.5"], "--target-precision"),
    (["--operating-point", "op.json", "--calibrate"], "brings its own temperature"),
])
def test_flag_mistakes_exit_2_with_one_message(trained, tmp_path, capsys, args, message):
    data, checkpoint = trained
    assert run_main("--evaluate", str(checkpoint), "--data", str(data), "--output-dir", str(tmp_path / "o"),
                    *args) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_command_line_evaluate_then_predict(trained, tmp_path):
    """experiments/run.py as a user runs it: recall target on val, decisions on new images, a bad file exits 2."""
    import subprocess

    data, checkpoint = trained

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / "experiments" / "run.py"), *args, *CPU], capture_output=True,
                              text=True, timeout=600, cwd=tmp_path)

    done = run("--evaluate", str(checkpoint), "--data", str(data), "--target-recall", "0.75", "--output-dir", "ev")
    assert done.returncode == 0, done.stderr[-2000:]
    point = json.loads((tmp_path / "ev" / OPERATING_POINT_FILE).read_text())
    assert point["target"] == {"recall": 0.75} and point["temperature"] == 1.0
    per_class = {row["class"]: row for row in read_rows(tmp_path / "ev" / "per_class.csv")}
    assert all(float(per_class[name]["recall_at_threshold"]) >= 0.75 for name in CLASSES)
    done = run("--predict", str(data / "test"), "--checkpoint", str(checkpoint), "--operating-point",
               "ev/operating_point.json", "--output", "decided.csv")
    assert done.returncode == 0, done.stderr[-2000:]
    decisions = {row["decision"] for row in read_rows(tmp_path / "decided.csv")}
    assert decisions <= {*CLASSES, "abstain"} and decisions & set(CLASSES)
    (tmp_path / "bad.json").write_text('{"temperature": 1.0, "thresholds": {"x": 0.5}}')
    done = run("--predict", str(data / "test"), "--checkpoint", str(checkpoint), "--operating-point", "bad.json",
               "--output", "other.csv")
    assert done.returncode == 2 and "bad.json" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "other.csv").exists()
