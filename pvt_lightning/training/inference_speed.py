"""Inference speed of a model where it runs: images/s at a batch size and at batch 1, batch-1 latency p50/p90.

Short and warmed up: random normalised inputs at the model's input size, eval mode, ``torch.inference_mode``,
the run's precision (an autocast region for the mixed precisions), CUDA synchronised around every call.
The time budget is split between the two batch sizes, each timed until its share is spent (and at least a few
calls). ``cli/speed.py`` re-measures checkpoints and exported files with it; the ``InferenceSpeed`` callback
measures every run at the end of its training (summary.json's ``inference`` block, ``INFERENCE_FIELDS``).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Any, Callable, ContextManager, Sequence

import torch

INFERENCE_FIELDS = ("device", "precision", "img_size", "batch_size", "img_s", "batch1_img_s", "latency_ms_p50",
                    "latency_ms_p90")
"""summary.json's ``inference`` block, exactly these keys."""
DEFAULT_SECONDS = 3.0
"""Timed seconds of one measurement, both batch sizes together (warm-up comes on top)."""
AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def describe_device(device: torch.device | str) -> str:
    """``cuda (NVIDIA H200)``, ``cpu (8 threads)``: the device kind and what it is."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return device.type


def autocast_context(precision: str, device: torch.device | str) -> ContextManager:
    """The autocast region of a mixed ``precision`` (``bf16-mixed``, ``16-mixed``); none for full precision."""
    dtype = AUTOCAST_DTYPES.get(str(precision))
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(call: Callable[[], Any], device: torch.device, seconds: float, min_calls: int,
               warmup_calls: int = 2) -> list[float]:
    """Wall times (s) of ``call()``: ``warmup_calls`` (and at least a quarter of ``seconds``) untimed first, then
    timed calls until ``seconds`` are spent and at least ``min_calls`` were made."""
    started = time.perf_counter()
    calls = 0
    while calls < warmup_calls or time.perf_counter() - started < seconds / 4:
        call()
        calls += 1
    _synchronize(device)
    times: list[float] = []
    spent = 0.0
    while len(times) < min_calls or spent < seconds:
        start = time.perf_counter()
        call()
        _synchronize(device)
        times.append(time.perf_counter() - start)
        spent += times[-1]
    return times


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation between the closest ranks."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def measure_inference_speed(model: Callable[[torch.Tensor], Any], img_size: Sequence[int], batch_size: int,
                            device: torch.device | str, precision: str = "32", seconds: float = DEFAULT_SECONDS,
                            context: Callable[[], ContextManager] | None = None) -> dict[str, Any]:
    """summary.json's ``inference`` block for ``model`` (in eval mode, on ``device``): images/s at ``batch_size``
    and at batch 1, batch-1 latency p50/p90 in ms. ``context`` makes the precision region (default: autocast for
    the mixed ``precision`` names); inputs are created inside it, so a full-precision region sets their dtype."""
    device = torch.device(device)
    height, width = (int(side) for side in img_size)
    region = context or (lambda: autocast_context(precision, device))
    with torch.inference_mode(), region():
        batch = torch.randn(batch_size, 3, height, width, device=device)
        single = batch[:1].clone()
        batch_times = time_calls(lambda: model(batch), device, seconds / 2, min_calls=3, warmup_calls=1)
        single_times = time_calls(lambda: model(single), device, seconds / 2, min_calls=10)
    return {
        "device": describe_device(device),
        "precision": str(precision),
        "img_size": [height, width],
        "batch_size": int(batch_size),
        "img_s": round(batch_size / statistics.median(batch_times), 2),
        "batch1_img_s": round(1 / statistics.median(single_times), 2),
        "latency_ms_p50": round(1000 * percentile(single_times, 50), 3),
        "latency_ms_p90": round(1000 * percentile(single_times, 90), 3),
    }
