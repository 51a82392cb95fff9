"""Hostile and careless inputs (issue 13): each case is made for real on disk and must end in a skip that is
counted, or one clear error naming the file, never a traceback, a hang or a silent wrong result."""

from __future__ import annotations

import gc
import io
import json
import logging
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import error_from, make_image_folder, write_jpeg
from pvt_lightning.runs.checkpoint_io import AtomicCheckpointIO, atomic_torch_save
from pvt_lightning.errors import CheckpointSaveError
from pvt_lightning.data import ImageFolderDataModule, read_image
from pvt_lightning.errors import BadImageError, DataError
from pvt_lightning.data.decode import DEFAULT_MAX_IMAGE_PIXELS, image_size
from pvt_lightning.errors import PATH_ERRORS
from pvt_lightning.models import create_model
from pvt_lightning.errors import CheckpointError
from pvt_lightning.runs.checkpoint_info import (SAFETENSORS, STATE_DICT, TRAINING, check_resume_compatible,
                                                inspect_checkpoint)

ROOT = Path(__file__).resolve().parents[1]
CORRUPT = b"\xff\xd8\xff\xe0 a JPEG cut short"


def datamodule(root, **kwargs) -> ImageFolderDataModule:
    kwargs = {"img_size": (32, 32), "batch_size": 3, "num_workers": 0, **kwargs}
    dm = ImageFolderDataModule(root, **kwargs)
    dm.setup("fit")
    return dm


