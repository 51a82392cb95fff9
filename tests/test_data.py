"""Data side: folder discovery and checks, decoding of real-world files, transforms, batches, demo data."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import cv2
import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import error_from, write_jpeg
from pvt_lightning.data import DEMO_IMG_SIZE, ImageFolderDataModule, decode_image, ensure_demo_dataset, read_image
from pvt_lightning.errors import BadImageError, DataError
from pvt_lightning.data.decode import jpeg_size
from pvt_lightning.data.demo import DEMO_CLASSES

REPO = Path(__file__).resolve().parents[1]


def first_batch(loader):
    return next(iter(loader))


def datamodule(root, **kwargs) -> ImageFolderDataModule:
    kwargs = {"img_size": (32, 32), "batch_size": 4, "num_workers": 0, **kwargs}
    dm = ImageFolderDataModule(root, **kwargs)
    dm.setup("fit")
    return dm


# ------------------------------------------------------------------------------------------ layouts


def test_split_layout_gives_sorted_class_names_and_all_files(make_image_folder, tmp_path):
    root = make_image_folder(tmp_path / "d", classes=("zebra", "ant", "mole"), per_class=3)
    (root / "train" / "ant" / "notes.txt").write_text("not an image")
    (root / "train" / "ant" / ".hidden.jpg").write_bytes(b"AppleDouble junk")
    write_jpeg(root / "train" / "ant" / "nested" / "UPPER.JPG", np.zeros((20, 20, 3), np.uint8))
    dm = datamodule(root)
    assert dm.class_names == ["ant", "mole", "zebra"]
    assert dm.num_classes == 3
    assert dm.split_sizes() == {"train": 10, "val": 9}
    train_paths = {Path(p).name for p, label in dm.samples("train") if label == 0}
    assert train_paths == {"000.jpg", "001.jpg", "002.jpg", "UPPER.JPG"}


def test_test_split_is_used_when_present(make_image_folder, tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=2)
    make_image_folder(tmp_path / "t", per_class=3, split=False)
    (tmp_path / "t").rename(root / "test")
    dm = datamodule(root)
    images, targets = first_batch(dm.test_dataloader())
    assert dm.split_sizes()["test"] == 6 and images.shape == (4, 3, 32, 32)


def test_val_split_is_stratified_seeded_and_disjoint(make_image_folder, tmp_path):
    root = make_image_folder(tmp_path / "flat", classes=("a", "b", "c"), per_class=20, size=(16, 16), split=False)
    dm = datamodule(root, val_split=0.25, seed=3)
    train, val = dm.samples("train"), dm.samples("val")
    assert [sum(1 for _, label in val if label == k) for k in range(3)] == [5, 5, 5]
    assert not {p for p, _ in train} & {p for p, _ in val}
    assert len(train) + len(val) == 60
    assert datamodule(root, val_split=0.25, seed=3).samples("val") == val
    assert datamodule(root, val_split=0.25, seed=4).samples("val") != val


def test_train_folder_without_val_can_be_split(make_image_folder, tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=10, size=(16, 16))
    for path in sorted((root / "val").rglob("*.jpg")):
        path.unlink()
    for folder in sorted((root / "val").iterdir()):
        folder.rmdir()
    (root / "val").rmdir()
    with pytest.raises(DataError, match="val_split"):
        datamodule(root)
    assert datamodule(root, val_split=0.2).split_sizes() == {"train": 16, "val": 4}


# ---------------------------------------------------------------------------- validation messages


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path / 'nope'} does not exist"):
        datamodule(tmp_path / "nope")


def test_folder_without_class_folders(tmp_path):
    write_jpeg(tmp_path / "loose.jpg", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(DataError, match="no class folders.*1 images lie directly"):
        datamodule(tmp_path, val_split=0.2)


def test_empty_class_folder_is_named(make_image_folder, tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=2)
    (root / "train" / "empty_one").mkdir()
    (root / "train" / "empty_one" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"class folder .*train/empty_one contains no images"):
        datamodule(root)


def test_val_classes_differing_from_train_show_both_lists(make_image_folder, tmp_path):
    root = make_image_folder(tmp_path / "d", classes=("cat", "dog"), per_class=2)
    (root / "val" / "dog").rename(root / "val" / "wolf")
    with pytest.raises(DataError) as error:
        datamodule(root)
    assert "train: cat, dog" in str(error.value) and "val: cat, wolf" in str(error.value)


def test_fewer_than_two_classes(make_image_folder, tmp_path):
    root = make_image_folder(tmp_path / "d", classes=("only",), per_class=2)
    with pytest.raises(DataError, match="at least 2 classes"):
        datamodule(root)


def test_single_root_without_val_split_asks_for_it(make_image_folder, tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=2, split=False)
    with pytest.raises(DataError, match="pass val_split"):
        datamodule(root)


# ------------------------------------------------------------------------------ batches and shapes


@pytest.mark.parametrize("img_size", [(32, 32), (48, 32), (32, 56)])
def test_batches_are_uint8_nchw_of_the_requested_size(image_folder, img_size):
    dm = datamodule(image_folder, img_size=img_size, augment="strong")
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        images, targets = first_batch(loader)
        assert images.dtype == torch.uint8 and images.shape == (4, 3, *img_size)
        assert targets.dtype == torch.int64 and targets.shape == (4,)


def test_eval_transform_keeps_aspect_then_centre_crops(tmp_path):
    """A 100x200 image with a red left half: 32x32 centre crop after resizing to 37x74 is half red, half blue."""
    rgb = np.zeros((100, 200, 3), np.uint8)
    rgb[:, :100] = (255, 0, 0)
    rgb[:, 100:] = (0, 0, 255)
    for split in ("train", "val"):
        for name in ("x", "y"):
            (tmp_path / split / name).mkdir(parents=True)
            cv2.imwrite(str(tmp_path / split / name / "img.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    images, _ = first_batch(datamodule(tmp_path, batch_size=1).val_dataloader())
    red_left = images[0, 0, :, :12].float().mean()
    blue_right = images[0, 2, :, -12:].float().mean()
    assert red_left > 250 and blue_right > 250 and images[0, 0, :, -12:].float().mean() < 5


def test_normalize_matches_the_formula(image_folder):
    dm = datamodule(image_folder, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))
    uint8 = torch.tensor([0, 128, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 2, 2)
    out = dm.normalize(uint8)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 2, 2)
    expected = torch.tensor([(0 / 255 - 0.5) / 0.5, (128 / 255 - 0.25) / 0.25, 1.0])
    torch.testing.assert_close(out[0, :, 0, 0], expected)
    with pytest.raises(TypeError):
        dm.normalize(out)


class _RecordingModule(L.LightningModule):
    """Smallest real LightningModule: records what the batches look like when they reach it."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(3, 2)
        self.seen = []

    def training_step(self, batch, batch_idx):
        images, targets = batch
        self.seen.append((images.dtype, tuple(images.shape), float(images.mean()), targets.dtype))
        return torch.nn.functional.cross_entropy(self.layer(images.mean(dim=(2, 3))), targets)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_module_receives_normalised_float_batches(image_folder):
    dm = ImageFolderDataModule(image_folder, img_size=(32, 32), batch_size=4, num_workers=0)
    module = _RecordingModule()
    trainer = L.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0, accelerator="cpu",
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=dm)
    assert len(module.seen) == 2
    for dtype, shape, mean, target_dtype in module.seen:
        assert dtype == torch.float32 and shape == (4, 3, 32, 32) and target_dtype == torch.int64
        assert -2.5 < mean < 2.5  # normalised, not 0..255


