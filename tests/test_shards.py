"""Shards: `pvt-lightning shards` writes LitData chunks that --data DIR reads back as the same dataset
(classes, splits, pixels, bad-image handling), and a resume through them is exact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("litdata")

from pvt_lightning.cli.main import main  # noqa: E402
from pvt_lightning.data import ImageFolderDataModule  # noqa: E402
from pvt_lightning.errors import DataError  # noqa: E402
from resume_worker import make_id_dataset, run_phase, seen  # noqa: E402

CLASSES = ("cat", "dog", "fox")


def datamodule(root, **kwargs) -> ImageFolderDataModule:
    kwargs = {"img_size": (32, 32), "batch_size": 4, "num_workers": 0, "seed": 3, **kwargs}
    dm = ImageFolderDataModule(root, **kwargs)
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A 3-class folder dataset with one corrupt JPEG in train/dog, and its shards."""
    from conftest import make_image_folder

    root = tmp_path_factory.mktemp("shards")
    data = make_image_folder(root / "data", classes=CLASSES, per_class=4, size=(40, 40))
    (data / "train" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    assert main(["shards", "--data", str(data), "--output", str(root / "shards")]) == 0
    return data, root / "shards"


def test_shards_hold_the_same_dataset(converted):
    data, shards = converted
    info = json.loads((shards / "pvt_shards.json").read_text())
    assert info["splits"] == {"train": 13, "val": 12} and (shards / "classes.txt").read_text() == "cat\ndog\nfox\n"
    folder, sharded = datamodule(data), datamodule(shards)
    assert sharded.class_names == folder.class_names and sharded.split_sizes() == folder.split_sizes()
    assert list(sharded.samples("val")) == list(folder.samples("val"))  # original paths kept for reports
    for name in ("val_dataloader", "train_dataloader"):  # same decoding, same seeded augmentation
        expected, got = next(iter(getattr(folder, name)())), next(iter(getattr(sharded, name)()))
        assert torch.equal(expected[0], got[0]) and torch.equal(expected[1], got[1])
    images, paths = next(iter(datamodule(shards, predict_split="val").predict_dataloader()))
    assert images.shape == (4, 3, 32, 32) and list(paths) == [p for p, _ in folder.samples("val")][:4]


def test_bad_images_in_shards_are_skipped_and_counted(converted):
    _, shards = converted
    dm = datamodule(shards, num_workers=2)
    batches = list(dm.train_dataloader())
    assert all(images.shape[0] == 4 for images, _ in batches)  # training batches keep their size
    assert [Path(p).name for p in dm.bad_image_paths()] == ["broken.jpg"]
    with pytest.raises(DataError, match=r"cannot decode image .*broken\.jpg"):
        list(datamodule(shards, bad_images="error").train_dataloader())


def test_shards_keep_their_classes_and_refuse_to_overwrite(converted, tmp_path, capsys):
    data, shards = converted
    (tmp_path / "classes.txt").write_text("fox\ncat\n")
    with pytest.raises(DataError, match="holds the classes cat, dog, fox, not fox, cat"):
        datamodule(shards, classes=tmp_path / "classes.txt")
    assert main(["shards", "--data", str(data), "--output", str(shards)]) == 2
    assert "is not empty" in capsys.readouterr().err
    subset = tmp_path / "subset"
    assert main(["shards", "--data", str(data), "--output", str(subset), "--classes", str(tmp_path / "classes.txt")]) == 0
    dm = datamodule(subset)
    assert dm.class_names == ["fox", "cat"] and dm.skipped_classes() == {"dog": 9}


def test_resume_mid_epoch_through_shards_is_exact(tmp_path):
    """LitData's own loader state is not what resumes (Lightning-AI/litData#775): the data module's is."""
    data = make_id_dataset(tmp_path / "data")
    assert main(["shards", "--data", str(data / "train.csv"), "--output", str(tmp_path / "shards")]) == 0
    shards = tmp_path / "shards"
    run_phase(shards, tmp_path / "full", epochs=2, workers=2)
    last = run_phase(shards, tmp_path / "runs" / "a", epochs=2, max_steps=15, checkpoint_every=15, workers=2)
    run_phase(shards, tmp_path / "runs" / "b", epochs=2, resume=last, workers=2)
    resumed = seen(tmp_path / "runs")
    assert resumed == seen(tmp_path / "full")
    assert all(sorted(ids) == list(range(48)) for ids in resumed.values())


def test_shards_command_needs_data_and_output(capsys, tmp_path):
    assert main(["shards", "--data", str(tmp_path)]) == 2
    assert "needs --data SOURCE and --output DIR" in capsys.readouterr().err
    assert main(["shards", "--data", str(tmp_path / "somewhere"), "--output", str(tmp_path / "out")]) == 2
    assert "--data" in capsys.readouterr().err and not (tmp_path / "out").exists()
