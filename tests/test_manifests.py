"""Manifests (CSV / Parquet), classes files and the index cache: real files, real listings, a real training run."""

from __future__ import annotations

import csv
import os
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from conftest import write_jpeg
from pvt_lightning.data import ImageFolderDataModule
from pvt_lightning.data.index import SampleIndex
from pvt_lightning.errors import DataError

CLASSES = ("cat", "dog", "fox")


def datamodule(root, **kwargs) -> ImageFolderDataModule:
    kwargs = {"img_size": (32, 32), "batch_size": 4, "num_workers": 0, **kwargs}
    dm = ImageFolderDataModule(root, **kwargs)
    dm.setup("fit")
    return dm


def write_manifest(file: Path, rows: list[tuple], header=("path", "label")) -> Path:
    with open(file, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return file


def folder_rows(root: Path, split: str) -> list[tuple[str, str]]:
    """The split's images as (path relative to root, class), classes interleaved (the manifest groups them)."""
    per_class = {name: sorted((root / split / name).glob("*.jpg")) for name in sorted(os.listdir(root / split))}
    rows = []
    for k in range(max(len(paths) for paths in per_class.values())):
        for name in reversed(list(per_class)):
            if k < len(per_class[name]):
                rows.append((per_class[name][k].relative_to(root).as_posix(), name))
    return rows


@pytest.fixture
def dataset(make_image_folder, tmp_path) -> Path:
    """root/{train,val}/<class>/ images plus root/train.csv and root/val.csv listing the same files."""
    root = make_image_folder(tmp_path / "data", classes=CLASSES, per_class=4, size=(24, 24))
    for split in ("train", "val"):
        write_manifest(root / f"{split}.csv", folder_rows(root, split))
    return root


# ----------------------------------------------------------------------------------- equivalence


def test_csv_manifest_lists_what_the_folders_hold(dataset):
    folders, manifest = datamodule(dataset), datamodule(dataset / "train.csv")
    assert manifest.class_names == folders.class_names == list(CLASSES)
    assert manifest.split_sizes() == folders.split_sizes() == {"train": 12, "val": 12}
    for split in ("train", "val"):
        assert list(manifest.samples(split)) == list(folders.samples(split))


def test_split_column_and_parquet_give_the_same_index(dataset):
    rows = [(*row, split) for split in ("val", "train") for row in folder_rows(dataset, split)]
    write_manifest(dataset / "all.csv", rows, header=("path", "label", "split"))
    folders = datamodule(dataset)
    by_column = datamodule(dataset / "all.csv")
    assert by_column.split_sizes() == folders.split_sizes()
    assert list(by_column.samples("val")) == list(folders.samples("val"))
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    columns = list(zip(*rows))
    pq.write_table(pa.table({"path": columns[0], "label": columns[1], "split": columns[2]}), dataset / "all.parquet")
    by_parquet = datamodule(dataset / "all.parquet")
    assert list(by_parquet.samples("train")) == list(folders.samples("train"))


def test_absolute_paths_test_sibling_and_batches(dataset):
    rows = [(str((dataset / path).resolve()), label) for path, label in folder_rows(dataset, "val")]
    write_manifest(dataset / "test.csv", rows[:5])
    dm = datamodule(dataset / "train.csv")
    assert dm.split_sizes()["test"] == 5
    images, targets = next(iter(dm.test_dataloader()))
    assert images.shape == (4, 3, 32, 32) and targets.tolist() == [0, 1, 1, 2]  # rows fox, dog, cat, fox, dog: grouped by class


def test_manifest_without_validation_rows_needs_val_split(dataset):
    os.rename(dataset / "train.csv", dataset / "labels.csv")
    with pytest.raises(DataError, match=r"labels\.csv has no validation rows.*--val-split"):
        datamodule(dataset / "labels.csv")
    dm = datamodule(dataset / "labels.csv", val_split=0.25, seed=1)
    assert dm.split_sizes() == {"train": 9, "val": 3}


# ------------------------------------------------------------------------------------- checks


@pytest.mark.parametrize("edit, message", [
    (lambda rows: rows + [("train/cat/missing.jpg", "cat")], r"1 file\(s\) listed in manifest .*train\.csv do not "
                                                             r"exist, e\.g\. .*missing\.jpg \(line 14\); fix the paths"),
    (lambda rows: rows + [("train/cat/000.jpg", "")], r"train\.csv: 1 row\(s\) have no label, e\.g\. line 14"),
    (lambda rows: [row for row in rows if row[1] != "fox"], r"val\.csv \(val\) has label\(s\) that the training rows "
                                                            r"of train\.csv do not: 'fox' \(4 rows\).*--classes"),
])
def test_manifest_mistakes_name_the_file_and_the_fix(dataset, edit, message):
    write_manifest(dataset / "train.csv", edit(folder_rows(dataset, "train")))
    with pytest.raises(DataError, match=message):
        datamodule(dataset / "train.csv")


def test_missing_column_and_class_absent_from_val(dataset):
    write_manifest(dataset / "val.csv", [(p, c) for p, c in folder_rows(dataset, "val") if c != "dog"])
    with pytest.raises(DataError, match=r"val\.csv \(val\) has no rows of class\(es\) 'dog'; every split"):
        datamodule(dataset / "train.csv")
    write_manifest(dataset / "train.csv", [("a.jpg",)], header=("file",))
    with pytest.raises(DataError, match=r"train\.csv has no 'path' column \(columns: file\)"):
        datamodule(dataset / "train.csv")


# ------------------------------------------------------------------------------------ classes file


def test_classes_file_orders_and_subsets_folders_and_manifests_alike(dataset, tmp_path):
    (tmp_path / "classes.txt").write_text("# order of the head\nfox\n\ncat\n")
    for source in (dataset, dataset / "train.csv"):
        dm = datamodule(source, classes=tmp_path / "classes.txt")
        assert dm.class_names == ["fox", "cat"]
        assert dm.split_sizes() == {"train": 8, "val": 8}
        assert dm.skipped_classes() == {"dog": 8}  # 4 train + 4 val images counted, never relabelled
        train = list(dm.samples("train"))
        assert {Path(p).parent.name for p, label in train if label == 0} == {"fox"}
        assert all(Path(p).parent.name != "dog" for p, _ in train)


def test_classes_file_mistakes(dataset, tmp_path):
    classes = tmp_path / "classes.txt"
    classes.write_text("cat\nwolf\n")
    with pytest.raises(DataError, match=r"class\(es\) wolf of the classes file have no folder in .*train"):
        datamodule(dataset, classes=classes)
    with pytest.raises(DataError, match=r"train\.csv \(train\) has no rows of class\(es\) 'wolf'"):
        datamodule(dataset / "train.csv", classes=classes)
    classes.write_text("cat\ncat\n")
    with pytest.raises(DataError, match=r"names 'cat' more than once"):
        datamodule(dataset, classes=classes)
    with pytest.raises(DataError, match=r"classes file .*nope\.txt does not exist"):
        datamodule(dataset, classes=tmp_path / "nope.txt")


# ------------------------------------------------------------------------------------- index cache


def test_index_is_arrays_cached_reused_and_renewed_when_data_changes(dataset, tmp_path):
    cache = tmp_path / "cache"
    first = datamodule(dataset, index_cache=cache)
    assert not first.index_reused and first.index_file.parent == cache and first.index_file.is_file()
    samples = first.samples("train")
    assert isinstance(samples, SampleIndex) and samples.labels.dtype == np.int32 and samples.blob.dtype == np.uint8
    second = datamodule(dataset, index_cache=cache)
    assert second.index_reused and list(second.samples("train")) == list(samples)
    time.sleep(0.01)  # a new mtime tick
    write_jpeg(dataset / "train" / "dog" / "nested" / "new.jpg", np.zeros((24, 24, 3), np.uint8))
    third = datamodule(dataset, index_cache=cache)
    assert not third.index_reused and third.split_sizes()["train"] == 13
    assert datamodule(dataset, index_cache=cache).index_reused
    other_seed = datamodule(dataset, index_cache=cache, val_split=0.5, seed=3)  # options are part of the key
    assert other_seed.index_file != third.index_file
    manifest = datamodule(dataset / "train.csv", index_cache=cache)
    time.sleep(0.01)
    write_manifest(dataset / "val.csv", folder_rows(dataset, "val")[:-1])
    renewed = datamodule(dataset / "train.csv", index_cache=cache)
    assert not renewed.index_reused and renewed.split_sizes()["val"] == manifest.split_sizes()["val"] - 1
    assert not datamodule(dataset, index_cache=False).index_reused


# ------------------------------------------------------------------------- the real training run


class TinyClassifier(L.LightningModule):
    """A linear layer on 4x4-pooled pixels: a real model and loss, fast enough for the fast tier."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.head = torch.nn.Linear(3 * 16, num_classes)
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        images, targets = batch
        loss = torch.nn.functional.cross_entropy(self.head(torch.nn.functional.adaptive_avg_pool2d(images, 4)
                                                           .flatten(1)), targets)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_manifest_and_folder_give_the_same_first_epoch_losses(dataset):
    losses = {}
    for name, source in (("folder", dataset), ("manifest", dataset / "train.csv")):
        L.seed_everything(5, verbose=False)
        dm = ImageFolderDataModule(source, img_size=(32, 32), batch_size=4, num_workers=0, seed=5)
        module = TinyClassifier(3)
        trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
        trainer.fit(module, datamodule=dm)
        losses[name] = module.losses
    assert len(losses["folder"]) == 3 and losses["manifest"] == losses["folder"]


@pytest.mark.slow
def test_manifest_and_folder_training_runs_match(dataset, tmp_path):
    """Through the CLI, with --classes: the same class list, class counts and first-epoch training loss."""
    import json

    from pvt_lightning.cli.config import parse_args
    from pvt_lightning.cli.options import TrainConfig
    from pvt_lightning.cli.train import train

    (tmp_path / "classes.txt").write_text("fox\ncat\ndog\n")
    results = {}
    for name, data in (("folder", dataset), ("manifest", dataset / "train.csv")):
        config = parse_args(TrainConfig, ["--data", str(data), "--classes", str(tmp_path / "classes.txt"), "--variant", "b0",
                               "--img-size", "32", "32", "--batch-size", "4", "--num-workers", "0", "--epochs", "1",
                               "--precision", "32", "--accelerator", "cpu", "--logger", "csv", "--logdir",
                               str(tmp_path / "runs"), "--name", name, "--checkpoint-every-minutes", "0"])
        assert train(config) == 0
        run = tmp_path / "runs" / name / "version_0"
        summary = json.loads((run / "summary.json").read_text())
        with open(run / "metrics.csv") as handle:
            losses = [float(row["train/loss"]) for row in csv.DictReader(handle) if row.get("train/loss")]
        results[name] = (summary["class_names"], summary["class_counts"], losses)
    assert results["manifest"] == results["folder"]
    assert results["folder"][0] == ["fox", "cat", "dog"] and len(results["folder"][2]) == 1
    assert results["folder"][1]["train"] == {"fox": 4, "cat": 4, "dog": 4}
