"""Multi-label classification (docs/multilabel.md): manifests, the asymmetric loss, label-vector mixing, and a real
run on canvases of 1-3 scikit-learn digits (experiments/make_digit_canvases.py) through train, evaluate (thresholds
for precision 0.9 chosen on val) and predict (those thresholds applied to a held-out split)."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from pvt_lightning.cli.main import main
from pvt_lightning.data import ImageFolderDataModule
from pvt_lightning.data.demo import write_image
from pvt_lightning.errors import DataError
from pvt_lightning.training.losses import multilabel_loss
from pvt_lightning.training.module import LabelVectorMix

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))


def _write_manifest(folder: Path, header: list[str], rows: list[list[str]]) -> Path:
    for row in rows:
        write_image(folder / row[0], np.full((16, 16, 3), 100, np.uint8))
    manifest = folder / "manifest.csv"
    with open(manifest, "w", newline="") as handle:
        csv.writer(handle).writerows([header, *rows])
    return manifest


# --- data -------------------------------------------------------------------------------------------------------

def test_labels_column_gives_multi_hot_targets_and_counts_unlabelled(tmp_path):
    rows = [["a.png", "cat|dog", "train"], ["b.png", "", "train"], ["c.png", "dog", "train"],
            ["d.png", "cat", "val"], ["e.png", "dog | cat", "val"]]
    data = ImageFolderDataModule(_write_manifest(tmp_path, ["path", "labels", "split"], rows), img_size=16,
                                 batch_size=4, num_workers=0, index_cache=False)
    assert data.task == "multilabel" and data.class_names == ["cat", "dog"]
    assert data.samples("train").targets.tolist() == [[1, 1], [0, 0], [0, 1]]
    assert data.unlabelled("train") == 1 and data.unlabelled("val") == 0
    _, targets = next(iter(data.val_dataloader()))
    assert targets.dtype == torch.float32 and targets.tolist() == [[1.0, 0.0], [1.0, 1.0]]


def test_binary_class_columns_keep_their_order_and_spelling(tmp_path):
    rows = [["a.png", "1", "0", "1"], ["b.png", "0", "1", "0"], ["c.png", "1", "1", "1"]]
    manifest = _write_manifest(tmp_path, ["path", "Shoe", "red", "Outdoor"], rows)
    data = ImageFolderDataModule(manifest, img_size=16, num_workers=0, val_split=0.34, index_cache=False)
    assert data.task == "multilabel" and data.class_names == ["Shoe", "red", "Outdoor"]
    both = np.concatenate([data.samples("train").targets, data.samples("val").targets])
    assert sorted(map(tuple, both.tolist())) == [(0, 1, 0), (1, 0, 1), (1, 1, 1)]


def test_single_label_manifest_stays_multiclass(tmp_path):
    rows = [["a.png", "cat", "train"], ["b.png", "dog", "train"], ["c.png", "cat", "val"], ["d.png", "dog", "val"]]
    data = ImageFolderDataModule(_write_manifest(tmp_path, ["path", "label", "split"], rows), img_size=16,
                                 num_workers=0, index_cache=False)
    assert data.task == "multiclass" and data.samples("train").targets is None
    assert data.samples("train").labels.tolist() == [0, 1]


def test_folder_with_task_multilabel_is_refused(tmp_path, capsys):
    for split in ("train", "val"):
        for name in ("a", "b"):
            write_image(tmp_path / split / name / "x.png", np.zeros((16, 16, 3), np.uint8))
    with pytest.raises(DataError, match="folders cannot express several labels"):
        ImageFolderDataModule(tmp_path, task="multilabel", num_workers=0, index_cache=False).setup("fit")
    assert main(["train", "--data", str(tmp_path), "--task", "multilabel", "--logdir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "folders cannot express several labels" in err and "use a manifest" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.ckpt"))


@pytest.mark.parametrize("flags,message", [(["--loss", "focal"], "multi-label trains with --loss bce"),
                                           (["--sampler", "balanced"], "several"),
                                           (["--label-smoothing", "0.1"], "--label-smoothing")])
def test_single_label_only_options_are_refused_for_multi_label(tmp_path, capsys, flags, message):
    rows = [["a.png", "cat|dog", "train"], ["b.png", "dog", "train"], ["c.png", "cat", "val"], ["d.png", "dog", "val"]]
    manifest = _write_manifest(tmp_path, ["path", "labels", "split"], rows)
    assert main(["train", "--data", str(manifest), "--logdir", str(tmp_path / "runs"), "--num-workers", "0",
                 *flags]) == 2
    assert message in capsys.readouterr().err


def test_multi_label_loss_on_single_label_data_is_refused(tmp_path, capsys):
    rows = [["a.png", "cat", "train"], ["b.png", "dog", "train"], ["c.png", "cat", "val"], ["d.png", "dog", "val"]]
    manifest = _write_manifest(tmp_path, ["path", "label", "split"], rows)
    assert main(["train", "--data", str(manifest), "--logdir", str(tmp_path / "runs"), "--loss", "asl"]) == 2
    assert "multi-label loss" in capsys.readouterr().err


# --- losses and mixing ------------------------------------------------------------------------------------------

def test_asymmetric_loss_matches_the_papers_formula_by_hand():
    """Ridnik et al. 2021, eq. 2-4: L+ = (1-p)^g+ log p, L- = p_m^g- log(1-p_m), p_m = max(p - m, 0)."""
    logits = torch.tensor([[2.0, -1.0, 0.0], [-3.0, 0.5, 1.5]])
    targets = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    gamma_neg, gamma_pos, clip = 4.0, 1.0, 0.05
    total = 0.0
    for i in range(2):
        for c in range(3):
            p = 1.0 / (1.0 + math.exp(-logits[i, c].item()))
            if targets[i, c] == 1:
                total += -((1.0 - p) ** gamma_pos) * math.log(p)
            else:
                p_m = max(p - clip, 0.0)
                total += -(p_m ** gamma_neg) * math.log(1.0 - p_m)
    expected = total / 2  # summed over classes, mean over images
    got = multilabel_loss(logits, targets, gamma_neg=gamma_neg, gamma_pos=gamma_pos, clip=clip)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # an easy negative (p < m) adds nothing: sigmoid(-3) = 0.047 < 0.05
    easy = multilabel_loss(torch.tensor([[-3.0]]), torch.tensor([[0.0]]), gamma_neg=4.0, clip=0.05)
    assert easy.item() == 0.0


def test_plain_multilabel_loss_is_binary_cross_entropy_with_pos_weight():
    logits, targets = torch.randn(5, 4), (torch.rand(5, 4) > 0.5).float()
    weight = torch.tensor([1.0, 2.0, 0.5, 3.0])
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, pos_weight=weight,
                                                                    reduction="sum") / 5
    assert multilabel_loss(logits, targets, pos_weight=weight).item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("mixup,cutmix", [(0.4, 0.0), (0.0, 1.0)])
def test_mixing_mixes_label_vectors_with_the_images_lambda(mixup, cutmix):
    torch.manual_seed(0)
    images = torch.stack([torch.zeros(3, 8, 8), torch.ones(3, 8, 8)])
    targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    mixed, soft = LabelVectorMix(mixup, cutmix)(images, targets)
    share_of_second = mixed[0].mean().item()  # image 0 is zeros: what it holds came from image 1
    assert soft[0].tolist() == pytest.approx([1 - share_of_second, share_of_second, 1.0], abs=1e-6)


# --- a real run -------------------------------------------------------------------------------------------------

CLASSES = [str(d) for d in range(4)]
COMMON = ["--batch-size", "16", "--num-workers", "0", "--accelerator", "cpu", "--precision", "32"]


@pytest.fixture(scope="module")
def canvas_run(tmp_path_factory):
    """(run folder, data folder) of b0 from scratch on 32x32 canvases of 1-3 of the digits 0-3."""
    from make_digit_canvases import write_digit_canvases

    root = tmp_path_factory.mktemp("canvases")
    manifest = write_digit_canvases(root / "data", {"train": 320, "val": 80, "test": 80}, size=32, classes=4,
                                    grid=2, unlabelled=8)
    args = ["train", "--variant", "b0", "--data", str(manifest), "--img-size", "32", "32", "--crop-pct", "1.0",
            "--epochs", "8", "--lr", "1e-3", "--warmup-epochs", "1", "--drop-path", "0", "--weight-decay", "0.01",
            "--logdir", str(root / "runs"), "--name", "canvases", "--inference-seconds", "0", "--no-progress-bar",
            *COMMON]
    assert main(args) == 0
    return root / "runs" / "canvases" / "version_0", root / "data"


@pytest.mark.slow
def test_training_reaches_a_map_well_above_chance(canvas_run):
    run_dir, data = canvas_run
    summary = json.loads((run_dir / "summary.json").read_text())
    with open(data / "manifest.csv") as handle:
        val = [row["labels"] for row in csv.DictReader(handle) if row["split"] == "val"]
    chance = np.mean([[str(c) in labels.split("|") for c in range(4)] for labels in val])  # AP of random scores
    assert summary["best"]["metric"] == "val/map"
    assert summary["metrics"]["val/map"] > chance + 0.2, (summary["metrics"], chance)
    assert "val/recall@precision0.90" in summary["metrics"]
    assert set(summary["multilabel"]["average_precision"]) == set(CLASSES)


@pytest.mark.slow
def test_report_ap_is_sklearns_and_val_thresholds_hold_on_test(canvas_run, tmp_path):
    run_dir, data = canvas_run
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    manifest = data / "manifest.csv"
    chosen = tmp_path / "eval_val"
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(manifest), "--split", "val",
                 "--target-precision", "0.9", "--output-dir", str(chosen), *COMMON]) == 0
    for name in ("report.json", "per_class.csv", "predictions.csv", "pr_curves.png", "cooccurrence.png",
                 "operating_point.json"):
        assert (chosen / name).is_file(), name
    report = json.loads((chosen / "report.json").read_text())

    # per-class AP of the report = scikit-learn's on the written probabilities
    with open(chosen / "predictions.csv") as handle:
        rows = list(csv.DictReader(handle))
    probs = np.array([[float(row[f"prob_{c}"]) for c in CLASSES] for row in rows])
    truth = np.array([[c in row["true_labels"].split("|") for c in CLASSES] for row in rows])
    with open(chosen / "per_class.csv") as handle:
        per_class = {row["class"]: row for row in csv.DictReader(handle)}
    for k, name in enumerate(CLASSES):
        expected = average_precision_score(truth[:, k], probs[:, k])
        assert report["per_class"][name]["average_precision"] == pytest.approx(expected, abs=1e-6)
        assert float(per_class[name]["average_precision"]) == pytest.approx(expected, abs=1e-5)
    assert report["map"] == pytest.approx(np.mean([average_precision_score(truth[:, k], probs[:, k])
                                                   for k in range(4)]), abs=1e-6)

    # thresholds chosen on val reach precision 0.9 there; predict applies them on the test images
    point = json.loads((chosen / "operating_point.json").read_text())
    assert point["task"] == "multilabel" and point["target"] == {"precision": 0.9}
    reached = {name: t for name, t in point["thresholds"].items() if t is not None}
    assert reached, point
    for name in reached:
        assert report["operating_point"]["per_class"][name]["precision"] >= 0.9
    predictions = tmp_path / "test_predictions.csv"
    assert main(["predict", "--checkpoint", str(checkpoint), "--input", str(data / "test"), "--output",
                 str(predictions), "--operating-point", str(chosen / "operating_point.json"), *COMMON]) == 0
    with open(predictions) as handle:
        predicted = list(csv.DictReader(handle))
    assert list(predicted[0])[:2] == ["path", "labels"] and len(predicted) == 80
    for row in predicted:
        over = {name for name, t in point["thresholds"].items()
                if t is not None and float(row[f"prob_{name}"]) >= t}
        assert set(filter(None, row["labels"].split("|"))) == over

    # the held-out split measured with the val thresholds: precision per class next to the target
    measured = tmp_path / "eval_test"
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(manifest), "--split", "test",
                 "--operating-point", str(chosen / "operating_point.json"), "--output-dir", str(measured),
                 *COMMON]) == 0
    held_out = json.loads((measured / "report.json").read_text())["operating_point"]
    assert held_out["target"] == {"precision": 0.9} and held_out["chosen_on"]["split"] == "val"
    with open(measured / "per_class.csv") as handle:
        table = {row["class"]: row for row in csv.DictReader(handle)}
    for name, threshold in reached.items():
        assert table[name]["precision_at_threshold"] != ""
        assert float(table[name]["threshold"]) == pytest.approx(threshold, abs=1e-6)


def test_export_metadata_carries_the_task_only_when_multi_label():
    from pvt_lightning.export.metadata import ExportMetadata

    multi = ExportMetadata("b0", ("a", "b"), (32, 32), task="multilabel", threshold=0.4)
    back = ExportMetadata.from_strings(multi.to_strings())
    assert (back.task, back.threshold) == ("multilabel", 0.4)
    single = ExportMetadata("b0", ("a", "b"), (32, 32))
    assert "task" not in single.to_strings() and ExportMetadata.from_strings(single.to_strings()).task == "multiclass"


@pytest.mark.slow
def test_serve_returns_every_label_over_its_threshold(canvas_run, tmp_path):
    from pvt_lightning.data.decode import read_image
    from pvt_lightning.serve.api import ClassifierAPI

    run_dir, data = canvas_run
    api = ClassifierAPI(str(run_dir / "checkpoints" / "last.ckpt"))
    api.setup("cpu")
    image = torch.from_numpy(read_image(str(data / "test" / "00001.png"))).permute(2, 0, 1).contiguous()
    response = api.encode_response(api.predict(image))
    assert response["labels"] == [name for name, p in response["probabilities"].items() if p >= 0.5]
    assert all(0 <= p <= 1 for p in response["probabilities"].values())
