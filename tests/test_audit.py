"""Data audit (pvt_lightning.audit, ``pvt-lightning audit``): duplicates, label issues, the leaks' effect.

Expected values come from brute force or NumPy written here. The slow test trains b0 on scikit-learn's digits
with injected faults (near-copies of val images in train, flipped val labels) and checks what the audit finds.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pvt_lightning.audit.duplicates import exact_pairs, hash_distance, nearest_neighbours
from pvt_lightning.audit.embed import perceptual_hash
from pvt_lightning.audit.labels import (class_thresholds, confident_classes, find_label_issues, label_scores,
                                        out_of_fold_probs, stratified_folds)
from pvt_lightning.audit.records import Record, map_labels, records_from_folder
from pvt_lightning.data.decode import read_image
from pvt_lightning.errors import DataError

CPU = ["--num-workers", "0", "--precision", "32", "--accelerator", "cpu"]


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# --- pieces ------------------------------------------------------------------------------------------------------

def test_chunked_neighbours_equal_the_full_similarity_matrix():
    vectors = F.normalize(torch.randn(301, 16, generator=torch.Generator().manual_seed(0)), dim=1)
    values, indices = nearest_neighbours(vectors, 5, budget_bytes=4 * 301 * 7)  # 7 rows at a time
    full = vectors @ vectors.T
    full.fill_diagonal_(-torch.inf)
    expected = full.topk(5, dim=1)
    assert torch.allclose(values, expected.values, atol=1e-6)
    assert torch.equal(indices, expected.indices)
    assert nearest_neighbours(vectors[:1], 5)[0].shape == (1, 0)  # one image: no neighbour


def test_perceptual_hash_keeps_altered_copies_close_and_other_pictures_far(tmp_path):
    from digits_faults import LEAK_KINDS, leak_copy

    rng = np.random.default_rng(0)
    pictures = [np.clip(cv2_blur(rng.integers(0, 256, (48, 48, 3)).astype(np.uint8)), 0, 255) for _ in range(12)]
    near, far = [], []
    for k, picture in enumerate(pictures):
        source = tmp_path / f"{k}.png"
        from pvt_lightning.data.demo import write_image

        write_image(source, picture)
        copy = leak_copy(source, tmp_path, LEAK_KINDS[k % 3], rng)
        near.append(distance(perceptual_hash(read_image(source)), perceptual_hash(read_image(copy))))
        far += [distance(perceptual_hash(picture), perceptual_hash(other)) for other in pictures[k + 1:]]
    assert max(near) <= 12 and np.median(far) >= 20, (near, sorted(far)[:5])


def cv2_blur(image: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.GaussianBlur(image, (0, 0), 3)


def distance(a: np.ndarray, b: np.ndarray) -> int:
    return int(hash_distance(np.stack([a, b]), np.array([0]), np.array([1]))[0])


def test_exact_pairs_group_equal_digests():
    digests = np.array([[1, 2], [3, 4], [1, 2], [1, 2], [5, 6]], np.uint8)
    assert sorted(exact_pairs(digests, np.arange(5))) == [(0, 2), (0, 3)]
    assert exact_pairs(digests, np.array([1, 3, 4])) == []


def confident_learning_by_hand(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The paper's per-class thresholds and the confident joint's off-diagonal members, in plain loops."""
    n, c = probs.shape
    t = np.array([probs[labels == j, j].mean() for j in range(c)])
    issues = []
    for i in range(n):
        above = [j for j in range(c) if probs[i, j] >= t[j]]
        if above:
            best = max(above, key=lambda j: probs[i, j])
            if best != labels[i]:
                issues.append((i, best))
    return t, np.array(issues)


