#!/usr/bin/env python
"""int8 vs fp32 onnxruntime on the CPU: throughput at batch 16 and batch 1, interleaved, and the accuracy change.

    python experiments/make_digits.py data/digits32 --size 32
    python experiments/benchmark_int8.py --variants b0 b2_li --img-size 224 --calibration-data data/digits32 \\
        --checkpoint runs/b0/version_0/checkpoints/last.ckpt --output experiments/results/int8_cpu.md

Speed: each variant (random weights, 10 classes) is exported once (fp32, dynamic sizes) and quantized in both
formats (QOperator and QDQ; per-channel int8 weights, uint8 activations, calibrated on ``--calibration-images``
images of ``--calibration-data`` resized to the input size). Per round, every (batch size, file) pair is timed
in turn, so a slow moment of a shared machine hits all of them; the int8/fp32 ratio is taken within each round
and its median reported. Accuracy: ``--checkpoint`` (a model trained on the calibration data) goes through the
export command's ``--quantize int8`` path, whose gate measures top-1 and the macro recall at precision 0.9 of
fp32 and int8 on the val split.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

FORMATS = ("qoperator", "qdq")


def export_and_quantize(variant: str, img_size: int, data: Path, images: int, folder: Path) -> dict[str, Path]:
    from pvt_lightning.export.metadata import model_metadata, read_metadata
    from pvt_lightning.export.trace import export_model
    from pvt_lightning.export.quantize import CalibrationReader, calibration_split, image_batches, quantize_onnx
    from pvt_lightning.models import create_model

    files = {"fp32": folder / f"{variant}_{img_size}_fp32.onnx"}
    if not files["fp32"].exists():
        torch.manual_seed(0)
        model = create_model(variant, num_classes=10).eval()
        meta = model_metadata(model, variant=variant, img_size=(img_size, img_size))
        export_model(model, files["fp32"], img_size=(img_size, img_size), dynamic=True, metadata=meta)
    meta = read_metadata(files["fp32"])
    for fmt in FORMATS:
        files[fmt] = folder / f"{variant}_{img_size}_{fmt}.onnx"
        if not files[fmt].exists():
            batches = image_batches(data, calibration_split(data), meta, limit=images, batch_size=8)
            quantize_onnx(files["fp32"], files[fmt], CalibrationReader(batches, "images", None), fmt=fmt)
    return files


def session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def time_rounds(sessions: dict[str, object], img_size: int, batches: list[int], rounds: int, seconds: float) -> dict:
    """images/s per (batch, name) per round; each measurement runs ``seconds`` (at least 2 runs)."""
    rng = np.random.default_rng(0)
    inputs = {b: rng.standard_normal((b, 3, img_size, img_size)).astype(np.float32) for b in batches}
    for s in sessions.values():
        for b in batches:
            s.run(None, {"images": inputs[b]})  # warm-up
    speed = {(b, name): [] for b in batches for name in sessions}
    for _ in range(rounds):
        for b in batches:
            for name, s in sessions.items():
                runs, start = 0, time.perf_counter()
                while runs < 2 or time.perf_counter() - start < seconds:
                    s.run(None, {"images": inputs[b]})
                    runs += 1
                speed[(b, name)].append(b * runs / (time.perf_counter() - start))
    return speed


def speed_table(variant: str, speed: dict, batches: list[int]) -> list[str]:
    lines = []
    for b in batches:
        fp32 = statistics.median(speed[(b, "fp32")])
        cells = [f"{variant}", str(b), f"{fp32:.1f}"]
        for fmt in FORMATS:
            ratio = statistics.median(q / f for q, f in zip(speed[(b, fmt)], speed[(b, "fp32")]))
            cells += [f"{statistics.median(speed[(b, fmt)]):.1f}", f"{ratio:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def accuracy_rows(checkpoint: Path, data: Path, folder: Path) -> list[str]:
    """The export command's int8 path with a gate that always passes, per format: its figures."""
    from pvt_lightning.cli.export import ExportConfig, run_export
    from pvt_lightning.export.quantize import quantized_export, read_quantization

    rows = []
    for fmt in FORMATS:
        output = folder / f"accuracy_{fmt}.onnx"
        config = ExportConfig(checkpoint=str(checkpoint), output=str(output), dynamic=True, quantize="int8",
                              calibration_data=str(data), max_accuracy_drop=100.0, max_recall_drop=100.0,
                              overwrite=True)
        quantized_export(config, run_export, say=print, fmt=fmt)
        gate = read_quantization(output)["gate"]
        rows.append(f"| {fmt} | {gate['val_images']} | {100 * gate['fp32_top1']:.2f} | {100 * gate['int8_top1']:.2f} | "
                    f"{100 * (gate['int8_top1'] - gate['fp32_top1']):+.2f} | {100 * gate['fp32_recall_at_precision']:.2f}"
                    f" | {100 * gate['int8_recall_at_precision']:.2f} | "
                    f"{100 * (gate['int8_recall_at_precision'] - gate['fp32_recall_at_precision']):+.2f} |")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["b0", "b2_li"])
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--calibration-data", required=True, help="ImageFolder (e.g. experiments/make_digits.py's)")
    parser.add_argument("--calibration-images", type=int, default=64)
    parser.add_argument("--checkpoint", help="a model trained on --calibration-data, for the accuracy figures")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 1])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--workdir", help="keep the exported files here (re-used when present)")
    parser.add_argument("--output", help="write the Markdown tables here")
    args = parser.parse_args()
    data = Path(args.calibration_data).expanduser()
    with tempfile.TemporaryDirectory(prefix="pvt_int8_bench_") as scratch:
        folder = Path(args.workdir or scratch)
        folder.mkdir(parents=True, exist_ok=True)
        lines = [f"Speed: onnxruntime CPU, {args.threads} intra-op threads, {args.img_size}x{args.img_size}, "
                 f"{args.rounds} interleaved rounds of {args.seconds:g} s per measurement; {os.cpu_count()} cores "
                 "shared with other jobs (ratios are within-round medians).", "",
                 "| variant | batch | fp32 img/s | QOperator img/s | QOperator / fp32 | QDQ img/s | QDQ / fp32 |",
                 "|---|---|---|---|---|---|---|"]
        for variant in args.variants:
            files = export_and_quantize(variant, args.img_size, data, args.calibration_images, folder)
            sessions = {name: session(path, args.threads) for name, path in files.items()}
            speed = time_rounds(sessions, args.img_size, args.batch_sizes, args.rounds, args.seconds)
            lines += speed_table(variant, speed, args.batch_sizes)
            sizes = ", ".join(f"{name} {path.stat().st_size / 2**20:.1f} MB" for name, path in files.items())
            print("\n".join(lines[-len(args.batch_sizes):]), f"\n  file sizes: {sizes}", flush=True)
            lines.append(f"| {variant} files | | {sizes} | | | | |")
        if args.checkpoint:
            lines += ["", f"Accuracy on the val split of {data.name} ({args.checkpoint}):", "",
                      "| format | val images | fp32 top-1 % | int8 top-1 % | change | fp32 R@P0.9 % | int8 R@P0.9 % | "
                      "change |", "|---|---|---|---|---|---|---|---|"]
            lines += accuracy_rows(Path(args.checkpoint), data, folder)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        Path(args.output).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
