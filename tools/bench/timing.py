"""Timing a model's steps: images/s for inference or a training step, and speed ratios between models.

Timings are medians of timed steps after warm-up (CUDA-synchronised on a GPU). ``interleaved_times``
runs several tasks in turn (A B, B A, ...) so that drift of a shared machine hits all alike, and
``paired_speed_ratio`` turns back-to-back pairs into a speed ratio with a confidence interval.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

MODES = ("infer", "train")
PRECISIONS = ("32", "bf16-mixed", "16-mixed")


def autocast_context(device: str, precision: str) -> contextlib.AbstractContextManager:
    """The autocast region of a Lightning ``precision`` string ('32' = none)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    if precision == "32":
        return contextlib.nullcontext()
    if precision == "16-mixed" and device == "cpu":
        raise ValueError("precision 16-mixed needs a GPU (--device cuda); on CPU use bf16-mixed")
    dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float16
    return torch.autocast(device_type=device, dtype=dtype)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(task: Callable[[], object], device: str = "cpu") -> Callable[[], float]:
    """``task`` as a callable that runs it once and returns its wall time in seconds."""
    def run() -> float:
        synchronize(device)
        start = time.perf_counter()
        task()
        synchronize(device)
        return time.perf_counter() - start

    return run


def interleaved_times(steps: Sequence[Callable[[], float]], repeats: int, warmup: int = 0) -> list[list[float]]:
    """Run each ``steps[k]()`` (returning its own wall time) ``repeats`` times, in turn: A B, B A, A B, ...

    ``warmup`` untimed rounds first. Alternating the order removes any position bias, and the i-th
    times of two tasks ran back to back, so they pair up (see ``paired_speed_ratio``).
    """
    for _ in range(warmup):
        for step in steps:
            step()
    times: list[list[float]] = [[] for _ in steps]
    for i in range(repeats):
        order = range(len(steps)) if i % 2 == 0 else reversed(range(len(steps)))
        for k in order:
            times[k].append(steps[k]())
    return times


class StepRunner:
    """One model, one fixed batch, one mode: ``step()`` runs a forward (infer) or forward +
    backward + AdamW step (train) and returns its wall time in seconds."""

    def __init__(self, model: nn.Module, img_size: tuple[int, int], batch_size: int, mode: str = "infer",
                 device: str = "cpu", precision: str = "32", channels_last: bool = False, seed: int = 0):
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of: {', '.join(MODES)}")
        self.model, self.mode, self.device, self.precision = model, mode, device, precision
        autocast_context(device, precision)  # validate early
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(batch_size, 3, *img_size, generator=g)
        self.x = x.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        self.target = torch.randint(0, 1000, (batch_size,), generator=g).to(device)
        self.scaler = torch.amp.GradScaler(device) if precision == "16-mixed" else None
        model.train(mode == "train")
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6) if mode == "train" else None
        self.step = timed(self.run, device)

    def run(self) -> None:
        if self.mode == "infer":
            with torch.inference_mode(), autocast_context(self.device, self.precision):
                self.model(self.x)
            return
        self.optimizer.zero_grad(set_to_none=True)
        with autocast_context(self.device, self.precision):
            out = self.model(self.x)
            loss = nn.functional.cross_entropy(out.float(), self.target[: out.shape[0]] % out.shape[1])
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()


def measure_throughput(model: nn.Module, img_size: tuple[int, int] = (224, 224), batch_size: int = 16,
                       mode: str = "infer", device: str = "cpu", precision: str = "32", steps: int = 10,
                       warmup: int = 3, channels_last: bool = False) -> float:
    """Images per second of ``model`` at ``img_size`` (H, W): median over ``steps`` timed steps after ``warmup``."""
    return compare_throughput([model], img_size, batch_size, mode, device, precision, steps, warmup, channels_last)[0]


def compare_step_times(models: Sequence[nn.Module], img_size: tuple[int, int] = (224, 224), batch_size: int = 16,
                       mode: str = "infer", device: str = "cpu", precision: str = "32", steps: int = 10,
                       warmup: int = 3, channels_last: bool = False) -> list[list[float]]:
    """Wall times of ``steps`` steps per model, interleaved (see ``interleaved_times``)."""
    runners = [StepRunner(m, img_size, batch_size, mode, device, precision, channels_last) for m in models]
    return interleaved_times([r.step for r in runners], steps, warmup)


def compare_throughput(models: Sequence[nn.Module], img_size: tuple[int, int] = (224, 224), batch_size: int = 16,
                       mode: str = "infer", device: str = "cpu", precision: str = "32", steps: int = 10,
                       warmup: int = 3, channels_last: bool = False) -> list[float]:
    """Images/s of each model (median step), measured interleaved by ``compare_step_times``."""
    times = compare_step_times(models, img_size, batch_size, mode, device, precision, steps, warmup, channels_last)
    return [batch_size / statistics.median(t) for t in times]


@dataclass(frozen=True)
class SpeedRatio:
    """Speed of A over B: the median per-pair ratio and a distribution-free confidence interval for it."""

    median: float
    low: float
    high: float
    confidence: float  # the interval's exact coverage (below the level asked for when there are < 6 pairs)


def paired_speed_ratio(times_a: Sequence[float], times_b: Sequence[float], level: float = 0.95) -> SpeedRatio:
    """How much faster A runs than B (> 1: faster) from steps timed back to back: pair i gives t_b[i] / t_a[i].

    The interval is the order-statistic (sign-test) interval for the median: [r_(j), r_(n+1-j)] covers the
    true median ratio with probability 1 - 2 P(Binomial(n, 1/2) <= j - 1), for the largest j that reaches
    ``level``. It assumes nothing about the noise's shape, which on a shared machine is anything but normal.
    """
    if len(times_a) != len(times_b) or not times_a:
        raise ValueError(f"need the same number (>= 1) of paired times, got {len(times_a)} and {len(times_b)}")
    ratios = sorted(b / a for a, b in zip(times_a, times_b))
    n = len(ratios)
    j, coverage = 1, 1.0 - 2.0 * 0.5**n  # j = 1: [min, max]
    while j < (n + 1) // 2:
        wider_tail = sum(math.comb(n, i) for i in range(j + 1)) * 0.5**n  # P(Binomial(n, 1/2) <= j)
        if 1.0 - 2.0 * wider_tail < level:
            break
        j, coverage = j + 1, 1.0 - 2.0 * wider_tail
    return SpeedRatio(statistics.median(ratios), ratios[j - 1], ratios[n - j], coverage)


def matmul_peak_flops(device: str = "cpu", dtype: torch.dtype = torch.float32, max_n: int = 2048,
                      repeats: int = 5) -> float:
    """The machine's measured dense matmul rate in FLOP/s: best of ``repeats`` n x n x n products.

    n doubles from 256 while a product takes under 50 ms, up to ``max_n``, so a dtype the hardware
    runs slowly (bf16 on a CPU without bf16 units) still measures in seconds.
    """
    n = 256
    while True:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        torch.mm(a, b)  # warm-up
        best = min(timed(lambda: torch.mm(a, b), device)() for _ in range(repeats))
        if best >= 0.05 or n >= max_n:
            return 2 * n**3 / best
        n *= 2


def achieved_flops(gmacs_per_image: float, images_per_s: float, mode: str) -> float:
    """FLOP/s of a run: forward = 2 FLOPs per MAC; a training step counts 3x the forward (fwd + 2x bwd)."""
    return gmacs_per_image * 2e9 * images_per_s * (3 if mode == "train" else 1)