def test_prediction_batches_carry_paths_of_a_nested_folder(tmp_path):
    for relative in ("a.jpg", "sub/b.JPEG", "sub/deeper/c.jpg"):
        write_jpeg(tmp_path / "pics" / relative, np.full((30, 50, 3), 90, np.uint8))
    (tmp_path / "pics" / "skip.txt").write_text("x")
    dm = ImageFolderDataModule.for_prediction(tmp_path / "pics", img_size=(32, 32), batch_size=2, num_workers=0)
    dm.setup("predict")
    batches = list(dm.predict_dataloader())
    paths = [p for _, batch_paths in batches for p in batch_paths]
    assert [Path(p).relative_to(tmp_path / "pics").as_posix() for p in paths] == ["a.jpg", "sub/b.JPEG", "sub/deeper/c.jpg"]
    images = dm.on_after_batch_transfer(batches[0], 0)[0]
    assert images.dtype == torch.float32 and images.shape == (2, 3, 32, 32)


# ----------------------------------------------------------------------------- decoding real files


def encode(image: Image.Image, fmt: str, **save_args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save_args)
    return buffer.getvalue()


RED_BLUE = np.zeros((20, 40, 3), np.uint8)
RED_BLUE[:, :20] = (255, 0, 0)
RED_BLUE[:, 20:] = (0, 0, 255)


