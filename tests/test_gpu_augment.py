"""The device-side training augmentation (data/gpu_augment/), on CPU tensors: the same random laws and the same
pixels as the albumentations pipeline the CPU path runs, and a real Trainer fit through it."""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import lightning as L  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from scipy.stats import ks_2samp  # noqa: E402

from pvt_lightning.data import ImageFolderDataModule  # noqa: E402
from pvt_lightning.data.gpu_augment import (  # noqa: E402
    DeviceAugment,
    DevicePolicy,
    ShrinkToFit,
    UncroppedImages,
    collate_uncropped,
    read_op,
    resample,
    resolve_augment_device,
    sample_crop_boxes,
)
from pvt_lightning.data.transforms import train_transform  # noqa: E402
from pvt_lightning.models.registry import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402

KS_LIMIT = 0.05
"""Largest two-sample KS distance accepted between 4000 of our draws and 4000 of albumentations' (the 0.1%
critical value is 0.044; a law that is off by a few percent anywhere lands above it)."""


def smooth_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A photo-like RGB uint8 image: a smooth random colour field plus mild noise."""
    rng = np.random.default_rng(seed)
    field = cv2.resize(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8), (width, height), interpolation=cv2.INTER_CUBIC)
    return np.clip(field.astype(np.int16) + rng.integers(-12, 13, field.shape), 0, 255).astype(np.uint8)


def as_batch(*images: np.ndarray) -> UncroppedImages:
    """Images (H, W, 3) -> the padded uint8 batch the GPU path's workers ship."""
    canvas, _ = collate_uncropped([(torch.from_numpy(image).permute(2, 0, 1), 0) for image in images])
    return canvas


def hwc(x: torch.Tensor) -> np.ndarray:
    return x.permute(1, 2, 0).numpy()


def albumentations_crop_boxes(shape: tuple[int, int], scale, ratio, n: int) -> np.ndarray:
    """n boxes (x0, y0, w, h) drawn by albumentations' own RandomResizedCrop for an image of ``shape`` (h, w)."""
    crop = A.RandomResizedCrop(size=(32, 32), scale=scale, ratio=ratio)
    A.Compose([crop], seed=1)  # seeds the transform's generators
    boxes = []
    for _ in range(n):
        x0, y0, x1, y1 = crop.get_params_dependent_on_data({"shape": shape}, {})["crop_coords"]
        boxes.append((x0, y0, x1 - x0, y1 - y0))
    return np.array(boxes, dtype=np.float64)


def box_statistics(boxes: np.ndarray, shape: tuple[int, int]) -> dict[str, np.ndarray]:
    x0, y0, w, h = boxes.T
    return {"area fraction": w * h / (shape[0] * shape[1]), "log aspect": np.log(w / h),
            "centre x": (x0 + w / 2) / shape[1], "centre y": (y0 + h / 2) / shape[0]}


# ------------------------------------------------------------------------------------ random laws

@pytest.mark.parametrize("shape", [(375, 500), (500, 333), (224, 224)])
def test_crop_boxes_have_random_resized_crops_distribution(shape):
    scale, ratio, n = (0.08, 1.0), (3 / 4, 4 / 3), 4000
    ours = sample_crop_boxes(torch.tensor([shape] * n), scale, ratio, torch.Generator().manual_seed(0)).numpy()
    theirs = albumentations_crop_boxes(shape, scale, ratio, n)
    assert (ours[:, 0] >= 0).all() and (ours[:, 0] + ours[:, 2] <= shape[1]).all()
    assert (ours[:, 1] >= 0).all() and (ours[:, 1] + ours[:, 3] <= shape[0]).all()
    ours_stats, their_stats = box_statistics(ours, shape), box_statistics(theirs, shape)
    for name in ours_stats:
        assert ks_2samp(ours_stats[name], their_stats[name]).statistic < KS_LIMIT, name
    # The check has the power to see a wrong law: albumentations' own boxes at a different scale range fail it.
    other = box_statistics(albumentations_crop_boxes(shape, (0.15, 1.0), ratio, n), shape)
    assert ks_2samp(ours_stats["area fraction"], other["area fraction"]).statistic > KS_LIMIT


def test_crop_falls_back_to_albumentations_centre_crop():
    """A 40x400 strip fits no 3/4..4/3 box of that area: every draw is the same centre crop as albumentations'."""
    shape, scale, ratio = (40, 400), (0.9, 1.0), (3 / 4, 4 / 3)
    ours = sample_crop_boxes(torch.tensor([shape] * 50), scale, ratio, torch.Generator().manual_seed(0)).numpy()
    theirs = albumentations_crop_boxes(shape, scale, ratio, 50)
    assert (ours == theirs).all()
    assert tuple(ours[0]) == (173, 0, 53, 40)


