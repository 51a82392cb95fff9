"""One data audit, from records and a model to the files: duplicates, label issues, the leaks' effect."""

from __future__ import annotations

import resource
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from pvt_lightning.audit.duplicates import DEFAULT_BUDGET, find_duplicates
from pvt_lightning.audit.embed import DIGEST_BYTES, PHASH_BITS, THUMBNAIL, Embedded, embed
from pvt_lightning.audit.labels import find_label_issues, out_of_fold_probs
from pvt_lightning.audit.records import HELD_OUT, Record
from pvt_lightning.audit import report as files_of
from pvt_lightning.errors import DataError, printable

TRAINED_ON = ("train", "all")
"""Splits the checkpoint may have trained on: their probabilities are in-sample unless ``kfold`` is set."""


@dataclass
class AuditSettings:
    """How to read the images (the checkpoint's preprocessing), where to run, and the audit's thresholds."""

    img_size: tuple[int, int]
    crop_pct: float = 0.875
    mean: Sequence[float] = (0.485, 0.456, 0.406)
    std: Sequence[float] = (0.229, 0.224, 0.225)
    batch_size: int = 256
    num_workers: int = 2
    device: str = "cpu"
    neighbours: int = 10
    min_similarity: float = 0.85
    max_hash_distance: int = 20
    min_correlation: float = 0.997
    label_score: str = "normalized_margin"
    kfold: int = 0
    seed: int = 0
    budget_bytes: int = DEFAULT_BUDGET
    max_image_pixels: int | None = None


def memory_bound(n: int, model: nn.Module, budget_bytes: int) -> int:
    """Bytes the audit's arrays take for ``n`` images: per image the embedding, logits, hashes, thumbnail and the
    hash and thumbnail vectors of the neighbour search; plus the search budget (the model, the loader's batches in
    flight, the candidate pairs and Python's per-record objects come on top)."""
    kept = 4 * model.num_features + 4 * model.num_classes + DIGEST_BYTES + PHASH_BITS // 8 + THUMBNAIL**2 + 1
    per_image = kept + 4 * PHASH_BITS + 4 * 256
    return n * per_image + budget_bytes


def label_probabilities(embedded: Embedded, records: Sequence[Record], rows: Sequence[int], num_classes: int,
                        settings: AuditSettings) -> tuple[torch.Tensor, dict[str, str]]:
    """Probabilities of the labelled readable ``rows`` for the label audit, and where each split's come from."""
    probs = torch.softmax(embedded.logits[list(rows)], dim=1)
    splits = list(dict.fromkeys(records[i].split for i in rows))
    source = {s: "checkpoint (held out from its training)" if s in HELD_OUT else
              "checkpoint (in-sample if it trained on them; --kfold K gives out-of-sample ones)" for s in splits}
    if settings.kfold >= 2:
        for split in (s for s in splits if s in TRAINED_ON):
            chosen = [k for k, i in enumerate(rows) if records[i].split == split]
            members = [rows[k] for k in chosen]
            labels = torch.tensor([records[i].label for i in members])
            probs[chosen] = out_of_fold_probs(embedded.embeddings[members], labels, num_classes, settings.kfold,
                                              settings.seed, settings.device)
            source[split] = (f"{settings.kfold}-fold linear heads on the frozen embeddings (out-of-sample for the "
                             "head, not for the backbone)")
    return probs, source


def run_audit(model: nn.Module, records: Sequence[Record], class_names: Sequence[str], settings: AuditSettings,
              info: dict[str, Any] | None = None, log: Callable[[str], None] | None = None
              ) -> tuple[dict[str, Any], dict[str, str | bytes]]:
    """Embed every record, find duplicates and label issues; returns the report and the files (name -> content)."""
    if not records:
        raise DataError("nothing to audit: no images were found")
    start = time.perf_counter()
    embedded = embed(model, records, settings.img_size, settings.crop_pct, settings.mean, settings.std,
                     settings.batch_size, settings.num_workers, settings.device, settings.max_image_pixels, log)
    if not embedded.readable.any():
        raise DataError(f"none of the {len(records)} images could be read (e.g. {printable(records[0].path)})")
    pairs, dup_seconds = find_duplicates(embedded, settings.neighbours, settings.min_similarity,
                                         settings.max_hash_distance, settings.min_correlation, settings.budget_bytes,
                                         settings.device, settings.num_workers)
    label_start = time.perf_counter()
    rows = [i for i in range(len(records)) if embedded.readable[i] and records[i].label >= 0]
    probs, source = label_probabilities(embedded, records, rows, len(class_names), settings)
    split_ids = {split: k for k, split in enumerate(dict.fromkeys(r.split for r in records))}
    issues = find_label_issues(probs, torch.tensor([records[i].label for i in rows], dtype=torch.long),
                               settings.label_score, torch.tensor([split_ids[records[i].split] for i in rows]))
    seconds = {"embedding": embedded.seconds, "duplicates": dup_seconds,
               "label_issues": time.perf_counter() - label_start}
    report = {**(info or {}), "images": len(records), "unreadable": len(embedded.unreadable),
              "unreadable_paths": [records[i].path for i in embedded.unreadable[:100]],
              "class_names": list(class_names), "splits": dict(Counter(r.split for r in records)),
              "duplicates": duplicate_summary(pairs, records, settings),
              "label_issues": {"candidates": len(issues), "score": settings.label_score, "probabilities": source,
                               "rule": ("given label != the most probable class above its per-class threshold "
                                       "(confident learning, Northcutt et al. 2021; thresholds per split)"
                                       if settings.label_score == "confident_learning" else
                                       "given label != the most probable class")},
              "effect": files_of.leak_effect(pairs, records, embedded.logits, embedded.readable, len(class_names)),
              "per_class": files_of.class_counts(records, class_names, pairs, issues, rows)}
    files = {"duplicates.csv": files_of.duplicates_csv(pairs, records),
             "duplicates.png": files_of.duplicates_png(pairs, records),
             "label_issues.csv": files_of.label_issues_csv(issues, rows, records, class_names),
             "label_issues.png": files_of.label_issues_png(issues, rows, records, class_names)}
    seconds["total"] = time.perf_counter() - start
    report["seconds"] = seconds
    report["memory"] = {"bound_bytes": memory_bound(len(records), model, settings.budget_bytes),
                        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    files["audit_report.json"] = files_of.report_json(report)
    files["summary.md"] = files_of.summary_markdown(report)
    return report, files


def duplicate_summary(pairs, records: Sequence[Record], settings: AuditSettings) -> dict[str, Any]:
    by_split = Counter("-".join(sorted((records[p.a].split, records[p.b].split))) for p in pairs)
    across = sum(records[p.a].split != records[p.b].split for p in pairs)
    return {"pairs": len(pairs), "exact_pairs": sum(p.exact for p in pairs), "within_split": len(pairs) - across,
            "across_splits": across, "by_split_pair": dict(by_split), "min_similarity": settings.min_similarity,
            "max_hash_distance": settings.max_hash_distance, "min_correlation": settings.min_correlation,
            "neighbours": settings.neighbours}