def assert_red_left_blue_right(rgb: np.ndarray) -> None:
    assert rgb.dtype == np.uint8 and rgb.shape == (20, 40, 3)
    np.testing.assert_allclose(rgb[10, 5], (255, 0, 0), atol=12)
    np.testing.assert_allclose(rgb[10, 35], (0, 0, 255), atol=12)


@pytest.mark.parametrize("mode", ["P", "RGB"])
def test_palette_and_rgb_png(mode):
    assert_red_left_blue_right(decode_image(encode(Image.fromarray(RED_BLUE).convert(mode), "PNG")))


def test_cmyk_jpeg_decodes_to_the_right_colours():
    assert_red_left_blue_right(decode_image(encode(Image.fromarray(RED_BLUE).convert("CMYK"), "JPEG", quality=95)))


def test_grayscale_becomes_three_equal_channels():
    gray = np.tile(np.arange(0, 200, 5, dtype=np.uint8), (20, 1))  # (20, 40)
    rgb = decode_image(encode(Image.fromarray(gray, "L"), "PNG"))
    assert rgb.shape == (20, 40, 3)
    assert (rgb[..., 0] == gray).all() and (rgb[..., 1] == gray).all() and (rgb[..., 2] == gray).all()


def test_rgba_is_composited_on_white():
    rgba = np.zeros((20, 40, 4), np.uint8)
    rgba[..., :3] = (0, 0, 0)
    rgba[:, :20, 3] = 255  # opaque black on the left, fully transparent on the right
    rgb = decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert (rgb[:, :20] == 0).all() and (rgb[:, 20:] == 255).all()
    gray_alpha = decode_image(encode(Image.fromarray(rgba, "RGBA").convert("LA"), "PNG"))
    assert (gray_alpha[:, :20] == 0).all() and (gray_alpha[:, 20:] == 255).all()


def test_sixteen_bit_png_is_scaled_to_eight_bit():
    deep = np.full((20, 40), 65535, np.uint16)
    deep[:, 20:] = 32768
    rgb = decode_image(encode(Image.fromarray(deep), "PNG"))
    assert rgb.dtype == np.uint8 and (rgb[:, :20] == 255).all() and (rgb[:, 20:] == 128).all()
    ok, colour16 = cv2.imencode(".png", np.full((4, 4, 3), (0, 4096, 65535), np.uint16))  # BGR
    assert (decode_image(colour16.tobytes())[0, 0] == (255, 16, 0)).all()


