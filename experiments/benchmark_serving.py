#!/usr/bin/env python
"""Served throughput and latency vs offline inference of the same model on the same CPU, interleaved.

    python experiments/benchmark_serving.py --variant b0 --img-size 224 --rounds 3 \\
        --output experiments/results/serving.md

Per round, in turn: offline batch-16 throughput (in-process: the model alone on preprocessed crops, and end to
end: decode + crop + normalise + model), the server at concurrency 16 (``pvt-lightning serve`` with dynamic
batching, clients from ``serve_load_test.py`` in this process), offline batch-1 latency (end to end, one image
at a time) and the server at concurrency 1. Ratios are taken within each round and their median reported, so
other load on a shared machine hits both sides alike; run it with ``setsid`` so that, under Linux's autogroup
scheduling, the server and the offline side share one CPU share, apart from your other jobs. Images: real JPEG files (``--images``, or 64 generated
500x375 ones). ``--model`` serves a given .onnx/.pt2/.ckpt; ``--variant`` exports a random-weight ONNX first.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from serve_load_test import load_images, run_load  # noqa: E402


def synthetic_jpegs(folder: Path, count: int = 64, size: tuple[int, int] = (375, 500)) -> Path:
    """Smooth photo-like JPEGs (gradients, shapes, mild noise): decoding costs what a photo of that size costs."""
    import cv2

    from pvt_lightning.data.demo import write_image

    rng = np.random.default_rng(0)
    for i in range(count):
        h, w = size
        base = np.linspace(rng.uniform(0, 255, 3), rng.uniform(0, 255, 3), w, dtype=np.float32)[None].repeat(h, 0)
        for _ in range(6):
            centre = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            cv2.circle(base, centre, int(rng.integers(10, 120)), rng.uniform(0, 255, 3).tolist(), -1)
        image = np.clip(cv2.GaussianBlur(base, (0, 0), 3) + rng.normal(0, 4, base.shape), 0, 255).astype(np.uint8)
        write_image(folder / f"{i:03d}.jpg", image, 90)
    return folder


def export_variant(variant: str, img_size: int, folder: Path) -> Path:
    from pvt_lightning.export.metadata import model_metadata
    from pvt_lightning.export.trace import export_model
    from pvt_lightning.models import create_model

    torch.manual_seed(0)
    model = create_model(variant, num_classes=10).eval()
    path = folder / f"{variant}_{img_size}.onnx"
    meta = model_metadata(model, variant=variant, img_size=(img_size, img_size), crop_pct=0.875)
    export_model(model, path, img_size=(img_size, img_size), dynamic=True, metadata=meta)
    return path


class Offline:
    """The model and preprocessing the server uses, run in this process."""

    def __init__(self, model_path: Path, threads: int):
        from pvt_lightning.serve.model import load_model, model_info
        from pvt_lightning.serve.preprocess import ImagePipeline

        info = model_info(model_path)
        self.mean, self.std = info.preprocessing.mean, info.preprocessing.std
        self.pipeline = ImagePipeline(info.preprocessing)
        self.model = load_model(model_path, threads=threads, spinning=True)  # the fastest offline setting

    @torch.inference_mode()
    def forward(self, crops: list[np.ndarray]) -> torch.Tensor:
        from pvt_lightning.serve.preprocess import normalize

        return self.model(normalize(torch.from_numpy(np.stack(crops)), self.mean, self.std))

    def model_only(self, images: list[bytes], batch: int, batches: int) -> float:
        crops = [self.pipeline(data) for data in images[:batch]]
        self.forward(crops)
        start = time.perf_counter()
        for _ in range(batches):
            self.forward(crops)
        return batch * batches / (time.perf_counter() - start)

    def end_to_end(self, images: list[bytes], batch: int, batches: int) -> float:
        start = time.perf_counter()
        for b in range(batches):
            self.forward([self.pipeline(images[(b * batch + i) % len(images)]) for i in range(batch)])
        return batch * batches / (time.perf_counter() - start)

    def latency_p50(self, images: list[bytes], count: int) -> float:
        times = []
        for i in range(count):
            start = time.perf_counter()
            self.forward([self.pipeline(images[i % len(images)])])
            times.append(1000 * (time.perf_counter() - start))
        return statistics.median(times)


def start_server(model: Path, threads: int, max_batch: int, timeout: float, log: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [sys.executable, "-m", "pvt_lightning.cli", "serve", "--checkpoint", str(model), "--port", str(port),
            "--accelerator", "cpu", "--threads", str(threads), "--max-batch-size", str(max_batch),
            "--batch-timeout", str(timeout)]
    with open(log, "wb") as out:
        # Its own process group, but this session: with the kernel's autogroup scheduling a new session would get
        # a CPU share of its own next to the offline side's, and serving would look faster than it is.
        process = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, process_group=0,
                                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if process.poll() is not None:
            raise SystemExit(f"the server exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as answer:
                if answer.status == 200:
                    return process, url + "/predict"
        except OSError:
            time.sleep(1)
    raise SystemExit("the server did not come up in 10 minutes")


def stop_server(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def measure(args, model_path: Path, images: list[bytes], url: str, offline: Offline) -> list[dict]:
    rounds = []
    for r in range(args.rounds):
        row = {"model_only_b16": offline.model_only(images, 16, args.batches),
               "offline_b16": offline.end_to_end(images, 16, args.batches)}
        served = run_load(url, images, 16, args.requests, 300)
        row.update(served_c16=served["requests_per_s"], served_c16_p50=served["p50_ms"], failed=served["failed"])
        row["offline_b1_p50"] = offline.latency_p50(images, args.latency_requests)
        single = run_load(url, images, 1, args.latency_requests, 300)
        row.update(served_c1_p50=single["p50_ms"], failed=row["failed"] + single["failed"])
        print(f"round {r}: " + ", ".join(f"{k} {v:.1f}" for k, v in row.items()), flush=True)
        rounds.append(row)
    return rounds


def report(args, model_path: Path, rounds: list[dict]) -> str:
    med = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    ratio = {
        "served c16 / offline b16 end to end": statistics.median(r["served_c16"] / r["offline_b16"] for r in rounds),
        "served c16 / offline b16 model only": statistics.median(r["served_c16"] / r["model_only_b16"] for r in rounds),
        "served c1 p50 / offline b1 p50": statistics.median(r["served_c1_p50"] / r["offline_b1_p50"] for r in rounds),
    }
    lines = [f"Model: {model_path.name}; {args.rounds} interleaved rounds; server: --max-batch-size "
             f"{args.max_batch_size} --batch-timeout {args.batch_timeout} --threads {args.threads}, 1 worker; "
             f"{args.requests} requests at concurrency 16, {args.latency_requests} at concurrency 1; CPU: "
             f"{os.cpu_count()} cores shared with other jobs.", "",
             "| figure | median of rounds |", "|---|---|"]
    names = {"model_only_b16": "offline batch 16, model only (images/s)",
             "offline_b16": "offline batch 16, decode+crop+model (images/s)",
             "served_c16": "served, concurrency 16 (requests/s)", "served_c16_p50": "served c16 latency p50 (ms)",
             "offline_b1_p50": "offline batch 1 latency p50, decode+crop+model (ms)",
             "served_c1_p50": "served concurrency 1 latency p50 (ms)", "failed": "failed requests"}
    lines += [f"| {names[k]} | {v:.1f} |" for k, v in med.items()]
    lines += ["", "| ratio (within each round, median) | value |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in ratio.items()]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a .onnx / .pt2 / .ckpt to serve (else --variant is exported)")
    parser.add_argument("--variant", default="b0")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--images", help="folder of images (default: 64 generated 500x375 JPEGs)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=6, help="offline batches of 16 per round")
    parser.add_argument("--requests", type=int, default=96, help="served requests at concurrency 16 per round")
    parser.add_argument("--latency-requests", type=int, default=24, help="requests at concurrency 1 per round")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--batch-timeout", type=float, default=0.01)
    parser.add_argument("--output", help="write the Markdown table here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pvt_serving_bench_") as folder:
        work = Path(folder)
        model = Path(args.model) if args.model else export_variant(args.variant, args.img_size, work)
        images = load_images(args.images or synthetic_jpegs(work / "images"))
        offline = Offline(model, args.threads)
        process, url = start_server(model, args.threads, args.max_batch_size, args.batch_timeout, work / "server.log")
        try:
            run_load(url, images, 4, 16, 120)  # warm-up
            rounds = measure(args, model, images, url, offline)
        finally:
            stop_server(process)
    text = report(args, model, rounds)
    print(text)
    if args.output:
        Path(args.output).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
