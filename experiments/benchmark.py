#!/usr/bin/env python
"""Params, GMACs, throughput and peak memory of our models against the reference implementation.

    python experiments/benchmark.py --variants b0 b2 b2_li --sizes 224x224 384x224
    python experiments/benchmark.py --variants b2 --modes train --grad-checkpointing
    python experiments/benchmark.py --data-loader --sizes 224x224
    python experiments/benchmark.py --onnx --variants b0 b2 --onnx-batch-sizes 1 16 --threads 2

Each PVTv2 variant is timed against timm's ``pvt_v2_*`` (resnet50 against torchvision's) carrying
the same weights, in this process, one step of each in turn (A B B A ...), so drift of a shared
machine cancels in the ratio. Images/s is the median over all timed steps (``--steps`` per repeat,
after warm-up). The ratio (ours / reference speed) is the median over step pairs timed back to back;
``ratio_lo``..``ratio_hi`` is its 95% confidence interval (distribution-free; wider coverage
with fewer than 6 pairs, none with 1). A ratio whose interval holds 1.00 is a tie on this machine.
Peak memory (CPU: peak RSS; GPU: peak allocated) comes from a fresh subprocess per model.
Achieved FLOP/s counts 2 FLOPs per MAC and a training step as 3 forward passes; ``pct_of_peak`` compares it
with a measured matmul rate, ``mfu`` (GPUs) the same count with attention products included with the device's
dense datasheet peak (``pvt_lightning.training.callbacks.throughput``). ``--compile-regions`` compiles our models per block
(``pvt_lightning.training.compile``: both with ``--reference-variant``) and leaves timm's reference eager.

``--onnx`` times onnxruntime (CPU; the CUDA execution provider with ``--device cuda`` where onnxruntime
has it) running one dynamic ONNX export per variant against eager PyTorch with the same weights, the
same way: interleaved step by step, ratio = onnxruntime speed / eager speed with its 95% interval.
onnxruntime's worker threads do not spin while idle, so they leave the CPU to the eager step after them.
``--onnx-profile`` adds each row's top op types by share of onnxruntime's kernel time (its profiler).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pvt_lightning.training.allocator import keep_freed_memory  # noqa: E402
from tools.bench import memory, reference, timing  # noqa: E402
from tools.bench.synthetic import write_photo_folder  # noqa: E402
from pvt_lightning.runs.tables import markdown_table, write_csv  # noqa: E402
from pvt_lightning.models import VARIANTS, canonical_name, measure_complexity, variant_spec  # noqa: E402
from pvt_lightning.training.callbacks.throughput import device_peak_flops  # noqa: E402

COLUMNS = ["variant", "size", "mode", "batch", "precision", "reference", "params_m", "gmacs", "ours_img_s", "ref_img_s",
           "ratio", "ratio_lo", "ratio_hi", "ours_peak_mb", "ref_peak_mb", "ours_act_mb", "ref_act_mb", "ours_gflop_s",
           "pct_of_peak", "mfu"]
ONNX_COLUMNS = ["variant", "size", "batch", "threads", "provider", "eager_img_s", "onnx_img_s", "ratio", "ratio_lo",
                "ratio_hi", "max_abs_diff", "export_s", "top_ops"]
DATA_COLUMNS = ["pipeline", "size", "images", "workers", "img_s", "img_s_per_worker", "ratio_vs_torchvision"]
TORCHVISION_PIPELINE = "torchvision + PIL (float, normalised)"


class UsageError(Exception):
    """A bad command line: printed as one line, exit status 2."""


def parse_size(text: str) -> tuple[int, int]:
    """'384x224' -> (384, 224) as (H, W); '224' -> (224, 224)."""
    parts = text.lower().split("x")
    try:
        if len(parts) == 1:
            parts = parts * 2
        if len(parts) != 2:
            raise ValueError
        h, w = int(parts[0]), int(parts[1])
    except ValueError:
        raise argparse.ArgumentTypeError(f"malformed size {text!r}: use HxW, e.g. 224x224 or 384x224") from None
    if h < 32 or w < 32:
        raise argparse.ArgumentTypeError(f"size {text!r} is too small: each side must be at least 32 pixels")
    return h, w


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=["b0", "b2", "b2_li"], help=f"any of {' '.join(VARIANTS)}")
    p.add_argument("--sizes", nargs="+", type=parse_size, default=[(224, 224), (384, 224)], help="HxW, e.g. 384x224")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--precision", default="32", choices=timing.PRECISIONS)
    p.add_argument("--channels-last", action="store_true", help="channels-last input and conv weights")
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--compile-regions", action="store_true",
                   help="compile our models per block (pvt_lightning.training.compile); timm's reference stays eager")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute blocks in the backward (both models)")
    p.add_argument("--modes", nargs="+", default=["infer", "train"], choices=timing.MODES)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model before timing")
    p.add_argument("--steps", type=int, default=5, help="timed steps per model and repeat")
    p.add_argument("--repeats", type=int, default=1, help="repeat the interleaved measurement; report medians")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--default-malloc", action="store_true",
                   help="keep glibc's default malloc (by default freed memory stays in the process, as in training "
                        "runs; see pvt_lightning/training/allocator.py)")
    p.add_argument("--memory-steps", type=int, default=2, help="steps per mode in the peak-memory subprocess")
    p.add_argument("--no-reference", action="store_true", help="time our model only")
    p.add_argument("--reference-variant", default=None,
                   help="compare against OUR model of this variant instead of timm's (e.g. b2_li vs b2)")
    p.add_argument("--out", type=Path, default=Path("experiments/results"), help="folder for benchmark.csv/.md")
    p.add_argument("--tag", default="benchmark", help="file stem of the outputs (default: benchmark)")
    p.add_argument("--data-loader", action="store_true",
                   help="measure decode+augment images/s per worker: our pipeline vs torchvision+PIL")
    p.add_argument("--images", type=int, default=64, help="--data-loader: number of generated 500x375 JPEGs")
    p.add_argument("--onnx", action="store_true",
                   help="time onnxruntime on a dynamic ONNX export of each variant against eager PyTorch (inference)")
    p.add_argument("--onnx-batch-sizes", type=int, nargs="+", default=None,
                   help="--onnx: batch sizes to time, one export serving all (default: --batch-size)")
    p.add_argument("--onnx-profile", action="store_true",
                   help="--onnx: also profile onnxruntime and list its op types' shares of kernel time (column top_ops)")
    p.add_argument("--onnx-dir", type=Path, default=None,
                   help="--onnx: keep the exported <variant>.onnx files here and reuse them (default: a temp folder)")
    p.add_argument("--workers", type=int, default=0,
                   help="--data-loader: also time the real training DataLoader with this many worker processes "
                        "(ours and torchvision ImageFolder), total images/s")
    return p


def check_args(args: argparse.Namespace) -> None:
    try:
        args.variants = [canonical_name(v) for v in args.variants]
        if args.reference_variant:
            args.reference_variant = canonical_name(args.reference_variant)
    except ValueError as err:
        raise UsageError(str(err)) from None
    for name in ("batch_size", "steps", "repeats", "images", "memory_steps"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0 or args.workers < 0:
        raise UsageError("--warmup and --workers must be >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is visible here; use --device cpu")
    if args.precision == "16-mixed" and args.device == "cpu":
        raise UsageError("--precision 16-mixed needs a GPU; on CPU use bf16-mixed")
    if args.onnx and (args.precision != "32" or args.compile or args.grad_checkpointing or args.data_loader):
        raise UsageError("--onnx times fp32 inference only; drop --precision/--compile/--grad-checkpointing/"
                         "--data-loader")
    args.onnx_batch_sizes = args.onnx_batch_sizes or [args.batch_size]
    if min(args.onnx_batch_sizes) < 1:
        raise UsageError("--onnx-batch-sizes must be at least 1")
    if args.compile and args.compile_regions:
        raise UsageError("--compile (whole models) and --compile-regions (ours per block) exclude each other")
    if args.grad_checkpointing and "resnet50" in args.variants:
        raise UsageError("--grad-checkpointing applies to PVTv2 variants only; drop resnet50 from --variants")


def prepare(model: torch.nn.Module, args: argparse.Namespace, ours: bool = False) -> torch.nn.Module:
    model = model.to(args.device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if args.compile:
        model = torch.compile(model)
    if args.compile_regions and ours:
        from pvt_lightning.training.compile import compile_regions

        compile_regions(model)
    return model


def fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def run_models(args: argparse.Namespace, peak_flops: float, save=lambda rows: None) -> list[dict]:
    """One row per variant, size and mode; ``save(rows)`` after each, so a long run leaves partial tables."""
    rows = []
    for variant in args.variants:
        for size in args.sizes:
            torch.manual_seed(0)
            ours = reference.build_model(variant, "ours")
            complexity = measure_complexity(ours, size)
            if args.no_reference:
                ref_model, ref_name, ref_impl, ref_variant = None, "", "", variant
            elif args.reference_variant:
                ref_variant, ref_impl, ref_name = args.reference_variant, "ours", f"ours {args.reference_variant}"
                ref_model = reference.build_model(ref_variant, "ours")
            else:
                ref_model = reference.reference_with_same_weights(ours, variant)
                ref_variant, ref_impl = variant, "reference"
                ref_name = variant_spec(variant).reference.replace(":", " ")  # e.g. "timm pvt_v2_b0"
            models = [prepare(ours, args, ours=True)] + ([] if ref_model is None else
                                                         [prepare(ref_model, args, ours=ref_impl == "ours")])
            mem: dict[str, dict] = {}
            if not args.no_memory:  # one fresh subprocess per model, all modes
                for key, name, impl in [("ours", variant, "ours")] + ([] if ref_model is None else
                                                                      [("reference", ref_variant, ref_impl)]):
                    mem[key] = memory.measure_peak_memories(name, size, args.batch_size, args.modes, args.device,
                                                        args.precision, impl, args.grad_checkpointing,
                                                        args.channels_last, steps=args.memory_steps,
                                                        keep_freed_memory=args.kept_freed_memory,
                                                        compile_regions=args.compile_regions and impl == "ours")
            for mode in args.modes:
                times: list[list[float]] = [[] for _ in models]  # per model, the steps of all repeats
                for _ in range(args.repeats):
                    for pooled, new in zip(times, timing.compare_step_times(
                            models, size, args.batch_size, mode, args.device, args.precision, args.steps,
                            args.warmup, args.channels_last)):
                        pooled += new
                ours_ips = args.batch_size / statistics.median(times[0])
                ref_ips = args.batch_size / statistics.median(times[1]) if ref_model is not None else None
                ratio = timing.paired_speed_ratio(times[0], times[1]) if ref_model is not None else None
                ratios = dict(ratio=ratio.median, ratio_lo=ratio.low, ratio_hi=ratio.high) if ratio else {}
                achieved = timing.achieved_flops(complexity.gmacs, ours_ips, mode)
                device_peak = getattr(args, "device_peak", None)  # a GPU's dense datasheet peak; None on CPUs
                model_flops = timing.achieved_flops(complexity.total_gmacs, ours_ips, mode)
                row = dict(variant=variant, size=f"{size[0]}x{size[1]}", mode=mode, batch=args.batch_size,
                           precision=args.precision + ("+gc" if args.grad_checkpointing else "")
                           + ("+cl" if args.channels_last else "") + ("+compile" if args.compile else "")
                           + ("+regions" if args.compile_regions else ""),
                           reference=ref_name, params_m=complexity.params_m, gmacs=complexity.gmacs,
                           ours_img_s=ours_ips, ref_img_s=ref_ips, **ratios,
                           ours_peak_mb=mem["ours"][mode].peak_mb if mem else None,
                           ref_peak_mb=mem["reference"][mode].peak_mb if "reference" in mem else None,
                           ours_act_mb=mem["ours"][mode].activations_mb if mem else None,
                           ref_act_mb=mem["reference"][mode].activations_mb if "reference" in mem else None,
                           ours_gflop_s=achieved / 1e9, pct_of_peak=100 * achieved / peak_flops,
                           mfu=model_flops / device_peak if device_peak else None)
                rows.append(row)
                save(rows)
                print(f"{variant:8s} {row['size']:>8s} {mode:5s} ours {ours_ips:7.2f} img/s  "
                      f"{ref_name or 'reference'} {fmt(ref_ips):>7s} img/s  ratio {fmt(row.get('ratio'), 3):>6s} "
                      f"[{fmt(row.get('ratio_lo'), 3)}, {fmt(row.get('ratio_hi'), 3)}]  "
                      f"peak MB ours {fmt(row['ours_peak_mb'], 0)} ref {fmt(row['ref_peak_mb'], 0)}  "
                      f"{row['ours_gflop_s']:.1f} GFLOP/s ({row['pct_of_peak']:.0f}% of peak)"
                      + (f"  MFU {100 * row['mfu']:.1f}%" if row["mfu"] else ""), flush=True)
    return rows


# --- onnxruntime vs eager -------------------------------------------------------------------------------

def onnx_export_for(variant: str, model: torch.nn.Module, folder: Path) -> tuple[Path, float | None]:
    """``folder/<variant>.onnx``, a dynamic export of ``model`` (reused if a dynamic export of it is there);
    with the export time in seconds, None when reused."""
    from pvt_lightning.export.metadata import read_metadata
    from pvt_lightning.export.trace import export_model

    path = folder / f"{variant}.onnx"
    if path.is_file():
        meta = read_metadata(path)
        if meta.variant == variant and meta.dynamic_size and meta.dynamic_batch:
            return path, None
    start = time.perf_counter()
    export_model(model, path, dynamic=True, overwrite=path.exists())
    return path, time.perf_counter() - start


def run_onnx(args: argparse.Namespace, save=lambda rows: None) -> list[dict]:
    """One row per variant, size and batch: onnxruntime and eager images/s, interleaved, and their ratio."""
    import tempfile

    from pvt_lightning.export.runtime import OnnxClassifier

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.onnx_dir or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        rows = []
        for variant in args.variants:
            torch.manual_seed(0)
            eager = reference.build_model(variant, "ours").eval()
            path, export_s = onnx_export_for(variant, eager, folder)
            # no spinning: onnxruntime's idle threads would otherwise take the CPU from the eager step after it
            runtime = OnnxClassifier(path, device=args.device, threads=torch.get_num_threads(), spinning=False)
            provider = runtime.session.get_providers()[0].removesuffix("ExecutionProvider")
            eager = eager.to(args.device)
            for size in args.sizes:
                for batch in args.onnx_batch_sizes:
                    times: list[list[float]] = [[], []]
                    for _ in range(args.repeats):
                        for pooled, new in zip(times, timing.compare_step_times(
                                [runtime, eager], size, batch, "infer", args.device, "32", args.steps, args.warmup)):
                            pooled += new
                    with torch.inference_mode():
                        x = torch.randn(batch, 3, *size, device=args.device)
                        diff = (runtime(x) - eager(x)).abs().max().item()
                    ratio = timing.paired_speed_ratio(times[0], times[1])  # > 1: onnxruntime faster
                    top_ops = (op_time_shares(path, batch, size, torch.get_num_threads())
                               if args.onnx_profile and provider == "CPU" else None)
                    row = dict(variant=variant, size=f"{size[0]}x{size[1]}", batch=batch,
                               threads=torch.get_num_threads(), provider=provider,
                               eager_img_s=batch / statistics.median(times[1]),
                               onnx_img_s=batch / statistics.median(times[0]), ratio=ratio.median,
                               ratio_lo=ratio.low, ratio_hi=ratio.high, max_abs_diff=f"{diff:.1e}", export_s=export_s,
                               top_ops=top_ops)
                    rows.append(row)
                    save(rows)
                    print(f"{variant:8s} {row['size']:>8s} batch {batch:3d}  eager {row['eager_img_s']:7.2f} img/s  "
                          f"onnxruntime ({provider}) {row['onnx_img_s']:7.2f} img/s  ratio {ratio.median:.3f} "
                          f"[{ratio.low:.3f}, {ratio.high:.3f}]  max |diff| {diff:.1e}", flush=True)
    return rows


def op_time_shares(path: Path, batch: int, size: tuple[int, int], threads: int, steps: int = 3, top: int = 6) -> str:
    """Where onnxruntime's CPU kernel time goes, by op type after its graph optimisations (its own profiler):
    e.g. "MatMul 39%; ReorderOutput 17%; Conv 14%" (Reorder*: the NCHWc layout conversions around convolutions)."""
    import collections
    import json
    import tempfile

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        options.profile_file_prefix = str(Path(tmp) / "ort")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: torch.randn(batch, 3, *size).numpy()}
        for _ in range(steps):
            session.run(None, feed)
        with open(session.end_profiling()) as f:
            events = json.load(f)
    shares: collections.Counter = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            shares[event["args"]["op_name"]] += event["dur"]
    total = sum(shares.values()) or 1
    return "; ".join(f"{op} {100 * time / total:.0f}%" for op, time in shares.most_common(top))


def load_line() -> str:
    """The machine's load now: figures from a shared machine mean little without it."""
    import os

    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (1 min), {five:.1f} (5 min) on {os.cpu_count()} cores"


