"""Training augmentation on the device: workers only decode, and each batch is cropped, flipped, coloured and
normalised on the GPU.

Why: on one H200, b0 trains at ~5000 img/s on synthetic batches, but 8 CPU workers running the whole
albumentations pipeline (``transforms.train_transform``) fed it ~2000 img/s. On this path the workers decode
(at reduced resolution, decode.py), shrink images whose longer side exceeds ``max_side`` (isotropically) and pad
them into one uint8 batch that carries every image's true size (``UncroppedImages``). The device then runs the
CPU pipeline op for op, with the same random laws, batched:

    RandomResizedCrop -> HorizontalFlip [-> one TrivialAugment-like op -> ColorJitter -> Erasing] -> normalise

``DeviceAugment`` reads every op and range from the albumentations ``Compose`` the CPU path would run (the single
source of truth) and refuses, naming it, any op it has no batched version of. Matching albumentations 2.0.8:

- Crop boxes are drawn in each image's own pixels (its true size travels with the batch), so area fractions,
  aspect ratios, placement and the centre-crop fallback follow RandomResizedCrop exactly; the isotropic shrink to
  ``max_side`` changes only the resolution of what is cropped, never which region.
- Resizing follows cv2's INTER_LINEAR conventions (half-pixel centres, edge pixels replicated). The crop, the flip
  and the affine TrivialAugment ops (rotate, shear, translate: cv2.warpAffine with a zero border) compose into one
  sampling grid, so those images are interpolated once where the CPU path interpolates twice.
- Pixel values are rounded (or truncated, where albucore's lookup tables truncate) and clipped to 0..255 after
  every op, as uint8 images are on the CPU.

MixUp/CutMix stay in the LightningModule. Random draws come from a CPU ``torch.Generator`` (a few numbers per
image; the same seed gives the same draws on any device); only Erasing's noise fill is drawn on the device.

Modules, by job: ``uncropped`` (the worker side: shrink, collate uncropped), ``boxes`` (random laws, crop boxes,
the one resampling), ``ops`` (the colour, affine and erasing ops read from the policy), ``policy`` (where
augmentation runs, ``DevicePolicy`` and the ``DeviceAugment`` pipeline).
"""

from pvt_lightning.data.gpu_augment.boxes import resample, sample_crop_boxes
from pvt_lightning.data.gpu_augment.ops import read_op
from pvt_lightning.data.gpu_augment.policy import AUGMENT_DEVICES, DeviceAugment, DevicePolicy, resolve_augment_device
from pvt_lightning.data.gpu_augment.uncropped import ShrinkToFit, UncroppedImages, collate_uncropped

__all__ = ["AUGMENT_DEVICES", "DeviceAugment", "DevicePolicy", "ShrinkToFit", "UncroppedImages", "collate_uncropped",
           "read_op", "resample", "resolve_augment_device", "sample_crop_boxes"]