def test_flip_and_op_rates_follow_the_policy():
    augment = DeviceAugment(train_transform((32, 32), "strong"), IMAGENET_MEAN, IMAGENET_STD, seed=0)
    draws = augment.draw(torch.tensor([[48, 64]] * 6000))
    assert abs(draws["flip"].float().mean().item() - 0.5) < 0.025
    counts = torch.bincount(draws["choice"], minlength=13).float() / 6000  # one of 13 TrivialAugment ops, uniformly
    assert counts.min() > 0.06 and counts.max() < 0.095
    (jitter, _), (erasing, _) = draws["steps"]
    assert abs(jitter.float().mean().item() - 0.8) < 0.025 and abs(erasing.float().mean().item() - 0.25) < 0.025


def test_erasing_boxes_have_albumentations_distribution():
    out_hw, n = (32, 48), 4000
    erasing = A.Erasing(scale=(0.02, 0.33), ratio=(0.3, 3.3), fill="random", p=1.0)
    A.Compose([erasing], seed=3)
    theirs = []
    for _ in range(n):
        x0, y0, x1, y1 = erasing.get_params_dependent_on_data({"shape": out_hw}, {})["holes"][0]
        theirs.append((x0, y0, x1 - x0, y1 - y0))
    ours = read_op(erasing).draw(n, out_hw, torch.Generator().manual_seed(0)).numpy()
    ours_stats, their_stats = box_statistics(ours, out_hw), box_statistics(np.array(theirs, float), out_hw)
    for name in ours_stats:
        assert ks_2samp(ours_stats[name], their_stats[name]).statistic < KS_LIMIT, name


# ------------------------------------------------------------------------- pixels, op by op

@pytest.mark.parametrize("box, out_hw, flip", [((5, 7, 40, 30), (24, 32), False), ((5, 7, 40, 30), (96, 80), True),
                                               ((0, 0, 64, 48), (48, 64), True)])
def test_resized_crop_equals_cv2_resize_of_the_crop(box, out_hw, flip):
    image = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)  # noise: every pixel counts
    out = resample(as_batch(image).pixels, torch.tensor([box]), out_hw, torch.tensor([flip]))[0]
    x0, y0, w, h = box
    expected = cv2.resize(image[y0:y0 + h, x0:x0 + w], out_hw[::-1], interpolation=cv2.INTER_LINEAR)
    if flip:
        expected = expected[:, ::-1]
    assert np.abs(hwc(out) - expected).max() <= 1  # cv2 interpolates in fixed point


def test_crops_from_a_padded_batch_ignore_the_padding():
    """Two sizes in one canvas: the small image's crop never reads the zero padding beside it."""
    small, large = smooth_image(30, 40, seed=1), smooth_image(60, 90, seed=2)
    batch = as_batch(small, large)
    assert batch.pixels.shape == (2, 3, 60, 90) and batch.sizes == ((30, 40), (60, 90))
    assert batch.pixels[0, :, 30:].eq(0).all() and batch.pixels[0, :, :, 40:].eq(0).all()
    boxes = torch.tensor([[0, 0, 40, 30], [10, 5, 80, 50]])
    out = resample(batch.pixels, boxes, (64, 64), torch.tensor([False, False]))
    assert np.abs(hwc(out[0]) - cv2.resize(small, (64, 64), interpolation=cv2.INTER_LINEAR)).max() <= 1
    assert np.abs(hwc(out[1]) - cv2.resize(large[5:55, 10:90], (64, 64), interpolation=cv2.INTER_LINEAR)).max() <= 1


@pytest.mark.parametrize("settings", [
    {"rotate": (20, 20)},
    {"rotate": (-30, -30)},
    {"shear": {"x": (12, 12), "y": (0, 0)}},
    {"shear": {"x": (0, 0), "y": (-17, -17)}},
    {"translate_percent": {"x": (0.3, 0.3), "y": (0, 0)}},
    {"translate_percent": {"x": (0, 0), "y": (-0.25, -0.25)}},
])
def test_affine_ops_equal_albumentations_affine(settings):
    image = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    affine = A.Affine(p=1.0, **settings)
    expected = A.Compose([affine], seed=0)(image=image)["image"]
    warp = read_op(affine).draw(1, (48, 64), torch.Generator().manual_seed(0))
    out = resample(as_batch(image).pixels, torch.tensor([[0, 0, 64, 48]]), (48, 64), torch.tensor([False]), warp)[0]
    assert np.abs(hwc(out) - expected).mean() < 0.01 and np.abs(hwc(out) - expected).max() <= 1