# --- data loading ------------------------------------------------------------------------------------

def torchvision_train_transform(size: tuple[int, int]):
    """The usual torchvision+PIL training pipeline, as timm/DeiT-style codebases build it."""
    import torchvision.transforms as T

    return T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])


def run_data_loader(args: argparse.Namespace) -> list[dict]:
    """Decode + train augmentation per worker (one process, one thread): ours vs torchvision+PIL.

    With ``--workers N`` also the real training DataLoaders (ours: ``ImageFolderDataModule``;
    torchvision: ``ImageFolder``), N worker processes, batch ``--batch-size``, total images/s.
    """
    import tempfile

    import cv2
    from PIL import Image

    from pvt_lightning.data.dataset import ImageDataset
    from pvt_lightning.data.transforms import resize_target, train_transform

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "images"
        paths = write_photo_folder(root, classes=2, train_images=args.images, val_per_class=1)
        for size in args.sizes:
            ours = ImageDataset([(str(p), 0) for p in paths], train_transform(size, seed=0), bad_log=None,
                                bad_images="error", min_side=max(resize_target(size, 0.875)))
            tv = torchvision_train_transform(size)

            def load_ours():
                for i in range(len(paths)):
                    ours[i]

            def load_tv():
                for p in paths:
                    with Image.open(p) as im:
                        tv(im.convert("RGB"))

            names = ("ours (OpenCV + albumentations, uint8)", TORCHVISION_PIPELINE)
            ips = interleaved_rates(dict(zip(names, (load_ours, load_tv))), len(paths), max(args.repeats, 3))
            rows += data_rows(ips, size, len(paths), workers=1)
            if args.workers:
                loaders = {f"ours DataLoader ({args.workers} workers)": ours_train_loader(root, size, args),
                           f"{TORCHVISION_PIPELINE} DataLoader": torchvision_train_loader(root / "train", size, args)}
                passes = {name: (lambda loader=loader: sum(len(b[0]) for b in loader)) for name, loader in loaders.items()}
                ips = interleaved_rates(passes, len(paths) // args.batch_size * args.batch_size, max(args.repeats, 3))
                rows += data_rows(ips, size, len(paths), workers=args.workers)
    return rows


def interleaved_rates(passes: dict, images: int, repeats: int) -> dict[str, float]:
    """Images/s of each ``passes[name]()`` (one pass over ``images``): a warm-up pass each, then
    ``repeats`` interleaved passes, median time."""
    times = timing.interleaved_times([timing.timed(p) for p in passes.values()], repeats, warmup=1)
    return {name: images / statistics.median(t) for name, t in zip(passes, times)}


def data_rows(ips: dict[str, float], size: tuple[int, int], images: int, workers: int) -> list[dict]:
    """Rows of ``ips`` (the torchvision pipeline last) with ratios against the torchvision one."""
    ref = ips[next(name for name in ips if name.startswith(TORCHVISION_PIPELINE))]
    rows = []
    for name, value in ips.items():
        rows.append(dict(pipeline=name, size=f"{size[0]}x{size[1]}", images=images, workers=workers, img_s=value,
                         img_s_per_worker=value / workers, ratio_vs_torchvision=value / ref))
        print(f"{name:48s} {size[0]}x{size[1]}  {value:8.1f} img/s ({value / workers:6.1f} per worker)  "
              f"ratio {value / ref:.2f}", flush=True)
    return rows


def ours_train_loader(root: Path, size: tuple[int, int], args: argparse.Namespace):
    """Our real training loader (uint8 batches; normalising happens on the device, not timed here)."""
    from pvt_lightning.data import ImageFolderDataModule

    dm = ImageFolderDataModule(root, img_size=size, batch_size=args.batch_size, num_workers=args.workers,
                               augment="basic", pin_memory=False)
    dm.setup("fit")
    return dm.train_dataloader()


def torchvision_train_loader(root: Path, size: tuple[int, int], args: argparse.Namespace):
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    return DataLoader(ImageFolder(str(root), torchvision_train_transform(size)), batch_size=args.batch_size,
                      shuffle=True, drop_last=True, num_workers=args.workers, persistent_workers=True)


# --- output -------------------------------------------------------------------------------------------

def write_outputs(rows: list[dict], columns: list[str], out: Path, stem: str, header: str) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out / f"{stem}.csv", out / f"{stem}.md"
    write_csv(rows, csv_path, columns)
    md_path.write_text(header + "\n\n" + markdown_table(rows, columns))
    return csv_path, md_path


def machine_line(args: argparse.Namespace, peak_flops: float | None) -> str:
    import platform

    if args.device == "cuda":
        where = torch.cuda.get_device_name()
    else:
        where = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"
    peak = "" if peak_flops is None else f"; measured matmul peak {peak_flops / 1e9:.1f} GFLOP/s"
    if args.data_loader:
        return (f"Machine: {platform.processor() or platform.machine()}, one worker process, 1 thread; "
                f"generated 500x375 JPEGs; median of {max(args.repeats, 3)} passes, interleaved.")
    malloc = "freed memory kept in-process" if getattr(args, "kept_freed_memory", False) else "default malloc"
    return (f"Machine: {args.device} ({where}){peak}; torch {torch.__version__}; {malloc}; "
            f"batch {args.batch_size}, warm-up {args.warmup}, {args.steps} timed steps x {args.repeats} repeats.")


def onnxruntime_version() -> str:
    from pvt_lightning.export.optional import require

    return require("onnxruntime").__version__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse itself exits 2 with a one-line message on malformed flags
    try:
        check_args(args)
    except UsageError as err:
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    args.kept_freed_memory = False if args.default_malloc else keep_freed_memory()
    if args.onnx:
        start_load = load_line()
        print(f"{machine_line(args, None)} At the start: {start_load}.", flush=True)

        def save_onnx(rows):
            batches = "batch " + "/".join(str(b) for b in args.onnx_batch_sizes)
            header = (machine_line(args, None).replace(f"batch {args.batch_size}", batches)
                      + f" onnxruntime {onnxruntime_version()}. At the start: {start_load}; at the last row: "
                      f"{load_line()}.")
            return write_outputs(rows, ONNX_COLUMNS, args.out, args.tag, header)

        paths = save_onnx(run_onnx(args, save_onnx))
    elif args.data_loader:
        rows = run_data_loader(args)
        paths = write_outputs(rows, DATA_COLUMNS, args.out, f"{args.tag}_data", machine_line(args, None))
    else:
        dtype = torch.bfloat16 if args.precision == "bf16-mixed" else torch.float16 if args.precision == "16-mixed" else torch.float32
        peak = timing.matmul_peak_flops(args.device, dtype)
        args.device_peak = device_peak_flops(torch.device(args.device), dtype)
        print(machine_line(args, peak), flush=True)
        save = lambda rows: write_outputs(rows, COLUMNS, args.out, args.tag, machine_line(args, peak))  # noqa: E731
        paths = save(run_models(args, peak, save))
    print("wrote " + " and ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
