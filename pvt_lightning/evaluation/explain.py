"""Where the model looks: Grad-CAM maps of chosen evaluation images, as a gallery and per-image overlays.

``evaluate --explain N`` picks the N most confident mistakes and, for the classes with the lowest recall,
their most confident right and wrong answers; for each, the Grad-CAM map (Selvaraju et al. 2017) of the
predicted class is computed by pytorch-grad-cam (the ``[explain]`` extra, MIT) on one stage of the
model's pyramid: the stage is the module ``model.feature_info[i]["module"]`` names, i.e. the NCHW map
``forward_intermediates`` returns for index ``i`` (PVTv2's ``stages.i`` outputs its tokens as a map, so
no reshape is needed; ResNet's ``layer{i+1}``). The last stage is used unless the input is so small that
its map has fewer than 2 cells on a side (32x32 input: 1x1), then the deepest stage that has 2.

Files: ``explanations.png`` (the gallery: image and overlay, true class, predicted class, probability)
and ``explanations/`` with one overlay PNG per image and ``index.csv`` (``file,path,kind,true_class,
predicted_class,probability,stage,peak_row,peak_col``; the peak is where the map is highest, as a
fraction of the height and width of the model's input crop).
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from pvt_lightning.data.decode import read_image
from pvt_lightning.data.transforms import eval_transform, resize_target
from pvt_lightning.errors import BadImageError, UsageError, printable
from pvt_lightning.evaluation.gallery import gallery_png, side_by_side

GALLERY_FILE = "explanations.png"
OVERLAY_DIR = "explanations"
INDEX_COLUMNS = ("file", "path", "kind", "true_class", "predicted_class", "probability", "stage", "peak_row",
                 "peak_col")
WORST_CLASSES = 3
"""How many of the lowest-recall classes get right and wrong examples."""
CAM_BATCH = 16


@dataclass(frozen=True)
class Example:
    """One image to explain: its row in the evaluation, why it was chosen (``mistake``, ``worst_class_right``,
    ``worst_class_wrong``), its true and predicted class indices and the predicted class's probability."""

    index: int
    kind: str
    true: int
    predicted: int
    probability: float


def require_grad_cam():
    """The pytorch_grad_cam module, or a UsageError saying how to install it."""
    try:
        import pytorch_grad_cam
    except ImportError:
        raise UsageError("--explain needs pytorch-grad-cam: pip install 'pvt-lightning[explain]' (or "
                         "pip install grad-cam)") from None
    return pytorch_grad_cam