@pytest.mark.parametrize("transform, params", [
    (A.RandomBrightnessContrast(brightness_limit=(0.3, 0.3), contrast_limit=(0, 0), p=1), [1.0, 0.3 * 255]),
    (A.RandomBrightnessContrast(brightness_limit=(0, 0), contrast_limit=(-0.35, -0.35), p=1), [0.65, 0.0]),
    (A.ColorJitter(brightness=(1.3, 1.3), contrast=(1, 1), saturation=(1, 1), hue=0, p=1), [1.3, 1, 1, 0, 1, 2]),
    (A.ColorJitter(brightness=(1, 1), contrast=(0.7, 0.7), saturation=(1, 1), hue=0, p=1), [1, 0.7, 1, 0, 1, 2]),
    (A.ColorJitter(brightness=(1, 1), contrast=(1, 1), saturation=(1.7, 1.7), hue=0, p=1), [1, 1, 1.7, 0, 1, 2]),
    (A.Sharpen(alpha=(0.6, 0.6), lightness=(0.8, 0.8), p=1), [0.6, 0.8]),
    (A.Posterize(num_bits=(3, 3), p=1), [3]),
    (A.Solarize(threshold_range=(0.4, 0.4), p=1), [0.4]),
    (A.AutoContrast(p=1), []),
    (A.Equalize(p=1), []),
])
def test_pixel_ops_equal_albumentations(transform, params):
    image = smooth_image(40, 56, seed=5)
    expected = A.Compose([transform], seed=0)(image=image)["image"]  # every range is one value
    out = read_op(transform).apply(as_batch(image).pixels.float(), torch.tensor([params], dtype=torch.float64))[0]
    assert np.abs(hwc(out) - expected).max() <= 1


def test_color_jitter_applies_its_three_factors_in_the_drawn_order():
    image = smooth_image(40, 56, seed=6)
    jitter = A.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.0)
    for order in ([1, 2, 0, 3], [2, 0, 1, 3]):  # albumentations' order also holds hue (3), a no-op here
        expected = jitter.apply(image, brightness=0.7, contrast=1.3, saturation=0.4, hue=0.0, order=order)
        params = torch.tensor([[0.7, 1.3, 0.4] + order[:3]], dtype=torch.float64)
        out = read_op(jitter).apply(as_batch(image).pixels.float(), params)[0]
        assert np.abs(hwc(out) - expected).max() <= 1


def test_erasing_fills_its_box_with_uniform_noise():
    augment = DeviceAugment(A.Compose([A.RandomResizedCrop((64, 64), scale=(1, 1), ratio=(1, 1)),
                                       A.Erasing(scale=(0.3, 0.3), ratio=(1, 1), fill="random", p=1.0)]),
                            (0, 0, 0), (1 / 255, 1 / 255, 1 / 255), seed=0)
    flat = np.full((64, 64, 3), 128, np.uint8)
    out = augment(as_batch(flat, flat))
    for image in out:
        changed = (image != 128).any(0)
        ys, xs = changed.nonzero(as_tuple=True)
        side = round((0.3 * 64 * 64) ** 0.5)
        assert (ys.max() - ys.min() + 1, xs.max() - xs.min() + 1) == (side, side)
        noise = image[:, ys.min():ys.max() + 1, xs.min():xs.max() + 1]
        assert 100 < noise.mean() < 155 and noise.min() >= 0 and noise.max() <= 255 and noise.std() > 60


# --------------------------------------------------------------------------- the whole pipeline

def test_constant_image_normalises_exactly_like_the_cpu_path():
    image = np.empty((60, 80, 3), np.uint8)
    image[:] = (200, 100, 50)
    dm = ImageFolderDataModule(None, img_size=(32, 32))
    cropped = train_transform((32, 32), "basic")(image=image)["image"]
    cpu = dm.normalize(torch.from_numpy(cropped).permute(2, 0, 1)[None])
    gpu = DeviceAugment(train_transform((32, 32), "basic"), IMAGENET_MEAN, IMAGENET_STD)(as_batch(image, image))
    assert gpu.shape == (2, 3, 32, 32) and gpu.dtype == torch.float32
    assert torch.allclose(gpu, cpu.expand_as(gpu), atol=1e-5)
    assert torch.allclose(gpu[0, :, 0, 0], torch.tensor([(200 / 255 - 0.485) / 0.229, (100 / 255 - 0.456) / 0.224,
                                                         (50 / 255 - 0.406) / 0.225]), atol=1e-5)


