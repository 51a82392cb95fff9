"""The audit's files: duplicates.csv, label_issues.csv, their galleries, audit_report.json and summary.md."""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import torch
from torchmetrics.classification import MulticlassAccuracy, MulticlassPrecision, MulticlassRecall

from pvt_lightning.audit.duplicates import DUPLICATE_COLUMNS, Pair, duplicate_rows, leaked
from pvt_lightning.audit.labels import LABEL_COLUMNS, LabelIssue
from pvt_lightning.audit.records import HELD_OUT, Record, split_counts
from pvt_lightning.data.decode import read_image
from pvt_lightning.errors import BadImageError
from pvt_lightning.evaluation.gallery import gallery_png, side_by_side

AUDIT_FILES = ("duplicates.csv", "duplicates.png", "label_issues.csv", "label_issues.png", "audit_report.json",
               "summary.md")
GALLERY_SIZE = 24
THUMBNAIL = 96


def csv_text(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(columns)
    writer.writerows(rows)
    return out.getvalue()


def label_rows(issues: Sequence[LabelIssue], rows: Sequence[int], records: Sequence[Record],
               class_names: Sequence[str]) -> list[list[str]]:
    """``label_issues.csv`` rows; ``rows[issue.row]`` is the issue's record."""
    out = []
    for issue in issues:
        record = records[rows[issue.row]]
        out.append([record.path, record.split, class_names[record.label], class_names[issue.suggested],
                    f"{issue.score:.6f}"])
    return out


def figures(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, float | int]:
    """Accuracy, macro precision and macro recall (torchmetrics, as training logs them) and the image count."""
    if len(labels) == 0:
        return {"images": 0, "accuracy": None, "precision": None, "recall": None}
    return {"images": len(labels), "accuracy": MulticlassAccuracy(num_classes, average="micro")(logits, labels).item(),
            "precision": MulticlassPrecision(num_classes, average="macro")(logits, labels).item(),
            "recall": MulticlassRecall(num_classes, average="macro")(logits, labels).item()}


def leak_effect(pairs: Sequence[Pair], records: Sequence[Record], logits: torch.Tensor, readable: Sequence[bool],
                num_classes: int) -> dict[str, dict[str, Any]]:
    """Per held-out split: the checkpoint's figures on all its readable images and without those leaked from train."""
    effect = {}
    for split in HELD_OUT:
        rows = [i for i, r in enumerate(records) if r.split == split and readable[i] and r.label >= 0]
        if not rows:
            continue
        leaks = leaked(pairs, records, split)
        clean = [i for i in rows if i not in leaks]
        labels = torch.tensor([records[i].label for i in rows])
        clean_labels = torch.tensor([records[i].label for i in clean], dtype=torch.long)
        effect[split] = {"leaked_images": len(rows) - len(clean), "all": figures(logits[rows], labels, num_classes),
                         "without_leaked": figures(logits[clean], clean_labels, num_classes)}
    return effect


def class_counts(records: Sequence[Record], class_names: Sequence[str], pairs: Sequence[Pair],
                 issues: Sequence[LabelIssue], rows: Sequence[int]) -> dict[str, dict[str, Any]]:
    """Per class: images per split, images in a duplicate pair (within a split / across splits), label issues."""
    counts = split_counts(records, class_names)
    within, across = Counter(), Counter()
    for p in pairs:
        target = within if records[p.a].split == records[p.b].split else across
        for i in {p.a, p.b}:
            target[records[i].label] += 1
    issues_by_class = Counter(records[rows[issue.row]].label for issue in issues)
    return {name: {"images": counts[name], "in_duplicate_pairs_within_split": within[i],
                   "in_duplicate_pairs_across_splits": across[i], "label_issues": issues_by_class[i]}
            for i, name in enumerate(class_names)}


def thumbnail(path: str):
    try:
        return read_image(path, min_side=THUMBNAIL)
    except BadImageError:
        import numpy as np

        return np.full((THUMBNAIL, THUMBNAIL, 3), 128, np.uint8)


def duplicates_png(pairs: Sequence[Pair], records: Sequence[Record], limit: int = GALLERY_SIZE) -> bytes:
    tiles, captions = [], []
    for p in pairs[:limit]:
        a, b = records[p.a], records[p.b]
        tiles.append(side_by_side([thumbnail(a.path), thumbnail(b.path)], height=THUMBNAIL))
        captions.append(f"{a.split} | {b.split}  sim {p.similarity:.3f}{' exact' if p.exact else ''}\n"
                        f"{Path(a.path).name[:16]} | {Path(b.path).name[:16]}")
    return gallery_png(tiles, captions, f"closest pairs ({len(pairs)} in duplicates.csv)", columns=4)


def label_issues_png(issues: Sequence[LabelIssue], rows: Sequence[int], records: Sequence[Record],
                     class_names: Sequence[str], limit: int = GALLERY_SIZE) -> bytes:
    tiles, captions = [], []
    for issue in issues[:limit]:
        record = records[rows[issue.row]]
        tiles.append(side_by_side([thumbnail(record.path)], height=THUMBNAIL))
        captions.append(f"given {class_names[record.label]} -> {class_names[issue.suggested]}\n"
                        f"score {issue.score:.3f} ({record.split})\n{Path(record.path).name[:24]}")
    return gallery_png(tiles, captions, f"most suspect labels ({len(issues)} in label_issues.csv)", columns=6)


def summary_markdown(report: dict[str, Any]) -> str:
    """summary.md: what was audited, what was found, the effect of the leaks, per-class counts."""
    dup = report["duplicates"]
    lines = [f"# Data audit of {report['data']}", "",
             f"Checkpoint `{report['checkpoint']}`; {report['images']} images ({report['unreadable']} unreadable); "
             f"{report['seconds']['total']:.1f} s.", "",
             "## Duplicates", "",
             f"{dup['pairs']} pairs ({dup['exact_pairs']} exact): {dup['within_split']} within a split, "
             f"{dup['across_splits']} across splits. Near-duplicates: embedding cosine >= {dup['min_similarity']}, "
             f"pHash distance <= {dup['max_hash_distance']}/64 and aligned thumbnail correlation >= "
             f"{dup['min_correlation']}.", "",
             "| split pair | pairs |", "|---|---:|"]
    lines += [f"| {key} | {value} |" for key, value in dup["by_split_pair"].items()]
    labels = report["label_issues"]
    lines += ["", "## Label issues", "", f"{labels['candidates']} candidates ({labels['rule']}), ranked by "
              f"{labels['score']}. Probabilities: " + "; ".join(f"{k}: {v}" for k, v in labels["probabilities"].items()),
              "", "## Effect of leaked duplicates on held-out figures", "",
              "| split | images | leaked | accuracy all / without | macro precision | macro recall |",
              "|---|---:|---:|---|---|---|"]
    for split, e in report["effect"].items():
        a, w = e["all"], e["without_leaked"]
        cells = [f"{_f(a[k])} / {_f(w[k])}" for k in ("accuracy", "precision", "recall")]
        lines.append(f"| {split} | {a['images']} | {e['leaked_images']} | " + " | ".join(cells) + " |")
    lines += ["", "## Per class", "", "| class | images | dup. pairs within / across | label issues |", "|---|---|---|---:|"]
    for name, c in report["per_class"].items():
        images = ", ".join(f"{s} {n}" for s, n in c["images"].items())
        lines.append(f"| {name} | {images} | {c['in_duplicate_pairs_within_split']} / "
                     f"{c['in_duplicate_pairs_across_splits']} | {c['label_issues']} |")
    return "\n".join(lines) + "\n"


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def write_audit(output_dir: Path, files: dict[str, str | bytes], overwrite: bool = False) -> list[Path]:
    from pvt_lightning.runs.rundir import write_file

    return [write_file(output_dir / name, content, overwrite) for name, content in files.items()]


def report_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, allow_nan=False) + "\n"


def duplicates_csv(pairs: Sequence[Pair], records: Sequence[Record]) -> str:
    return csv_text(DUPLICATE_COLUMNS, duplicate_rows(pairs, records))


def label_issues_csv(issues: Sequence[LabelIssue], rows: Sequence[int], records: Sequence[Record],
                     class_names: Sequence[str]) -> str:
    return csv_text(LABEL_COLUMNS, label_rows(issues, rows, records, class_names))
