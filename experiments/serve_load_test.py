#!/usr/bin/env python
"""Load-test a running ``pvt-lightning serve`` on this machine: real image files at a given concurrency.

    pvt-lightning serve --checkpoint model.onnx --port 8000 &
    python experiments/serve_load_test.py --url http://127.0.0.1:8000/predict --images data/digits/val \\
        --concurrency 16 --requests 500

Each of ``--concurrency`` client threads keeps one HTTP/1.1 connection and sends the next image as soon as the
previous answer is in, until ``--requests`` answers or ``--seconds`` have passed (whichever comes first; both
are bounded). Reports requests/s and the latency percentiles p50/p90/p99 of the successful requests, and the
count of failed ones. Loopback only: the URL must name 127.0.0.1, localhost or ::1. The clients run on the same
CPU as the server, so they take a share of it.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

MAX_REQUESTS = 100_000
MAX_SECONDS = 600.0
LOOPBACK = ("127.0.0.1", "localhost", "::1")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def load_images(folder: str | Path, limit: int = 256) -> list[bytes]:
    """The bytes of up to ``limit`` image files under ``folder`` (sorted, recursive)."""
    files = sorted(p for p in Path(folder).expanduser().rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if not files:
        raise SystemExit(f"serve_load_test: no image files under {folder}")
    return [f.read_bytes() for f in files]


def check_url(url: str) -> tuple[str, int, str]:
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname not in LOOPBACK:
        raise SystemExit(f"serve_load_test: {url}: only http://127.0.0.1 (loopback) servers are load-tested")
    return parts.hostname, parts.port or 80, parts.path or "/predict"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))] if ordered else float("nan")


def run_load(url: str, images: list[bytes], concurrency: int, requests: int, seconds: float) -> dict:
    """Send ``images`` in turn from ``concurrency`` threads; the figures as a dict (latencies in ms)."""
    host, port, path = check_url(url)
    requests, seconds = min(requests, MAX_REQUESTS), min(seconds, MAX_SECONDS)
    lock, latencies, failures = threading.Lock(), [], []
    counter = iter(range(requests))
    deadline = time.perf_counter() + seconds

    def client() -> None:
        connection = http.client.HTTPConnection(host, port, timeout=120)
        try:
            while time.perf_counter() < deadline:
                with lock:
                    index = next(counter, None)
                if index is None:
                    return
                start = time.perf_counter()
                try:
                    connection.request("POST", path, body=images[index % len(images)],
                                       headers={"Content-Type": "application/octet-stream"})
                    answer = connection.getresponse()
                    answer.read()
                    ok = answer.status == 200
                except (OSError, http.client.HTTPException):
                    connection.close()
                    connection, ok = http.client.HTTPConnection(host, port, timeout=120), False
                elapsed = time.perf_counter() - start
                with lock:
                    (latencies if ok else failures).append(elapsed)
        finally:
            connection.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    ms = [1000 * t for t in latencies]
    return {"concurrency": concurrency, "requests": len(latencies), "failed": len(failures), "seconds": wall,
            "requests_per_s": len(latencies) / wall if wall else 0.0, "p50_ms": percentile(ms, 50),
            "p90_ms": percentile(ms, 90), "p99_ms": percentile(ms, 99)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000/predict", help="the server's /predict (loopback)")
    parser.add_argument("--images", required=True, help="folder of image files to send (recursively, in turn)")
    parser.add_argument("--concurrency", type=int, default=16, help="client threads, one request in flight each")
    parser.add_argument("--requests", type=int, default=500, help=f"stop after this many (at most {MAX_REQUESTS})")
    parser.add_argument("--seconds", type=float, default=60.0, help=f"or after this long (at most {MAX_SECONDS:g})")
    parser.add_argument("--warmup", type=int, default=8, help="requests sent first and not counted")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = parser.parse_args(argv)
    if args.concurrency < 1 or args.requests < 1 or args.seconds <= 0:
        parser.error("--concurrency, --requests and --seconds must be positive")
    images = load_images(args.images)
    if args.warmup:
        run_load(args.url, images, min(args.concurrency, args.warmup), args.warmup, args.seconds)
    result = run_load(args.url, images, args.concurrency, args.requests, args.seconds)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['requests']} requests ({result['failed']} failed) in {result['seconds']:.1f} s at concurrency "
              f"{result['concurrency']}: {result['requests_per_s']:.1f} requests/s, latency p50 {result['p50_ms']:.1f} "
              f"ms, p90 {result['p90_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms")
    return 0 if result["requests"] and not result["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