def cam_stage(model: nn.Module, img_size: Sequence[int]) -> int:
    """The deepest stage whose map has at least 2 cells on its shorter side at ``img_size`` (H, W); else stage 0."""
    shorter = min(img_size)
    reductions = [info["reduction"] for info in model.feature_info]
    fitting = [i for i, r in enumerate(reductions) if shorter // r >= 2]
    return fitting[-1] if fitting else 0


def class_activation_maps(model: nn.Module, images: torch.Tensor, classes: Sequence[int],
                          stage: int | None = None) -> np.ndarray:
    """Grad-CAM of ``classes[b]`` for each normalised image (B, 3, H, W) -> maps (B, H, W) in [0, 1].

    ``stage``: index into ``model.feature_info`` (default ``cam_stage``). Works at any input size the model
    takes, square or not; the model's parameters get no gradients left behind.
    """
    grad_cam = require_grad_cam()
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    stage = cam_stage(model, images.shape[-2:]) if stage is None else stage
    layer = model.get_submodule(model.feature_info[stage]["module"])
    device = next(model.parameters()).device
    maps = []
    try:
        with grad_cam.GradCAM(model=model, target_layers=[layer]) as cam:
            for start in range(0, len(images), CAM_BATCH):
                batch = images[start:start + CAM_BATCH].to(device)
                targets = [ClassifierOutputTarget(int(c)) for c in classes[start:start + CAM_BATCH]]
                maps.append(cam(input_tensor=batch, targets=targets))
    finally:
        model.zero_grad(set_to_none=True)
    return np.concatenate(maps).astype(np.float32) if maps else np.zeros((0, *images.shape[-2:]), np.float32)


def pick_examples(probs: torch.Tensor, targets: torch.Tensor, count: int,
                  worst_classes: int = WORST_CLASSES) -> list[Example]:
    """The ``count`` most confident mistakes, then for the ``worst_classes`` classes with the lowest recall
    (among those in ``targets``) up to ``max(1, count // 8)`` most confident right and wrong answers each."""
    confidence, predicted = probs.max(dim=1)
    wrong = predicted != targets

    def example(i: int, kind: str) -> Example:
        return Example(i, kind, int(targets[i]), int(predicted[i]), float(confidence[i]))

    def most_confident(mask: torch.Tensor, k: int) -> list[int]:
        chosen = torch.nonzero(mask).flatten()
        return chosen[confidence[chosen].argsort(descending=True)[:k]].tolist()

    chosen = [example(i, "mistake") for i in most_confident(wrong, count)]
    present = targets.unique()
    recall = torch.stack([(~wrong[targets == c]).float().mean() for c in present])
    per_class = max(1, count // 8)
    seen = {e.index for e in chosen}
    for c in present[recall.argsort()[:worst_classes]].tolist():
        for kind, mask in (("worst_class_right", (targets == c) & ~wrong), ("worst_class_wrong", (targets == c) & wrong)):
            picks = [i for i in most_confident(mask, len(targets)) if i not in seen][:per_class]
            chosen += [example(i, kind) for i in picks]
            seen.update(picks)
    return chosen


def load_crops(paths: Sequence[str], img_size: Sequence[int], crop_pct: float, mean: Sequence[float],
               std: Sequence[float]) -> tuple[list[np.ndarray], torch.Tensor]:
    """The evaluation's view of each image: RGB uint8 crops (H, W, 3) and the normalised batch (B, 3, H, W)."""
    transform = eval_transform(tuple(img_size), crop_pct)
    min_side = max(resize_target(tuple(img_size), crop_pct))
    crops = []
    for path in paths:
        try:
            crops.append(transform(image=read_image(path, min_side))["image"])
        except BadImageError as err:
            raise UsageError(f"--explain: {printable(path)} was evaluated but cannot be read now ({err.reason})") \
                from None
    batch = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 255.0
    batch = (batch - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    return crops, batch


def overlay(crop: np.ndarray, heatmap: np.ndarray) -> np.ndarray:
    """The map as a JET heat map over the RGB crop (pytorch-grad-cam's ``show_cam_on_image``), uint8 RGB."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    return show_cam_on_image(crop.astype(np.float32) / 255.0, heatmap, use_rgb=True, image_weight=0.55)


def explanation_files(model: nn.Module, probs: torch.Tensor, targets: torch.Tensor, paths: Sequence[str],
                      class_names: Sequence[str], count: int, img_size: Sequence[int], crop_pct: float,
                      mean: Sequence[float], std: Sequence[float]) -> dict[str, bytes | str]:
    """``explanations.png``, ``explanations/index.csv`` and one ``explanations/NNN_<kind>.png`` per chosen image."""
    require_grad_cam()
    examples = pick_examples(probs.float().cpu(), targets.long().cpu(), count)
    if not examples:
        return {GALLERY_FILE: gallery_png([], [], "explanations")}
    crops, batch = load_crops([paths[e.index] for e in examples], img_size, crop_pct, mean, std)
    stage = cam_stage(model, img_size)
    maps = class_activation_maps(model, batch, [e.predicted for e in examples], stage)
    files: dict[str, bytes | str] = {}
    tiles, captions, index = [], [], io.StringIO()
    writer = csv.writer(index)
    writer.writerow(INDEX_COLUMNS)
    for k, (e, crop, heatmap) in enumerate(zip(examples, crops, maps)):
        shown = overlay(crop, heatmap)
        name = f"{OVERLAY_DIR}/{k:03d}_{e.kind}.png"
        files[name] = png_of(shown)
        row, col = np.unravel_index(int(heatmap.argmax()), heatmap.shape)
        writer.writerow([os.path.basename(name), paths[e.index], e.kind, class_names[e.true], class_names[e.predicted],
                         f"{e.probability:.6f}", stage, f"{(row + 0.5) / heatmap.shape[0]:.4f}",
                         f"{(col + 0.5) / heatmap.shape[1]:.4f}"])
        tiles.append(side_by_side([crop, shown]))
        captions.append(f"{e.kind.replace('_', ' ')}\ntrue {class_names[e.true]} | pred {class_names[e.predicted]} "
                        f"p={e.probability:.2f}\n{Path(paths[e.index]).name[:28]}")
    files[f"{OVERLAY_DIR}/index.csv"] = index.getvalue()
    files[GALLERY_FILE] = gallery_png(tiles, captions, f"Grad-CAM of the predicted class (stage {stage})", columns=4)
    return files


def png_of(rgb: np.ndarray) -> bytes:
    import cv2

    ok, encoded = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("OpenCV could not encode a PNG")
    return encoded.tobytes()


def explanation_file_names() -> list[str]:
    """What to check in the output folder before any work: the gallery and the overlay folder."""
    return [GALLERY_FILE, f"{OVERLAY_DIR}/index.csv"]


def write_explanations(output_dir: str | Path, model: nn.Module, logits: torch.Tensor, targets: torch.Tensor,
                       paths: Sequence[str], class_names: Sequence[str], count: int, datamodule,
                       overwrite: bool = False) -> str:
    """Compute and write the explanations of one evaluation into ``output_dir``; returns a line for the terminal.

    ``model``: the network (``ImageClassifier.model``), ``datamodule``: the evaluation's ImageFolderDataModule
    (its ``img_size``, ``crop_pct``, ``mean`` and ``std`` are the evaluation's preprocessing).
    """
    from pvt_lightning.runs.rundir import write_file

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device)
    files = explanation_files(model, torch.softmax(logits.float(), dim=1), targets, paths, class_names, count,
                              datamodule.img_size, datamodule.crop_pct, datamodule.mean, datamodule.std)
    folder = Path(output_dir).expanduser()
    for name, content in files.items():
        write_file(folder / name, content, overwrite)
    explained = sum(name.startswith(OVERLAY_DIR + "/") and name.endswith(".png") for name in files)
    return f"Explained {explained} images: {folder / GALLERY_FILE} and {folder / OVERLAY_DIR}/"