def quiet_trainer(**kwargs) -> L.Trainer:
    kwargs = {"max_epochs": 1, "accelerator": "cpu", "logger": False, "enable_checkpointing": False,
              "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0, **kwargs}
    return L.Trainer(**kwargs)


def classifier(class_names, variant="b0"):
    from pvt_lightning.training.module import ImageClassifier

    return ImageClassifier(variant, num_classes=len(class_names), class_names=list(class_names), img_size=(32, 32),
                           warmup_epochs=0)


# --- case 2: a batch may shrink or vanish ------------------------------------------------------------------

def data_with_a_lone_bad_file_in_the_last_batch(root: Path, splits=("val",)) -> list[Path]:
    """Per split: a/000-001 and b/000 readable, b/zz_bad.jpg corrupt: with batch size 3 the last batch is it alone."""
    make_image_folder(root, per_class=4)  # train: 4 + 4 readable images
    bad = []
    for split in splits:
        folder = root / split
        shutil.rmtree(folder, ignore_errors=True)
        for name, count in (("a", 2), ("b", 1)):
            for n in range(count):
                write_jpeg(folder / name / f"{n:03d}.jpg", np.full((40, 40, 3), 60 + 120 * (name == "b"), np.uint8))
        bad.append(folder / "b" / "zz_bad.jpg")
        bad[-1].write_bytes(CORRUPT)
    return bad


def test_a_last_validation_and_test_batch_of_only_unreadable_files_is_skipped(tmp_path):
    from pvt_lightning.training.callbacks import default_callbacks

    bad = data_with_a_lone_bad_file_in_the_last_batch(tmp_path / "d", splits=("val", "test"))
    dm = datamodule(tmp_path / "d")
    assert list(dm.val_dataloader())[-1] is None  # the whole batch was unreadable
    trainer = quiet_trainer(limit_train_batches=1, callbacks=default_callbacks(["a", "b"]))
    module = classifier(["a", "b"])
    trainer.fit(module, datamodule=dm)  # was: RuntimeError: cannot reshape tensor of 0 elements
    assert "val/acc" in trainer.callback_metrics
    validated = trainer.validate(module, datamodule=dm, verbose=False)[0]
    tested = trainer.test(module, datamodule=dm, verbose=False)[0]
    assert 0.0 <= validated["val/acc"] <= 1.0 and 0.0 <= tested["test/acc"] <= 1.0
    assert dm.bad_image_paths() == sorted(str(p) for p in bad)
    assert dm.bad_images_report().startswith("skipped 2 unreadable image(s)")


def test_prediction_skips_a_batch_of_only_unreadable_files(tmp_path):
    for n in range(2):
        write_jpeg(tmp_path / "pics" / f"{n}.jpg", np.full((40, 40, 3), 90, np.uint8))
    (tmp_path / "pics" / "z_bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    dm = ImageFolderDataModule.for_prediction(tmp_path / "pics", img_size=(32, 32), batch_size=2, num_workers=0)
    predictions = quiet_trainer().predict(classifier(["a", "b", "c"]), datamodule=dm)
    assert [p.shape for p in predictions[:1]] == [(2, 3)] and predictions[1:] == [None]
    assert dm.bad_image_paths() == [str(tmp_path / "pics" / "z_bad.png")]


def test_a_class_whose_every_training_image_is_unreadable_is_a_data_error_naming_it(tmp_path):
    """Found at run time (no verify_images): training used to replace the files silently, val/acc 0 for it."""
    root = make_image_folder(tmp_path / "d", classes=("cat", "dog", "fox"), per_class=3)
    for path in (root / "train" / "dog").iterdir():
        path.write_bytes(b"")  # all three emptied
    dm = datamodule(root, num_workers=2)  # two worker processes share what they find
    message = str(error_from(dm.train_dataloader(), DataError))
    assert "all 3 images of class 'dog' in the train split" in message and str(root / "train" / "dog") in message
    assert "Traceback" not in message


def test_a_validation_class_or_a_prediction_folder_left_without_images_is_a_data_error(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=2)
    for path in (root / "val" / "b").iterdir():
        path.write_bytes(CORRUPT)
    with pytest.raises(DataError, match=r"all 2 images of class 'b' in the val split .*val/b"):
        list(datamodule(root).val_dataloader())
    with pytest.raises(DataError, match=r"all 2 images under .*val/b are unreadable"):
        dm = ImageFolderDataModule.for_prediction(root / "val" / "b", img_size=(32, 32), num_workers=0)
        list(dm.predict_dataloader())


def test_the_list_of_bad_images_named_by_an_error_outlives_the_data_module(tmp_path):
    """'every training image is bad' used to point to a temporary file deleted at exit."""
    root = make_image_folder(tmp_path / "d", per_class=2)
    for path in (root / "train").rglob("*.jpg"):
        path.write_bytes(CORRUPT)
    kept = tmp_path / "run" / "bad_images.txt"
    dm = datamodule(root, bad_images_file=kept)
    with pytest.raises(DataError) as error:
        list(dm.train_dataloader())
    assert str(kept) in str(error.value)
    del dm
    gc.collect()
    listed = kept.read_text(encoding="utf-8").splitlines()
    assert 2 <= len(listed) <= 4 and all(Path(p).parent.parent == root / "train" for p in listed)


def test_without_a_kept_file_errors_list_the_bad_images_themselves(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=2)
    for path in (root / "val" / "a").iterdir():
        path.write_bytes(b"")
    with pytest.raises(DataError) as error:
        list(datamodule(root).val_dataloader())
    assert "they are " in str(error.value) and str(root / "val" / "a" / "000.jpg") in str(error.value)
    assert "pvt_lightning_bad_images_" not in str(error.value)  # no temporary path that will vanish


def test_a_bad_images_file_that_cannot_be_written_is_one_data_error(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=2)
    (root / "val" / "a" / "000.jpg").write_bytes(b"")
    (tmp_path / "run").write_text("a file where the run folder should be")
    with pytest.raises(DataError, match=r"cannot record the unreadable image .*000\.jpg in .*run/bad_images\.txt"):
        list(datamodule(root, bad_images_file=tmp_path / "run" / "bad_images.txt").val_dataloader())


# --- case 4: symlinks --------------------------------------------------------------------------------------

def test_a_symlink_loop_in_a_class_folder_is_followed_once_with_a_warning(tmp_path, caplog):
    root = make_image_folder(tmp_path / "d", per_class=3)
    (root / "train" / "a" / "nested").mkdir()
    write_jpeg(root / "train" / "a" / "nested" / "deep.jpg", np.zeros((20, 20, 3), np.uint8))
    os.symlink("..", root / "train" / "a" / "nested" / "back")  # a/nested/back -> a: a loop
    os.symlink(".", root / "train" / "b" / "self")
    with caplog.at_level(logging.WARNING, logger="pvt_lightning.data"):
        dm = datamodule(root)
    assert dm.split_sizes() == {"train": 3 + 1 + 3, "val": 6}  # was 41x as many
    loops = [r.getMessage() for r in caplog.records if "symlink loop" in r.getMessage()]
    assert len(loops) == 2 and any(str(root / "train" / "a" / "nested" / "back") in m for m in loops)
    with caplog.at_level(logging.WARNING, logger="pvt_lightning.data"):
        predict = ImageFolderDataModule.for_prediction(root / "train", num_workers=0)
        predict.setup("predict")
        paths = [p for _, batch_paths in predict.predict_dataloader() for p in batch_paths]
    assert len(paths) == len(set(map(os.path.realpath, paths))) == 7


def test_two_symlinks_to_one_real_folder_list_its_images_once(tmp_path, caplog):
    root = make_image_folder(tmp_path / "d", per_class=2)
    shared = tmp_path / "elsewhere"
    for n in range(3):
        write_jpeg(shared / f"{n}.jpg", np.zeros((20, 20, 3), np.uint8))
    os.symlink(shared, root / "train" / "a" / "first")
    os.symlink(shared, root / "train" / "a" / "second")
    with caplog.at_level(logging.WARNING, logger="pvt_lightning.data"):
        dm = datamodule(root)
    assert dm.split_sizes()["train"] == 2 + 3 + 2
    assert any("already scanned" in r.getMessage() and "second" in r.getMessage() for r in caplog.records)


# --- case 5: decompression bombs ---------------------------------------------------------------------------

def png_bomb(path: Path, side: int = 30000, rows_per_block: int = 500) -> Path:
    """A valid 8-bit grayscale PNG of side x side black pixels, ~0.9 MB on disk.

    Deflate blocks closed with a full flush do not refer back, so one compressed block of
    ``rows_per_block`` zero rows repeats to make the whole stream (zlib's Adler-32 of n zero bytes is
    ((n mod 65521) << 16) | 1).
    """
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw_size = side * (side + 1)  # each row: filter byte 0, then the pixels
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = deflate.compress(bytes(rows_per_block * (side + 1))) + deflate.flush(zlib.Z_FULL_FLUSH)
    stream = (b"\x78\xda" + block * (side // rows_per_block) + deflate.flush(zlib.Z_FINISH)
              + ((raw_size % 65521) << 16 | 1).to_bytes(4, "big"))
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", stream) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    return png_bomb(tmp_path_factory.mktemp("bomb") / "bomb.png")


def test_the_png_bomb_is_real(bomb):
    assert bomb.stat().st_size < 1_000_000
    with pytest.raises(Image.DecompressionBombError, match="900000000 pixels"):  # Pillow reads the same header
        Image.open(bomb)


def test_a_decompression_bomb_is_refused_from_its_header(bomb, tmp_path):
    with pytest.raises(BadImageError, match=r"30000x30000 = 900 MP, over the pixel budget of 179 MP"):
        read_image(bomb)
    root = make_image_folder(tmp_path / "d", per_class=2)
    shutil.copy(bomb, root / "val" / "a" / "bomb.png")
    dm = datamodule(root)
    assert sum(len(targets) for _, targets in dm.val_dataloader()) == 4  # the 2 + 2 real images
    assert dm.bad_image_paths() == [str(root / "val" / "a" / "bomb.png")]  # skipped and counted
    with pytest.raises(DataError, match=r"cannot decode image .*bomb\.png: declares 30000x30000"):
        list(datamodule(root, bad_images="error").val_dataloader())


def test_the_pixel_budget_is_a_data_module_argument(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=2, size=(40, 40))  # 1600 pixels each
    for name in ("a", "b"):
        write_jpeg(root / "val" / name / "small.jpg", np.zeros((30, 30, 3), np.uint8))  # 900 pixels
    dm = datamodule(root, max_image_pixels=1000, batch_size=8)
    assert len(next(iter(dm.val_dataloader()))[1]) == 2  # only the 30x30 images are within the budget
    assert len(dm.bad_image_paths()) == 4
    with pytest.raises(DataError, match=r"declares 40x40 = 1,600 pixels, over the pixel budget of 1,000 pixels"):
        list(datamodule(root, max_image_pixels=1000, bad_images="error").val_dataloader())
    with pytest.raises(ValueError, match="max_image_pixels"):
        ImageFolderDataModule(root, max_image_pixels=-1)
    assert DEFAULT_MAX_IMAGE_PIXELS > 100_000_000


@pytest.mark.parametrize("fmt,options", [("JPEG", {}), ("JPEG", {"progressive": True}), ("PNG", {}), ("GIF", {}),
                                         ("BMP", {}), ("WEBP", {"lossless": True}), ("WEBP", {"quality": 80}),
                                         ("TIFF", {}), ("TIFF", {"compression": "tiff_lzw"}), ("PPM", {})])
def test_header_sizes_match_what_pillow_reads(fmt, options):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (37, 53, 3), dtype=np.uint8))
    if fmt == "TIFF":
        image = image.convert("L")
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    width, height = Image.open(io.BytesIO(buffer.getvalue())).size
    assert image_size(buffer.getvalue()) == (height, width) == (37, 53)


def test_a_file_too_big_for_any_image_within_the_budget_is_not_read(tmp_path):
    huge = tmp_path / "video.jpg"
    write_jpeg(huge, np.zeros((8, 8, 3), np.uint8))
    with open(huge, "r+b") as f:
        f.truncate(200 * 2**20)  # sparse: 200 MiB that take no space
    with pytest.raises(BadImageError, match="larger than any image within the pixel budget"):
        read_image(huge, max_pixels=1000)


# --- case 6: file names that are not UTF-8 -----------------------------------------------------------------

def test_file_names_that_are_not_utf8_are_scanned_reported_and_listed_exactly(tmp_path, caplog):
    root = make_image_folder(tmp_path / "d", per_class=2)
    odd = os.fsencode(root / "train" / "a") + b"/caf\xe9 \xff.jpg"
    write_jpeg(Path(os.fsdecode(odd)), np.zeros((40, 40, 3), np.uint8))
    bad = os.fsencode(root / "val" / "b") + b"/bad\xe9.jpg"
    with open(bad, "wb") as f:
        f.write(CORRUPT)
    kept = tmp_path / "bad_images.txt"
    with caplog.at_level(logging.WARNING, logger="pvt_lightning.data"):
        dm = datamodule(root, bad_images_file=kept, batch_size=8)
        assert os.fsdecode(odd) in [p for p, _ in dm.samples("train")]
        assert len(next(iter(dm.train_dataloader()))[1]) == 5
        list(dm.val_dataloader())
    assert dm.bad_image_paths() == [os.fsdecode(bad)]
    assert kept.read_bytes() == bad + b"\n"  # the exact bytes of the name
    warning = next(r.getMessage() for r in caplog.records if "bad" in r.getMessage() and "skipping" in r.getMessage())
    assert "bad\\xe9.jpg" in warning  # readable text, no UnicodeEncodeError in a log handler
    warning.encode("utf-8")
    with open(kept, encoding="utf-8", errors=PATH_ERRORS) as f:
        assert os.path.exists(f.read().strip())  # read back as the docs say, the name opens the file
    predict = ImageFolderDataModule.for_prediction(root / "train" / "a", img_size=(32, 32), num_workers=0)
    predict.setup("predict")
    assert os.fsdecode(odd) in [p for _, paths in predict.predict_dataloader() for p in paths]


def test_errors_about_undecodable_names_print_as_text(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=1)
    for path in (root / "val" / "b").iterdir():
        path.unlink()
    with open(os.fsencode(root / "val" / "b") + b"/\xff.png", "wb") as f:
        f.write(b"")
    with pytest.raises(DataError) as error:
        list(datamodule(root, bad_images="error").val_dataloader())
    assert "\\xff.png" in str(error.value)
    str(error.value).encode("utf-8")


# --- case 9: animated GIFs, FIFOs and other non-files ------------------------------------------------------

def animated_gif(path: Path, colours=((250, 0, 0), (0, 0, 250))) -> Path:
    frames = [Image.fromarray(np.full((24, 32, 3), c, np.uint8)) for c in colours]
    path.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(path, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return path


def test_animated_gifs_are_used_by_their_first_frame_with_one_warning(tmp_path, caplog, monkeypatch):
    import pvt_lightning.data.decode as decode

    monkeypatch.setattr(decode, "_warned_animated", False)
    root = make_image_folder(tmp_path / "d", per_class=2)
    first = animated_gif(root / "train" / "a" / "anim1.gif")
    animated_gif(root / "train" / "a" / "anim2.gif")
    with caplog.at_level(logging.WARNING, logger="pvt_lightning.data"):
        dm = datamodule(root)
        assert dm.split_sizes()["train"] == 6  # GIFs are images now, not ignored without a word
        rgb = read_image(first)
        read_image(root / "train" / "a" / "anim2.gif")
    assert rgb.shape == (24, 32, 3) and tuple(rgb[5, 5]) == pytest.approx((250, 0, 0), abs=8)  # the first frame
    warnings = [r.getMessage() for r in caplog.records if "animated" in r.getMessage()]
    assert len(warnings) == 1 and "anim1.gif" in warnings[0] and "first frame" in warnings[0]


def run_with_deadline(function, seconds: float = 30.0):
    """Run ``function`` in a thread; fail instead of hanging the test run if it blocks."""
    result = {}

    def target():
        try:
            result["value"] = function()
        except BaseException as err:  # noqa: BLE001 - handed to the test
            result["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "it hangs"
    if "error" in result:
        raise result["error"]
    return result.get("value")


def test_a_fifo_or_device_named_like_an_image_is_skipped_without_hanging(tmp_path):
    pics = tmp_path / "pics"
    write_jpeg(pics / "real.jpg", np.zeros((40, 40, 3), np.uint8))
    os.mkfifo(pics / "pipe.jpg")  # opening it for reading would wait for a writer forever
    os.symlink("/dev/zero", pics / "zeros.png")  # reading it would never end
    os.symlink(tmp_path / "gone.jpg", pics / "dangling.jpg")
    with pytest.raises(BadImageError, match="not a regular file \\(a FIFO\\)"):
        run_with_deadline(lambda: read_image(pics / "pipe.jpg"))
    with pytest.raises(BadImageError, match="a character device"):
        run_with_deadline(lambda: read_image(pics / "zeros.png"))
    dm = ImageFolderDataModule.for_prediction(pics, img_size=(32, 32), num_workers=0)
    dm.setup("predict")
    paths = run_with_deadline(lambda: [p for batch in dm.predict_dataloader() if batch for p in batch[1]])
    assert paths == [str(pics / "real.jpg")]
    assert dm.bad_image_paths() == sorted(str(pics / n) for n in ("dangling.jpg", "pipe.jpg", "zeros.png"))


# --- case 7: the wrong kind of checkpoint ------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A real training checkpoint: b0 at 32x32 on classes (a, b), one optimizer step."""
    root = tmp_path_factory.mktemp("ckpt")
    dm = datamodule(make_image_folder(root / "data", per_class=2))
    trainer = quiet_trainer(limit_train_batches=1, limit_val_batches=0, default_root_dir=root,
                            plugins=[AtomicCheckpointIO()])
    trainer.fit(classifier(["a", "b"]), datamodule=dm)
    trainer.save_checkpoint(root / "last.ckpt")
    return root / "last.ckpt"


def test_a_training_checkpoint_is_recognised_and_resumable_by_the_same_run(trained):
    info = inspect_checkpoint(trained)
    assert (info.kind, info.variant, info.img_size, info.class_names) == (TRAINING, "b0", (32, 32), ("a", "b"))
    assert info.global_step == 1
    check_resume_compatible(info, "pvt_v2_b0", [32, 32], ["a", "b"])  # same run: no error


@pytest.mark.parametrize("variant,img_size,classes,expected", [
    ("b1", (32, 32), ["a", "b"], r"it is a b0 checkpoint and this run builds b1. Run with --variant b0"),
    ("b0", (64, 48), ["a", "b"], r"input size 32x32 \(this run: 64x48\).*--pretrained"),
    ("b0", (32, 32), ["a", "c"], r"classes \[a, b\] \(this run: \[a, c\]\).*--pretrained"),  # was: silent
    ("b0", (32, 32), ["a", "b", "c"], r"classes .*--pretrained .*head is re-initialised"),
])
def test_resume_refuses_another_model_size_or_class_list(trained, variant, img_size, classes, expected):
    with pytest.raises(CheckpointError, match=expected) as error:
        check_resume_compatible(inspect_checkpoint(trained), variant, img_size, classes)
    assert str(trained) in str(error.value)


def test_plain_weights_are_recognised_and_refused_for_resume_with_the_pretrained_hint(trained, tmp_path):
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    files = {}
    torch.save(create_model("b0", num_classes=2).state_dict(), files.setdefault("ours", tmp_path / "ours.pth"))
    torch.save(timm.create_model("pvt_v2_b0", pretrained=False).state_dict(), files.setdefault("timm", tmp_path / "t.pth"))
    save_file(create_model("b0", num_classes=2).state_dict(), files.setdefault("st", tmp_path / "w.safetensors"))
    expected = {"ours": (STATE_DICT, "ours"), "timm": (STATE_DICT, "timm"), "st": (SAFETENSORS, "ours")}
    for name, path in files.items():
        info = inspect_checkpoint(path)
        assert (info.kind, info.layout) == expected[name]
        with pytest.raises(CheckpointError, match=rf"cannot --resume .*{path.name}: it is a .*pass --pretrained"):
            check_resume_compatible(info, "b0", (32, 32), ["a", "b"])
    # what a Trainer does with --resume: the checkpoint IO refuses the file before Lightning reads it
    dm = datamodule(trained.parent / "data")
    with pytest.raises(CheckpointError, match="no training state"):
        quiet_trainer(plugins=[AtomicCheckpointIO()]).fit(classifier(["a", "b"]), datamodule=dm,
                                                         ckpt_path=files["ours"])


def test_files_that_are_not_checkpoints_or_are_broken_each_get_their_own_message(trained, tmp_path):
    from safetensors.torch import save_file

    cases = {}
    torch.save([1, 2, 3], cases.setdefault("list.pt", tmp_path / "list.pt"))
    (tmp_path / "notes.ckpt").write_text("hello, this is not a checkpoint\n")
    cases["notes.ckpt"] = tmp_path / "notes.ckpt"
    (tmp_path / "empty.pth").write_bytes(b"")
    cases["empty.pth"] = tmp_path / "empty.pth"
    (tmp_path / "cut.ckpt").write_bytes(trained.read_bytes()[:5000])
    cases["cut.ckpt"] = tmp_path / "cut.ckpt"
    save_file({"w": torch.zeros(1000)}, tmp_path / "full.safetensors")
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "full.safetensors").read_bytes()[:-100])
    cases["cut.safetensors"] = tmp_path / "cut.safetensors"
    torch.save({"lr": 0.1, "epochs": 3}, cases.setdefault("config.pt", tmp_path / "config.pt"))
    cases["folder"] = tmp_path
    expected = {
        "list.pt": "is not a checkpoint: it holds a list",
        "notes.ckpt": "is not a checkpoint: it is a text file starting 'hello, this is not a checkpoint'",
        "empty.pth": "is empty (0 bytes)",
        "cut.ckpt": "corrupt or truncated",
        "cut.safetensors": "corrupt or truncated safetensors file",
        "config.pt": "holds no weights",
        "folder": "is a folder",
    }
    for name, path in cases.items():
        with pytest.raises(CheckpointError) as error:
            inspect_checkpoint(path)
        assert expected[name] in str(error.value) and str(path) in str(error.value), str(error.value)


def test_pretrained_from_a_corrupt_safetensors_file_is_one_clear_error(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file(create_model("b0").state_dict(), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: it is a corrupt or truncated safetensors file"):
        create_model("b0", pretrained=path)


# --- case 8: a full or read-only disk ----------------------------------------------------------------------

def test_a_save_beyond_the_file_size_limit_names_the_path_and_free_space_and_keeps_the_last_checkpoint(tmp_path):
    """A real failed write without filling the disk: RLIMIT_FSIZE makes the kernel refuse bytes past 1 MB (EFBIG)."""
    path = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1, "w": torch.ones(10)}, path)
    before = path.read_bytes()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel's signal ends the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, hard))
    try:
        with pytest.raises(CheckpointSaveError) as error:
            AtomicCheckpointIO().save_checkpoint({"step": 2, "w": torch.zeros(1_000_000)}, path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous_handler)
    message = str(error.value)
    assert message.startswith(f"cannot write {path}: the file would exceed the file-size limit")
    assert "free of" in message and "the previous last.ckpt there is kept" in message
    assert path.read_bytes() == before and [p.name for p in path.parent.iterdir()] == ["last.ckpt"]
    assert isinstance(error.value, CheckpointError)  # exit status 2 at the top level


def test_a_file_where_the_checkpoint_folder_should_be_is_one_message(tmp_path):
    (tmp_path / "checkpoints").write_text("a file, not a folder")
    with pytest.raises(CheckpointSaveError, match=r"cannot write .*last\.ckpt: a file stands where a folder"):
        atomic_torch_save({"w": torch.ones(2)}, tmp_path / "checkpoints" / "last.ckpt")


def mount_namespace_available() -> bool:
    if not sys.platform.startswith("linux") or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt 2>/dev/null"],
                           capture_output=True)
    return probe.returncode == 0


