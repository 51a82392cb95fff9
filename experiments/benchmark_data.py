#!/usr/bin/env python
"""Large-dataset benchmark: indexing a tree of small real JPEGs, loader workers' memory over an epoch, and
the time to the first training batch (results: experiments/results/large_datasets.md).

    python experiments/benchmark_data.py --files 1000000 --classes 1000 --writers 4

1. Writes ROOT/train/<class>/<n>.jpg (16x16 JPEGs, several writer processes) plus one val image per class.
2. Times listing it: torchvision's ``ImageFolder`` and this package's index (no cache), interleaved ABBA,
   then the index cache: first run (list + save) and second run (reused).
3. Loader workers' unique memory (USS, psutil) at the first and at the last batch of one epoch over the
   first ``--uss-samples`` training samples, for the former design (a Python list of (path, label) tuples
   in the dataset) and the current one (SampleIndex arrays); growth per 100k samples.
4. Time from a new data module to its first training batch, with the index listed, then reused.
5. Deletes the tree (unless --keep).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import cv2
import numpy as np
import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from pvt_lightning.data import ImageFolderDataModule  # noqa: E402
from pvt_lightning.data.dataset import BadImageLog, ImageDataset  # noqa: E402
from pvt_lightning.data.decode import read_image  # noqa: E402
from pvt_lightning.data.resume import ShuffleSampler  # noqa: E402


def write_class(job: tuple[str, int, int, int]) -> int:
    """One class folder of ``count`` 16x16 JPEGs (16 distinct encodings, written round-robin)."""
    root, label, count, seed = job
    rng = np.random.default_rng(seed + label)
    encoded = [cv2.imencode(".jpg", rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))[1].tobytes()
               for _ in range(16)]
    for split, n in (("train", count), ("val", 1)):
        folder = Path(root) / split / f"class_{label:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            with open(folder / f"{i:06d}.jpg", "wb") as handle:
                handle.write(encoded[i % 16])
    return count + 1


def generate(root: Path, files: int, classes: int, writers: int) -> float:
    started = time.perf_counter()
    jobs = [(str(root), label, files // classes + (label < files % classes), 0) for label in range(classes)]
    with Pool(writers) as pool:
        written = sum(pool.imap_unordered(write_class, jobs, chunksize=4))
    print(f"wrote {written} files in {time.perf_counter() - started:.0f} s", flush=True)
    return time.perf_counter() - started


def time_index(root: Path, cache: Path | None) -> tuple[float, ImageFolderDataModule]:
    started = time.perf_counter()
    dm = ImageFolderDataModule(root, img_size=16, num_workers=0, index_cache=cache if cache else False)
    dm.setup("fit")
    return time.perf_counter() - started, dm


def time_torchvision(root: Path) -> float:
    from torchvision.datasets import ImageFolder

    started = time.perf_counter()
    ImageFolder(str(root / "train"))
    return time.perf_counter() - started


def indexing(root: Path, cache: Path) -> dict:
    """ABBA-interleaved listing times, then the cache's first and second run."""
    tv, ours = [], []
    for order in ("tv", "ours", "ours", "tv"):
        if order == "tv":
            tv.append(time_torchvision(root))
        else:
            ours.append(time_index(root, None)[0])
        print(f"{order}: {(tv if order == 'tv' else ours)[-1]:.1f} s", flush=True)
    first, dm = time_index(root, cache)
    second, again = time_index(root, cache)
    assert not dm.index_reused and again.index_reused
    return {"torchvision_s": tv, "ours_s": ours, "ratio": sum(ours) / sum(tv), "cache_first_s": first,
            "cache_second_s": second, "train_samples": dm.split_sizes()["train"],
            "index_mib": dm.samples("train").nbytes() / 2**20, "cache_file_mib": dm.index_file.stat().st_size / 2**20}


