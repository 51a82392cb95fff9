"""Exact and near-duplicate image pairs, within and across splits, without an N x N similarity matrix.

Exact duplicates share a content hash (BLAKE2b of the file bytes); their similarity is 1. Near-duplicates
are found in three steps:

1. candidates: each image's ``neighbours`` nearest images by embedding cosine similarity, by perceptual
   hash (Hamming distance) and by 16x16 grey thumbnail (correlation), each by a chunked matrix product on
   the device (``chunk`` query rows x N at a time, ``chunk = budget / (4 N)``, 256 MiB by default: no
   N x N matrix ever exists);
2. a candidate needs embedding similarity >= ``min_similarity`` and pHash distance <= ``max_hash_distance``
   (the cross-check): a trained classifier maps every image of a class close together, and small
   pictures of one class share hashes, so either alone pairs look-alikes that are different pictures;
3. confirmation: the grey 32x32 thumbnails (after a cheap unaligned pre-check of their 16x16 versions,
   correlation >= 0.75), aligned by OpenCV's ECC (affine), must correlate at
   >= ``min_correlation``: the same picture re-encoded, resized or slightly cropped aligns almost
   perfectly (0.999+ on the digits test), another picture of the same class does not (<= 0.996 there).

Pairs come most similar (embedding cosine) first.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from pvt_lightning.audit.embed import Embedded
from pvt_lightning.audit.records import Record

DEFAULT_BUDGET = 256 * 2**20
ECC_CRITERIA = (3, 50, 1e-4)  # cv2.TERM_CRITERIA_COUNT | EPS, 50 iterations
PREFILTER_CORRELATION = 0.75
"""Plain correlation of 16x16 thumbnails a candidate needs before the aligned check (altered copies in the
digits test: 0.88 and up), so the ~1 ms alignment runs on few pairs."""
DUPLICATE_COLUMNS = ("path_a", "path_b", "split_a", "split_b", "similarity")


@dataclass(frozen=True)
class Pair:
    """Records ``a`` < ``b`` (indices), their embedding cosine similarity, pHash distance and whether exact."""

    a: int
    b: int
    similarity: float
    hash_distance: int
    exact: bool


def nearest_neighbours(vectors: torch.Tensor, k: int, budget_bytes: int = DEFAULT_BUDGET,
                       device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most similar other rows of each row of ``vectors`` (N, D) by dot product: (values, indices), (N, k).

    Computed ``chunk`` rows at a time against all N, so at most ``budget_bytes`` of scores exist at once.
    """
    n = len(vectors)
    k = min(k, n - 1)
    if k <= 0:
        return torch.zeros(n, 0), torch.zeros(n, 0, dtype=torch.long)
    base = vectors.to(device, torch.float32)
    chunk = max(1, min(n, budget_bytes // (4 * n)))
    values, indices = [], []
    for start in range(0, n, chunk):
        scores = base[start:start + chunk] @ base.T
        rows = torch.arange(len(scores), device=scores.device)
        scores[rows, rows + start] = -torch.inf  # not its own neighbour
        top = scores.topk(k, dim=1)
        values.append(top.values.cpu())
        indices.append(top.indices.cpu())
    return torch.cat(values), torch.cat(indices)


def hash_distance(phash: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamming distances between the packed 64-bit hashes of rows ``a`` and ``b``."""
    return np.unpackbits(phash[a] ^ phash[b], axis=1).sum(axis=1)


def exact_pairs(digests: np.ndarray, rows: np.ndarray) -> list[tuple[int, int]]:
    """Pairs of ``rows`` with equal digests: each member of a group paired with the group's first."""
    groups: dict[bytes, list[int]] = defaultdict(list)
    for row in rows.tolist():
        groups[digests[row].tobytes()].append(row)
    return [(group[0], other) for group in groups.values() for other in group[1:]]


def aligned_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """ECC correlation of grey images ``a`` and ``b`` after aligning ``b`` to ``a`` (affine); -1 if it fails."""
    import cv2

    try:
        correlation, _ = cv2.findTransformECC(a.astype(np.float32), b.astype(np.float32), np.eye(2, 3, dtype=np.float32),
                                              cv2.MOTION_AFFINE, ECC_CRITERIA, None, 1)
    except cv2.error:  # flat images, or no convergence
        return -1.0
    return float(correlation)


def candidate_pairs(embedded: Embedded, rows: np.ndarray, neighbours: int, budget_bytes: int,
                    device: str | torch.device) -> np.ndarray:
    """(M, 2) record pairs a < b: each row's nearest rows by embedding, by perceptual hash and by 16x16 thumbnail
    (the last finds re-encoded and resized copies where a model or the hash sees many look-alikes)."""
    bits = np.unpackbits(embedded.phash[rows], axis=1).astype(np.float32) * 2 - 1
    thumbs = np.zeros((len(rows), 256), np.float32)
    for start in range(0, len(rows), 8192):
        thumbs[start:start + 8192] = small_thumbnails(embedded.thumbnails[rows[start:start + 8192]])
    found = []
    for vectors in (embedded.embeddings[torch.from_numpy(rows)], torch.from_numpy(bits) / 8.0,
                    torch.from_numpy(thumbs)):
        _, local = nearest_neighbours(vectors, neighbours, budget_bytes, device)
        a = np.repeat(rows, local.shape[1])
        b = rows[local.flatten().numpy()]
        found.append(np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1))
    return np.unique(np.concatenate(found), axis=0) if found else np.zeros((0, 2), np.int64)


def pair_measures(embedded: Embedded, keys: np.ndarray, chunk: int = 8192) -> tuple[np.ndarray, ...]:
    """Per candidate pair: embedding cosine, pHash distance and the plain correlation of the 16x16 grey
    thumbnails (a cheap, shift-tolerant pre-check before the aligned one), ``chunk`` pairs at a time."""
    similarity, distances, agreement = [], [], []
    for start in range(0, len(keys), chunk):
        a, b = keys[start:start + chunk, 0], keys[start:start + chunk, 1]
        similarity.append((embedded.embeddings[a] * embedded.embeddings[b]).sum(dim=1).numpy())
        distances.append(hash_distance(embedded.phash, a, b))
        small = [small_thumbnails(embedded.thumbnails[rows]) for rows in (a, b)]
        agreement.append((small[0] * small[1]).sum(axis=1))
    if not similarity:
        return np.zeros(0, np.float32), np.zeros(0, int), np.zeros(0, np.float32)
    return np.concatenate(similarity), np.concatenate(distances), np.concatenate(agreement)


def small_thumbnails(thumbnails: np.ndarray) -> np.ndarray:
    """(M, 32, 32) uint8 -> (M, 256) zero-mean unit vectors of the 2x2-averaged 16x16 thumbnails."""
    small = thumbnails.reshape(len(thumbnails), 16, 2, 16, 2).astype(np.float32).mean(axis=(2, 4)).reshape(-1, 256)
    small -= small.mean(axis=1, keepdims=True)
    return small / np.maximum(np.linalg.norm(small, axis=1, keepdims=True), 1e-6)


def find_duplicates(embedded: Embedded, neighbours: int = 10, min_similarity: float = 0.85,
                    max_hash_distance: int = 20, min_correlation: float = 0.997, budget_bytes: int = DEFAULT_BUDGET,
                    device: str | torch.device = "cpu", workers: int = 1) -> tuple[list[Pair], float]:
    """Exact and near-duplicate pairs among the readable records (see the module docstring) and the seconds taken."""
    from concurrent.futures import ThreadPoolExecutor

    start = time.perf_counter()
    rows = np.flatnonzero(embedded.readable)
    exact = {tuple(sorted(p)) for p in exact_pairs(embedded.digests, rows)}
    keys = candidate_pairs(embedded, rows, neighbours, budget_bytes, device)
    if exact and len(keys):
        keys = keys[[tuple(k) not in exact for k in keys.tolist()]]
    similarity, distances, agreement = pair_measures(embedded, keys)
    passed = (similarity >= min_similarity) & (distances <= max_hash_distance) & (agreement >= PREFILTER_CORRELATION)
    keys, similarity, distances = keys[passed], similarity[passed], distances[passed]
    thumbs = embedded.thumbnails
    correlation: list[float] = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # OpenCV releases the GIL
        for first in range(0, len(keys), 4096):  # map() submits every task at once: a future per pair in memory
            batch = keys[first:first + 4096].tolist()
            correlation += pool.map(lambda k: aligned_correlation(thumbs[k[0]], thumbs[k[1]]), batch)
    pairs = [Pair(i, j, 1.0, int(hash_distance(embedded.phash, np.array([i]), np.array([j]))[0]), True)
             for i, j in sorted(exact)]
    pairs += [Pair(int(i), int(j), float(s), int(d), False)
              for (i, j), s, d, c in zip(keys.tolist(), similarity, distances, correlation) if c >= min_correlation]
    pairs.sort(key=lambda p: (-p.similarity, p.hash_distance, p.a, p.b))
    return pairs, time.perf_counter() - start


def duplicate_rows(pairs: Sequence[Pair], records: Sequence[Record]) -> list[list[str]]:
    """``duplicates.csv`` rows: path_a, path_b, split_a, split_b, similarity (most similar first)."""
    return [[records[p.a].path, records[p.b].path, records[p.a].split, records[p.b].split, f"{p.similarity:.6f}"]
            for p in pairs]


def leaked(pairs: Sequence[Pair], records: Sequence[Record], held_out: str, training: str = "train") -> set[int]:
    """Records of split ``held_out`` that have a duplicate in split ``training`` (they leak into its figures)."""
    found = set()
    for p in pairs:
        splits = (records[p.a].split, records[p.b].split)
        if splits == (held_out, training):
            found.add(p.a)
        elif splits == (training, held_out):
            found.add(p.b)
    return found