def test_confident_learning_matches_the_paper_written_out():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, 200)
    logits = rng.normal(0, 1, (200, 4)) + 4.0 * np.eye(4)[labels]
    flipped = rng.choice(200, 15, replace=False)
    labels[flipped] = (labels[flipped] + 1) % 4
    probs = torch.softmax(torch.tensor(logits), dim=1).float()
    t, expected = confident_learning_by_hand(probs.numpy().astype(np.float64), labels)
    labels_t = torch.tensor(labels)
    assert np.allclose(class_thresholds(probs, labels_t).numpy(), t)
    issues = find_label_issues(probs, labels_t, "confident_learning")
    assert sorted((i.row, i.suggested) for i in issues) == sorted(map(tuple, expected.tolist()))
    scores = [i.score for i in issues]
    assert scores == sorted(scores, reverse=True)
    assert len({i.row for i in issues} & set(flipped.tolist())) >= 12  # the flips are what it finds
    # per group, the thresholds are each group's own
    groups = torch.tensor([0] * 100 + [1] * 100)
    grouped = find_label_issues(probs, labels_t, "confident_learning", groups)
    by_hand = [(i, j) for g in (0, 1) for i, j in
               (confident_learning_by_hand(probs.numpy()[g * 100:(g + 1) * 100].astype(np.float64),
                                           labels[g * 100:(g + 1) * 100])[1] + [g * 100, 0]).tolist()]
    assert sorted((i.row, i.suggested) for i in grouped) == sorted(by_hand)
    p = probs.numpy()
    margin = find_label_issues(probs, labels_t)  # normalized margin: every image whose top class is not its label
    assert sorted(i.row for i in margin) == np.flatnonzero(p.argmax(axis=1) != labels).tolist()
    for i in margin:
        others = np.delete(p[i.row], labels[i.row])
        assert i.score == pytest.approx(others.max() - p[i.row, labels[i.row]], abs=1e-6) and i.score > 0
        assert i.suggested == p[i.row].argmax()
    assert [i.score for i in margin] == sorted((i.score for i in margin), reverse=True)
    assert label_scores(probs, labels_t, "self_confidence")[0].item() == pytest.approx(1 - p[0, labels[0]])
    assert (confident_classes(probs, torch.full((4,), 2.0, dtype=torch.float64)) == -1).all()


def test_out_of_fold_heads_predict_images_they_did_not_train_on():
    g = torch.Generator().manual_seed(0)
    truth = torch.arange(120) % 3
    centres = F.normalize(torch.randn(3, 8, generator=g), dim=1)
    features = F.normalize(centres[truth] + 0.15 * torch.randn(120, 8, generator=g), dim=1)
    labels = truth.clone()
    labels[:6] = (truth[:6] + 1) % 3  # six wrong labels: a head that trained on them would repeat them
    folds = stratified_folds(labels, 4)
    assert all(sorted(torch.bincount(folds[labels == c]).tolist()) == [10, 10, 10, 10] for c in range(3))
    probs = out_of_fold_probs(features, labels, 3, k=4)
    assert torch.allclose(probs.sum(dim=1), torch.ones(120), atol=1e-5)
    assert (probs.argmax(dim=1) == truth).float().mean() > 0.95
    assert (probs[:6].argmax(dim=1) == truth[:6]).sum() >= 5  # out of fold, the true class wins
    with pytest.raises(ValueError):
        out_of_fold_probs(features, labels, 3, k=1)


def test_records_from_split_folders_and_from_one_class_folder_root(make_image_folder, tmp_path):
    root = make_image_folder(tmp_path / "split", classes=("a", "b"), per_class=2, size=(8, 8))
    names, records = records_from_folder(root)
    assert names == ["a", "b"] and [r.split for r in records] == ["train"] * 4 + ["val"] * 4
    assert {(Path(r.path).parent.name, r.label) for r in records} == {("a", 0), ("b", 1)}
    flat = make_image_folder(tmp_path / "flat", classes=("b", "c"), per_class=2, size=(8, 8), split=False)
    names, records = records_from_folder(flat)
    assert {r.split for r in records} == {"all"}
    mapped = map_labels(records, names, ["c", "b", "x"])
    assert [r.label for r in mapped] == [1, 1, 0, 0]
    with pytest.raises(DataError, match="not classes of the checkpoint"):
        map_labels(records, names, ["a", "b"])
    with pytest.raises(DataError, match="no such folder"):
        records_from_folder(tmp_path / "missing")
    assert Record("x", 0, "val").split == "val"