class TupleListDataset(torch.utils.data.Dataset):
    """The former design: the dataset holds a Python list of (path, label) tuples."""

    def __init__(self, samples: list[tuple[str, int]]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        return torch.from_numpy(read_image(path)).permute(2, 0, 1), label


def worker_uss_growth(dataset, workers: int, batch_size: int = 512) -> list[float]:
    """MiB each worker's USS grew between the first and the last batch of one shuffled epoch."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                         sampler=ShuffleSampler(len(dataset), seed=1))
    iterator = iter(loader)
    next(iterator)
    processes = [psutil.Process(worker.pid) for worker in iterator._workers]
    before = [p.memory_full_info().uss for p in processes]
    for k, _ in enumerate(iterator, start=2):
        if k == len(loader) - 1:
            after = [p.memory_full_info().uss for p in processes]
    del iterator
    return [(b - a) / 2**20 for a, b in zip(before, after)]


def memory(dm: ImageFolderDataModule, samples: int, workers: int) -> dict:
    subset = dm.samples("train").take(np.arange(min(samples, len(dm.samples("train")))))
    log = BadImageLog(Path(tempfile.mkdtemp()) / "bad.txt")
    after = ImageDataset(subset, lambda image: {"image": image}, log)
    before = TupleListDataset(list(subset))
    result = {"samples": len(subset), "workers": workers}
    for name, dataset in (("before", before), ("after", after)):
        started = time.perf_counter()
        result[name] = worker_uss_growth(dataset, workers)
        print(f"USS growth {name}: {result[name]} MiB ({time.perf_counter() - started:.0f} s)", flush=True)
    return result


def first_batch(root: Path, cache: Path, workers: int) -> dict:
    out = {}
    for name in ("listed", "reused"):
        started = time.perf_counter()
        dm = ImageFolderDataModule(root, img_size=16, batch_size=256, num_workers=workers, index_cache=cache)
        dm.setup("fit")
        next(iter(dm.train_dataloader()))
        out[name] = time.perf_counter() - started
        print(f"first batch ({name} index): {out[name]:.1f} s", flush=True)
    return out


def report(args, generated_s: float, index: dict, uss: dict, first: dict) -> str:
    per_100k = {k: np.mean(uss[k]) / uss["samples"] * 1e5 for k in ("before", "after")}
    scale = index["train_samples"] / uss["samples"]
    lines = [
        "# Large datasets: indexing, worker memory, first batch", "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores **shared with other agents** "
        f"(timings swing; ratios were measured interleaved), Python {platform.python_version()}, torch "
        f"{torch.__version__}. Command: `python experiments/benchmark_data.py {' '.join(sys.argv[1:])}`.", "",
        f"Tree: {index['train_samples']:,} train JPEGs of 16x16 in {args.classes} class folders (+1 val image "
        f"each), written by {args.writers} processes in {generated_s:.0f} s, deleted afterwards.", "",
        "| measure | value |", "|---|---|",
        f"| torchvision `ImageFolder` listing (ABBA runs) | {', '.join(f'{t:.1f}' for t in index['torchvision_s'])} s |",
        f"| our index, no cache (ABBA runs; lists train/ and val/) | {', '.join(f'{t:.1f}' for t in index['ours_s'])} s |",
        f"| ratio ours / torchvision (goal <= 1.0x) | **{index['ratio']:.2f}x** |",
        f"| index cache, first run (list + write .npz) | {index['cache_first_s']:.1f} s |",
        f"| index cache, second run (reused; goal < 5 s) | **{index['cache_second_s']:.2f} s** |",
        f"| index in memory (train) / cache file | {index['index_mib']:.0f} MiB / {index['cache_file_mib']:.0f} MiB |",
        f"| worker USS growth over one epoch, before (list of tuples), {uss['samples']:,} samples, {uss['workers']} "
        f"workers | {', '.join(f'{m:.1f}' for m in uss['before'])} MiB = {per_100k['before']:.1f} MiB per 100k |",
        f"| same, after (SampleIndex arrays) | {', '.join(f'{m:.1f}' for m in uss['after'])} MiB = "
        f"**{per_100k['after']:.2f} MiB per 100k** (goal < 5) |",
        f"| extrapolated to the {index['train_samples']:,}-sample epoch, per worker | before "
        f"{np.mean(uss['before']) * scale:.0f} MiB, after {np.mean(uss['after']) * scale:.1f} MiB |",
        f"| time to first training batch, index listed / reused ({args.workers} workers) | "
        f"{first['listed']:.1f} s / {first['reused']:.1f} s |",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "pvt_benchmark_tree")
    parser.add_argument("--files", type=int, default=1_000_000)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2, help="loader workers")
    parser.add_argument("--uss-samples", type=int, default=200_000)
    parser.add_argument("--output", type=Path, default=None, help="write the markdown table here")
    parser.add_argument("--keep", action="store_true", help="keep the generated tree")
    args = parser.parse_args()
    if args.root.exists():
        raise SystemExit(f"{args.root} exists; remove it or choose another --root")
    cache = Path(tempfile.mkdtemp(prefix="pvt_benchmark_cache_"))
    try:
        generated_s = generate(args.root, args.files, args.classes, args.writers)
        index = indexing(args.root, cache)
        _, dm = time_index(args.root, cache)
        uss = memory(dm, args.uss_samples, args.workers)
        first = first_batch(args.root, cache / "first_batch", args.workers)
        text = report(args, generated_s, index, uss, first)
        print(text)
        if args.output:
            args.output.write_text(text)
    finally:
        if not args.keep:
            started = time.perf_counter()
            shutil.rmtree(args.root, ignore_errors=True)
            print(f"deleted the tree in {time.perf_counter() - started:.0f} s", flush=True)
        shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
