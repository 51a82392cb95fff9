"""``pvt-lightning audit``: duplicates across and within splits, and label-issue candidates, of an image folder.

    pvt-lightning audit --data ROOT --checkpoint CKPT --output-dir DIR [--kfold K]

Writes duplicates.csv/.png, label_issues.csv/.png, audit_report.json and summary.md into ``--output-dir``
(see docs/audit.md). The checkpoint gives the classes, the input size and the embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch
from jsonargparse.typing import NonNegativeInt, OpenUnitInterval, PositiveInt

from pvt_lightning.audit import AuditSettings, records_from_folder, run_audit
from pvt_lightning.audit.records import map_labels
from pvt_lightning.audit.report import AUDIT_FILES, write_audit
from pvt_lightning.cli.assemble import say
from pvt_lightning.cli.options import option
from pvt_lightning.data.datamodule import default_num_workers
from pvt_lightning.errors import UsageError
from pvt_lightning.export.runtime import load_classifier
from pvt_lightning.models.registry import Preprocessing
from pvt_lightning.runs.io import check_output

LABEL_SCORE_NAMES = ("normalized_margin", "self_confidence", "confident_learning")


@dataclass
class AuditConfig:
    """Options of ``pvt-lightning audit``."""

    data: Optional[str] = option(None, "ImageFolder root with train/ and val/ (optional test/) class folders, or one "
                                 "class-folder root (split 'all')", "audit", metavar="ROOT")
    checkpoint: Optional[str] = option(None, "trained .ckpt: its classes, input size and embeddings", "audit",
                                       metavar="CKPT")
    output_dir: Optional[str] = option(None, "folder for duplicates.csv/.png, label_issues.csv/.png, "
                                       "audit_report.json and summary.md", "audit", metavar="DIR")
    kfold: NonNegativeInt = option(0, "K >= 2: out-of-sample probabilities for the training split from K-fold "
                                   "linear heads on the frozen embeddings (0: the checkpoint's)", "audit",
                                   metavar="K")
    label_score: Literal[LABEL_SCORE_NAMES] = option("normalized_margin", "label issues: normalized_margin (best "
                                                     "other class minus given) or self_confidence (1 - p(given)) "
                                                     "rank the images whose top class is not their label; "
                                                     "confident_learning keeps those above per-class thresholds",
                                                     "audit")
    min_similarity: OpenUnitInterval = option(0.85, "near-duplicate candidates: lowest embedding cosine similarity",
                                              "audit")
    max_hash_distance: NonNegativeInt = option(20, "near-duplicate candidates: most differing bits of the 64-bit "
                                               "perceptual hash (the cross-check)", "audit")
    min_correlation: OpenUnitInterval = option(0.997, "near-duplicates: lowest correlation of the grey 32x32 "
                                               "thumbnails after alignment (confirms a candidate)", "audit")
    neighbours: PositiveInt = option(10, "nearest neighbours looked at per image", "audit")
    search_memory_mb: PositiveInt = option(256, "memory for the similarity search's score chunks (MiB)", "audit")
    img_size: Optional[list[PositiveInt]] = option(None, "input height and width (default: the checkpoint's)",
                                                   "audit", nargs=2, metavar=("H", "W"))
    crop_pct: Optional[float] = option(None, "resize to size/crop_pct, then centre crop (default: the "
                                       "checkpoint's, as evaluation)", "audit")
    batch_size: PositiveInt = option(256, "images per batch on the device", "audit")
    num_workers: Optional[NonNegativeInt] = option(None, "data-loader workers (default: min(8, CPUs))", "audit")
    device: Literal["auto", "cpu", "cuda"] = option("auto", "where the model runs (auto: cuda if available)", "audit")
    seed: int = option(0, "seed of the k-fold split", "audit")
    overwrite: bool = option(False, "replace existing files in --output-dir", "audit")


def check_audit_config(config: AuditConfig) -> None:
    for name in ("data", "checkpoint", "output_dir"):
        if getattr(config, name) is None:
            raise UsageError(f"audit needs --{name.replace('_', '-')}: pvt-lightning audit --data ROOT "
                             "--checkpoint CKPT --output-dir DIR")
    if config.kfold == 1:
        raise UsageError("--kfold takes 0 (off) or K >= 2 folds")


CONFIG = AuditConfig


def run(config: AuditConfig) -> int:
    """Audit ``--data`` with ``--checkpoint`` and write the files into ``--output-dir``."""
    check_audit_config(config)
    output_dir = Path(config.output_dir).expanduser()
    for name in AUDIT_FILES:
        check_output(output_dir / name, config.overwrite, flag="--output-dir")
    checkpoint = Path(config.checkpoint).expanduser()
    module = load_classifier(checkpoint)
    class_names = list(module.hparams.class_names)
    data_names, records = records_from_folder(config.data)
    records = map_labels(records, data_names, class_names)
    if config.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here; use --device cpu")
    device = "cuda" if config.device == "auto" and torch.cuda.is_available() else config.device.replace("auto", "cpu")
    preprocessing = Preprocessing.from_dict(dict(module.hparams)).replace(img_size=config.img_size,
                                                                          crop_pct=config.crop_pct)
    settings = AuditSettings(
        img_size=preprocessing.img_size, crop_pct=preprocessing.crop_pct, mean=preprocessing.mean,
        std=preprocessing.std, batch_size=config.batch_size, device=device, neighbours=config.neighbours,
        num_workers=default_num_workers() if config.num_workers is None else config.num_workers,
        min_similarity=config.min_similarity, max_hash_distance=config.max_hash_distance,
        min_correlation=config.min_correlation,
        label_score=config.label_score, kfold=config.kfold, seed=config.seed,
        budget_bytes=config.search_memory_mb * 2**20)
    say(f"Auditing {len(records)} images of {config.data} with {checkpoint.name} on {device}")
    report, files = run_audit(module.model, records, class_names, settings,
                              info={"data": str(config.data), "checkpoint": str(checkpoint)}, log=say)
    write_audit(output_dir, files, config.overwrite)
    dup, labels = report["duplicates"], report["label_issues"]
    say(f"{dup['pairs']} duplicate pairs ({dup['exact_pairs']} exact, {dup['across_splits']} across splits), "
        f"{labels['candidates']} label-issue candidates, {report['unreadable']} unreadable images; "
        f"{report['seconds']['total']:.1f} s")
    for split, effect in report["effect"].items():
        a, w = effect["all"], effect["without_leaked"]
        say(f"{split}: accuracy {a['accuracy']:.4f} on all {a['images']} images, "
            f"{w['accuracy'] if w['accuracy'] is not None else float('nan'):.4f} without the "
            f"{effect['leaked_images']} leaked from train")
    say(f"Wrote {', '.join(files)} to {output_dir}")
    return 0