needs_mounts = pytest.mark.skipif(not mount_namespace_available(),
                                  reason="needs `unshare -m` and tmpfs mounts (root or user namespaces)")


@pytest.mark.slow
@needs_mounts
@pytest.mark.parametrize("mount_options,reason", [("size=256k", "the disk is full"),
                                                  ("ro,size=256k", "the file system is read-only")])
def test_a_real_full_or_read_only_disk_gives_one_message(tmp_path, mount_options, reason):
    """A private mount namespace with a tiny (or read-only) tmpfs: the real ENOSPC / EROFS, nothing else touched."""
    target = tmp_path / "disk"
    target.mkdir()
    code = ("import sys, torch\n"
            "from pvt_lightning.runs.checkpoint_io import CheckpointSaveError, atomic_torch_save\n"
            "path = sys.argv[1]\n"
            "try:\n"
            "    atomic_torch_save({'step': 1}, path)  # fits on the tiny disk\n"
            "except CheckpointSaveError as err:\n"
            "    print('first save:', err)\n"
            "try:\n"
            "    atomic_torch_save({'step': 2, 'w': torch.zeros(1_000_000)}, path)  # 4 MB: does not\n"
            "except CheckpointSaveError as err:\n"
            "    print(err)\n"
            "    import os; print('left:', sorted(os.listdir(os.path.dirname(path))) if os.path.isdir(os.path.dirname(path)) else None)\n"
            "    print('kept step:', torch.load(path)['step'] if os.path.exists(path) else None)\n"
            "    sys.exit(2)\n")
    script = f"mount -t tmpfs -o {mount_options} tmpfs {target} && exec {sys.executable} -c \"$0\" \"$1\""
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script, code, str(target / "run" / "last.ckpt")],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"cannot write {target / 'run' / 'last.ckpt'}: {reason}" in proc.stdout, proc.stdout
    assert "free of" in proc.stdout and "Traceback" not in proc.stderr
    if "ro" not in mount_options:  # the first, small save fitted: it is still there, whole, and nothing else
        assert "kept step: 1" in proc.stdout and "left: ['last.ckpt']" in proc.stdout
    assert not any(target.iterdir())  # the mount went with its namespace; nothing was written outside it