def pipeline_statistics(images: np.ndarray) -> dict[str, np.ndarray]:
    """Per augmented image (N, H, W, 3): mean level, contrast, and the share of pure-black pixels (warp borders)."""
    flat = images.reshape(len(images), -1, 3).astype(np.float64)
    return {"mean": flat.mean((1, 2)), "std": flat.std((1, 2)), "black": (flat.max(2) == 0).mean(1),
            "red - blue": (flat[..., 0] - flat[..., 2]).mean(1)}


@pytest.mark.parametrize("augment", ["basic", "strong"])
def test_augmented_images_have_the_cpu_paths_statistics(augment):
    """The whole pipeline, many times over one photo-like image: the image statistics of the CPU path's output
    and of ours are indistinguishable."""
    n, size = 600, (32, 32)
    image = smooth_image(48, 64, seed=7)
    cpu_pipeline = train_transform(size, augment, seed=0)
    cpu = np.stack([cpu_pipeline(image=image)["image"] for _ in range(n)])
    unit = DeviceAugment(train_transform(size, augment), (0, 0, 0), (1 / 255, 1 / 255, 1 / 255), seed=0)
    ours = unit(as_batch(*[image] * n)).permute(0, 2, 3, 1).numpy()
    ours_stats, cpu_stats = pipeline_statistics(ours), pipeline_statistics(cpu)
    for name in ours_stats:
        assert ks_2samp(ours_stats[name], cpu_stats[name]).statistic < 0.1, name
    if augment == "strong":  # the check sees a missing colour op: the basic policy's output fails it
        basic = DeviceAugment(train_transform(size, "basic"), (0, 0, 0), (1 / 255,) * 3, seed=0)
        basic_stats = pipeline_statistics(basic(as_batch(*[image] * n)).permute(0, 2, 3, 1).numpy())
        assert ks_2samp(basic_stats["std"], cpu_stats["std"]).statistic > 0.1


def test_policy_without_a_device_version_is_refused_by_name():
    policy = A.Compose([A.RandomResizedCrop((32, 32)), A.GaussianBlur(p=0.5)])
    with pytest.raises(ValueError, match="GaussianBlur.*augment_device='cpu'"):
        DevicePolicy.read(policy)


def test_shrink_to_fit_keeps_the_aspect_ratio():
    image = smooth_image(300, 900)
    assert ShrinkToFit(450)(image=image)["image"].shape == (150, 450, 3)
    assert ShrinkToFit(900)(image=image)["image"] is image


def test_auto_means_gpu_on_cuda_only():
    assert resolve_augment_device("auto", "cpu") == "cpu"
    assert resolve_augment_device("auto", "cuda:0") == "gpu"
    assert resolve_augment_device("gpu", "cpu") == "gpu"
    with pytest.raises(ValueError, match="augment_device"):
        resolve_augment_device("tpu")
    with pytest.raises(ValueError, match="augment_device"):
        ImageFolderDataModule(None, augment_device="fast")


class RecordBatches(L.Callback):
    def __init__(self):
        self.batches = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append((batch[0].detach().clone(), batch[1].clone()))


def test_trainer_fits_through_the_gpu_path_on_cpu_tensors(make_image_folder, tmp_path):
    """Real JPEGs of two sizes and one corrupt file, the device path forced on the CPU: the model gets normalised
    float batches of the full batch size and the bad file is skipped and counted."""
    from pvt_lightning.training.module import ImageClassifier

    root = make_image_folder(tmp_path / "data", per_class=6, size=(48, 64))
    make_image_folder(tmp_path / "data", classes=("a",), per_class=2, size=(90, 40), seed=1)  # overwrites 000, 001
    bad = root / "train" / "b" / "corrupt.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    dm = ImageFolderDataModule(root, img_size=(32, 32), batch_size=4, num_workers=0, augment="strong",
                               augment_device="gpu")
    dm.setup("fit")
    images, labels = next(iter(dm.train_dataloader()))
    assert isinstance(images, UncroppedImages) and images.pixels.dtype == torch.uint8 and len(images) == 4

    L.seed_everything(0)
    model = ImageClassifier("b0", num_classes=2, img_size=(32, 32), warmup_epochs=0)
    recorder = RecordBatches()
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=3, limit_val_batches=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[recorder])
    trainer.fit(model, datamodule=dm)
    assert len(recorder.batches) == 3
    low = min((0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
    high = max((1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
    for images, labels in recorder.batches:
        assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32 and labels.shape == (4,)
        assert low - 1e-4 <= images.min() and images.max() <= high + 1e-4 and images.std() > 0.1
    assert dm.bad_image_paths() == [str(bad)]