@pytest.mark.parametrize("min_side", [0, 8])
def test_exif_rotation_is_honoured(min_side):
    """Orientation 6 (rotate 90 degrees clockwise to display): the left half ends up on top."""
    wide = np.zeros((64, 128, 3), np.uint8)
    wide[:, :64] = (255, 0, 0)
    wide[:, 64:] = (0, 0, 255)
    image = Image.fromarray(wide)
    exif = image.getexif()
    exif[0x0112] = 6
    rgb = decode_image(encode(image, "JPEG", exif=exif, quality=95), min_side=min_side)
    scale = 1 if min_side == 0 else 8  # min(64, 128) // 8 >= 8: decoded at 1/8 size
    assert rgb.shape == (128 // scale, 64 // scale, 3)
    np.testing.assert_allclose(rgb[2 // scale + 1, 32 // scale], (255, 0, 0), atol=20)
    np.testing.assert_allclose(rgb[-2, 32 // scale], (0, 0, 255), atol=20)


def test_large_jpeg_is_decoded_reduced_but_still_covers_the_target(tmp_path):
    big = write_jpeg(tmp_path / "big.jpg", np.full((1500, 2000, 3), 70, np.uint8), quality=70)
    data = big.read_bytes()
    assert jpeg_size(data) == (1500, 2000)
    assert read_image(big).shape == (1500, 2000, 3)
    assert read_image(big, min_side=300).shape == (375, 500, 3)  # 1/4: 1500 // 8 = 187 would be too small
    assert read_image(big, min_side=1000).shape == (1500, 2000, 3)
    big_png = tmp_path / "big.png"
    cv2.imwrite(str(big_png), np.full((400, 500, 3), 70, np.uint8))
    assert read_image(big_png, min_side=100).shape == (100, 125, 3)  # halved twice after decoding
    assert read_image(big_png, min_side=101).shape == (200, 250, 3)


def test_tiny_images_are_upscaled_to_the_crop(make_image_folder, tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=2, size=(5, 7))
    dm = datamodule(root, img_size=(48, 40))
    assert first_batch(dm.train_dataloader())[0].shape == (4, 3, 48, 40)
    assert first_batch(dm.val_dataloader())[0].shape == (4, 3, 48, 40)


def corrupt_files(folder: Path) -> list[Path]:
    """Write the undecodable files real folders contain; returns their paths."""
    good = encode(Image.fromarray(np.full((40, 40, 3), 128, np.uint8)), "JPEG")
    good_png = encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)), "PNG")
    files = {
        "zero_bytes.jpg": b"",
        "truncated.jpg": good[: len(good) // 2],
        "truncated.png": good_png[: len(good_png) // 2],
        "text.png": b"this is a text file with an image extension\n",
        "html.JPG": b"<html><body>404 not found</body></html>",
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return sorted(folder / name for name in files)


def test_each_corrupt_file_raises_bad_image_error_with_its_path(tmp_path):
    for path in corrupt_files(tmp_path):
        with pytest.raises(BadImageError) as error:
            read_image(path)
        assert error.value.path == str(path)


def test_skip_policy_replaces_in_train_drops_in_val_and_counts_once(make_image_folder, tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=4)
    bad = corrupt_files(root / "train" / "a") + corrupt_files(root / "val" / "b")
    dm = datamodule(root, batch_size=64)
    train_images, train_targets = first_batch(dm.train_dataloader())
    assert train_images.shape[0] == 8 + 5  # every train slot filled (with a replacement image)
    val_images, val_targets = first_batch(dm.val_dataloader())
    assert val_images.shape[0] == 8 and val_targets.tolist() == [0] * 4 + [1] * 4  # bad files dropped
    first_batch(dm.val_dataloader())  # meeting them again neither logs nor counts them twice
    assert dm.bad_image_paths() == sorted(str(p) for p in bad)


def test_skip_policy_logs_each_bad_path_once(make_image_folder, tmp_path, caplog):
    root = make_image_folder(tmp_path / "d", per_class=2)
    (bad,) = [p for p in corrupt_files(root / "val" / "a") if p.name == "zero_bytes.jpg"] or [None]
    for extra in corrupt_files(root / "val" / "a"):
        if extra != bad:
            extra.unlink()
    dm = datamodule(root)
    with caplog.at_level("WARNING", logger="pvt_lightning.data"):
        list(dm.val_dataloader())
        list(dm.val_dataloader())
    messages = [r.getMessage() for r in caplog.records if str(bad) in r.getMessage()]
    assert len(messages) == 1 and "empty file" in messages[0]


def test_error_policy_stops_with_the_path(make_image_folder, tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=2)
    (root / "val" / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    dm = datamodule(root, bad_images="error")
    with pytest.raises(DataError, match=r"cannot decode image .*broken\.jpg"):
        list(dm.val_dataloader())


def test_verify_images_excludes_bad_files_before_training(make_image_folder, tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=3)
    bad = corrupt_files(root / "train" / "b")
    dm = datamodule(root, verify_images=True)
    assert dm.split_sizes() == {"train": 6, "val": 6}
    assert dm.bad_image_paths() == sorted(str(p) for p in bad)
    with pytest.raises(DataError, match="5 unreadable image"):
        datamodule(root, verify_images=True, bad_images="error")


def test_verify_images_names_a_class_left_without_images(make_image_folder, tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=1)
    (root / "train" / "b" / "000.jpg").write_bytes(b"")
    with pytest.raises(DataError, match=r"train/b have no images left"):
        datamodule(root, verify_images=True)


def test_real_worker_processes_record_bad_images_and_augment_independently(tmp_path):
    """Two DataLoader worker processes: bad files seen by either are counted once in the main process,
    and the workers' random crops differ (albumentations' generators would otherwise be cloned)."""
    rng = np.random.default_rng(0)
    texture = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    for split in ("train", "val"):
        for name in ("a", "b"):
            for n in range(8):
                write_jpeg(tmp_path / split / name / f"{n}.jpg", texture)
    bad = corrupt_files(tmp_path / "train" / "a") + corrupt_files(tmp_path / "val" / "b")
    dm = ImageFolderDataModule(tmp_path, img_size=(32, 32), batch_size=1, num_workers=2, crop_scale=(0.1, 0.2))
    dm.setup("fit")
    train_loader = dm.train_dataloader()
    batches = [images for images, _ in train_loader]
    list(dm.val_dataloader())
    assert dm.bad_image_paths() == sorted(str(p) for p in bad)
    worker0, worker1 = batches[0::2], batches[1::2]  # batches alternate between the two workers
    assert any(not torch.equal(a, b) for a, b in zip(worker0, worker1))


def test_error_from_a_worker_process_reads_as_one_line(make_image_folder, tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=2)
    (root / "val" / "b" / "zero.png").write_bytes(b"")
    dm = datamodule(root, bad_images="error", num_workers=2)
    message = str(error_from(dm.val_dataloader(), DataError))
    assert message.startswith("cannot decode image") and "zero.png" in message and "Traceback" not in message


# -------------------------------------------------------------------------------------- demo data


def test_demo_dataset_is_real_jpegs_deterministic_and_generated_once(tmp_path):
    first = ensure_demo_dataset(tmp_path / "one", train_per_class=3, val_per_class=2)
    second = ensure_demo_dataset(tmp_path / "two", train_per_class=3, val_per_class=2)
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert len(files) == len(DEMO_CLASSES) * 5
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    for relative in files:
        data = (first / relative).read_bytes()
        assert data[:3] == b"\xff\xd8\xff" and data == (second / relative).read_bytes()
    stamp = (first / files[0]).stat().st_mtime_ns
    assert ensure_demo_dataset(first) == first and (first / files[0]).stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] in (["one", "two"], ["two", "one"])  # no partial folders left
    dm = datamodule(first, img_size=DEMO_IMG_SIZE)
    assert dm.class_names == sorted(DEMO_CLASSES)
    assert first_batch(dm.train_dataloader())[0].shape == (4, 3, *DEMO_IMG_SIZE)


def test_demo_dataset_default_location_follows_the_cache_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("PVT_LIGHTNING_CACHE", str(tmp_path / "cache"))
    root = ensure_demo_dataset(train_per_class=1, val_per_class=1)
    assert root == tmp_path / "cache" / "demo-v1" and (root / "val" / "rings").is_dir()


def test_half_written_demo_folder_is_reported_not_used(tmp_path):
    (tmp_path / "demo" / "train" / "rings").mkdir(parents=True)
    with pytest.raises(DataError, match="incomplete"):
        ensure_demo_dataset(tmp_path / "demo", train_per_class=1, val_per_class=1)


# ------------------------------------------------------------------------------------------ digits


@pytest.mark.slow
def test_make_digits_writes_the_real_sklearn_digits_as_an_image_folder(tmp_path):
    from sklearn.datasets import load_digits

    subprocess.run([sys.executable, str(REPO / "experiments" / "make_digits.py"), str(tmp_path / "digits"),
                    "--size", "32"], check=True, capture_output=True, text=True)
    root = tmp_path / "digits"
    dm = datamodule(root)
    assert dm.class_names == [str(d) for d in range(10)]
    assert sum(dm.split_sizes().values()) == 1797
    digits = load_digits()
    first = cv2.imread(str(sorted((root / "train" / str(digits.target[0])).glob("*.png"))[0]), cv2.IMREAD_GRAYSCALE)
    assert first.shape == (32, 32)
    assert first.dtype == np.uint8 and first.max() > 200 and first.min() < 30  # real strokes, full contrast