# --- the command, on a small folder ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """b0 trained a few steps on 3 colour classes; then an exact copy and a re-encoded copy of val images in train,
    and a test/ split, so every kind of pair exists."""
    import shutil

    from conftest import make_image_folder
    from pvt_lightning.cli.main import main

    base = tmp_path_factory.mktemp("audit")
    data = make_image_folder(base / "data", classes=("a", "b", "c"), per_class=6, size=(32, 32))
    assert main(["--variant", "b0", "--img-size", "32", "32", *CPU, "--data", str(data), "--batch-size", "6",
                 "--epochs", "1", "--limit-train-batches", "2", "--limit-val-batches", "1", "--logdir",
                 str(base / "runs"), "--name", "b0"]) == 0
    shutil.copy(data / "val" / "a" / "000.jpg", data / "train" / "a" / "copy_of_val_000.jpg")
    image = read_image(data / "val" / "b" / "001.jpg")
    from pvt_lightning.data.demo import write_image

    write_image(data / "train" / "b" / "reencoded_val_001.png", image)
    held_out = make_image_folder(base / "held", classes=("a", "b", "c"), per_class=2, size=(32, 32), seed=5)
    (held_out / "val").rename(data / "test")
    (data / "test" / "c" / "broken.jpg").write_bytes(b"not an image")
    return data, base / "runs" / "b0" / "version_0" / "checkpoints" / "last.ckpt"


def test_audit_command_writes_every_file_with_its_columns(small_run, tmp_path, capsys):
    from pvt_lightning.cli.main import main

    data, checkpoint = small_run
    out = tmp_path / "audit"
    assert main(["audit", "--data", str(data), "--checkpoint", str(checkpoint), "--output-dir", str(out),
                 "--num-workers", "1", "--batch-size", "8", "--kfold", "2"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(["duplicates.csv", "duplicates.png", "label_issues.csv",
                                                            "label_issues.png", "audit_report.json", "summary.md"])
    with open(out / "duplicates.csv", newline="") as handle:
        assert handle.readline().strip() == "path_a,path_b,split_a,split_b,similarity"
    with open(out / "label_issues.csv", newline="") as handle:
        assert handle.readline().strip() == "path,split,given_label,suggested_label,score"
    pairs = read_rows(out / "duplicates.csv")
    similarities = [float(row["similarity"]) for row in pairs]
    assert similarities == sorted(similarities, reverse=True)
    found = {frozenset((Path(row["path_a"]).name, Path(row["path_b"]).name)): row for row in pairs}
    exact = found[frozenset(("000.jpg", "copy_of_val_000.jpg"))]
    assert float(exact["similarity"]) == 1.0 and {exact["split_a"], exact["split_b"]} == {"train", "val"}
    assert frozenset(("001.jpg", "reencoded_val_001.png")) in found
    report = json.loads((out / "audit_report.json").read_text())
    assert report["images"] == 3 * 6 * 2 + 2 + 3 * 2 + 1 and report["unreadable"] == 1
    assert report["unreadable_paths"][0].endswith("broken.jpg")
    assert report["splits"] == {"train": 20, "val": 18, "test": 7}
    assert report["duplicates"]["by_split_pair"].get("train-val", 0) >= 2
    assert report["label_issues"]["probabilities"]["train"].startswith("2-fold linear heads")
    assert report["label_issues"]["probabilities"]["val"].startswith("checkpoint (held out")
    effect = report["effect"]["val"]
    assert effect["leaked_images"] >= 2 and effect["all"]["images"] == 18
    assert effect["without_leaked"]["images"] == 18 - effect["leaked_images"]
    assert report["per_class"]["a"]["images"] == {"train": 7, "val": 6, "test": 2}
    steps = report["seconds"]
    assert report["memory"]["bound_bytes"] > 0 and steps["total"] > 0
    assert 0 < steps["embedding"] + steps["duplicates"] + steps["label_issues"] <= steps["total"], steps
    assert "## Duplicates" in (out / "summary.md").read_text()
    assert "duplicate pairs" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    ([], "audit needs --data"),
    (["--kfold", "1"], "--kfold takes 0"),
    (["--label-score", "entropy"], "--label-score"),
])
def test_audit_flag_mistakes_exit_2_with_one_message(small_run, tmp_path, capsys, args, message):
    from pvt_lightning.cli.main import main

    data, checkpoint = small_run
    full = [] if not args else ["--data", str(data), "--checkpoint", str(checkpoint), "--output-dir", str(tmp_path)]
    assert main(["audit", *full, *args]) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error


def test_audit_refuses_existing_files_before_any_work(small_run, tmp_path, capsys):
    from pvt_lightning.cli.main import main

    data, checkpoint = small_run
    (tmp_path / "summary.md").write_text("mine")
    assert main(["audit", "--data", str(data), "--checkpoint", str(checkpoint), "--output-dir", str(tmp_path)]) == 2
    assert "summary.md" in capsys.readouterr().err and (tmp_path / "summary.md").read_text() == "mine"
    assert not (tmp_path / "duplicates.csv").exists()


# --- digits with injected faults, a b0 that learnt them -----------------------------------------------------------

@pytest.mark.slow
def test_audit_finds_leaked_copies_and_flipped_labels_in_digits(tmp_path, capsys):
    """10% of val copied into train (JPEG re-encoded, resized or cropped by 1-2 pixels), 5% of val labels flipped;
    b0 trained 6 epochs at 32x32 (val accuracy about 0.86 against the flipped labels)."""
    import math

    from digits_faults import digits_with_faults
    from pvt_lightning.cli.main import main

    data = tmp_path / "digits"
    faults = digits_with_faults(data)
    assert main(["--variant", "b0", "--img-size", "32", "32", "--data", str(data), "--epochs", "6", "--batch-size",
                 "32", "--lr", "1e-3", "--warmup-epochs", "1", "--num-workers", "1", "--precision", "32",
                 "--accelerator", "cpu", "--logdir", str(tmp_path / "runs"), "--name", "b0", "--logger", "csv"]) == 0
    checkpoint = tmp_path / "runs" / "b0" / "version_0" / "checkpoints" / "last.ckpt"
    out = tmp_path / "audit"
    assert main(["audit", "--data", str(data), "--checkpoint", str(checkpoint), "--output-dir", str(out),
                 "--num-workers", "1"]) == 0
    pairs = read_rows(out / "duplicates.csv")
    across = {frozenset((row["path_a"], row["path_b"])) for row in pairs if row["split_a"] != row["split_b"]}
    leaks = {frozenset(pair) for pair in faults["leaks"]}
    found, false = len(leaks & across), len(across - leaks)
    report = json.loads((out / "audit_report.json").read_text())
    issues = read_rows(out / "label_issues.csv")
    top = {row["path"] for row in issues[:math.ceil(0.05 * report["images"])]}
    flipped = len(top & set(faults["flipped"]))
    print(f"digits audit: {found}/{len(leaks)} leaks found, {false} false cross-split pairs of {len(across)}; "
          f"{flipped}/{len(faults['flipped'])} flipped labels in the top 5% ({len(top)} of {len(issues)} candidates); "
          f"effect {report['effect']['val']}")
    assert found >= 0.95 * len(leaks) and false < 0.05 * len(across)
    assert flipped >= 0.6 * len(faults["flipped"])
    assert report["effect"]["val"]["leaked_images"] >= found