# --- the same cases through the command line -----------------------------------------------------------------

RUN = [sys.executable, str(ROOT / "experiments" / "run.py")]
QUICK = ["--variant", "b0", "--img-size", "32", "32", "--batch-size", "3", "--num-workers", "0", "--precision", "32",
         "--accelerator", "cpu", "--epochs", "1"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def run_cli(*args: str, cwd: Path, wrap: list[str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*(wrap or []), *RUN, *args], cwd=cwd, capture_output=True, text=True, timeout=900, env=ENV)


@pytest.mark.slow
def test_train_evaluate_and_predict_carry_on_past_a_batch_of_only_unreadable_files(tmp_path):
    """The issue's reproduction: one corrupt file alone in the last validation batch (was exit 1, a traceback)."""
    (bad,) = data_with_a_lone_bad_file_in_the_last_batch(tmp_path / "data")
    proc = run_cli(*QUICK, "--data", "data", "--logdir", "runs", "--name", "lone", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "lone" / "version_0" / "summary.json").read_text())
    assert summary["bad_images"] == 1
    checkpoint = summary["checkpoints"]["last"]
    proc = run_cli("--evaluate", checkpoint, "--data", "data", "--num-workers", "0", "--accelerator", "cpu",
                   "--batch-size", "3", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_cli("--predict", "data/val", "--checkpoint", checkpoint, "--num-workers", "0", "--accelerator", "cpu",
                   "--batch-size", "3", "--output", "predictions.csv", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = (tmp_path / "predictions.csv").read_text().splitlines()[1:]
    assert sorted(row.split(",")[0] for row in rows) == ["data/val/a/000.jpg", "data/val/a/001.jpg", "data/val/b/000.jpg"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "predictions.csv", "runs"]  # no .tmp/.part left
    assert bad.exists()


@pytest.mark.slow
@needs_mounts
def test_training_onto_a_full_disk_exits_2_with_one_message(tmp_path):
    """--logdir on a real 2 MB tmpfs (private mount namespace): the first checkpoint does not fit."""
    make_image_folder(tmp_path / "data", per_class=3)
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = ["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=2m tmpfs {disk} && exec \"$0\" \"$@\""]
    proc = run_cli(*QUICK, "--data", "data", "--logdir", str(disk), "--name", "full", cwd=tmp_path, wrap=mount)
    assert proc.returncode == 2, proc.stderr[-3000:]
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith(f"pvt-lightning: error: cannot write {disk / 'full' / 'version_0' / 'checkpoints'}")
    assert "the disk is full [No space left on device]" in message and "free of" in message
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_training_and_prediction_over_odd_names_fifos_and_animations(tmp_path):
    """Non-UTF-8 names (one of them unreadable), a FIFO named like an image and an animated GIF: training reports
    the bad file, --predict neither hangs nor crashes writing the CSV, whose paths keep the exact bytes."""
    root = make_image_folder(tmp_path / "data", per_class=3)
    write_jpeg(Path(os.fsdecode(os.fsencode(root / "train" / "a") + b"/caf\xe9.jpg")), np.zeros((40, 40, 3), np.uint8))
    with open(os.fsencode(root / "val" / "b") + b"/bad\xff.jpg", "wb") as f:
        f.write(CORRUPT)
    proc = run_cli(*QUICK, "--data", "data", "--logdir", "runs", "--name", "odd", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "bad\\xff.jpg" in proc.stderr  # the warning, readable
    summary = json.loads((tmp_path / "runs" / "odd" / "version_0" / "summary.json").read_text())
    assert summary["bad_images"] == 1

    pics = tmp_path / "pics"
    write_jpeg(pics / "plain.jpg", np.zeros((40, 40, 3), np.uint8))
    write_jpeg(Path(os.fsdecode(os.fsencode(pics) + b"/\xe9t\xe9.jpg")), np.zeros((40, 40, 3), np.uint8))
    os.mkfifo(pics / "pipe.jpg")
    animated_gif(pics / "moving.gif")
    proc = run_cli("--predict", "pics", "--checkpoint", summary["checkpoints"]["last"], "--num-workers", "0",
                   "--accelerator", "cpu", "--batch-size", "2", "--output", "predictions.csv", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pipe.jpg: not a regular file (a FIFO)" in proc.stderr and "moving.gif is animated" in proc.stderr
    names = sorted(line.split(b",")[0] for line in (tmp_path / "predictions.csv").read_bytes().splitlines()[1:])
    assert names == [b"pics/moving.gif", b"pics/plain.jpg", b"pics/\xe9t\xe9.jpg"]
