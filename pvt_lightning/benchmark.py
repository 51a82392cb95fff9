"""Measuring a model's speed and memory: images/s for inference or a training step, and peak memory.

Used by ``experiments/benchmark.py`` and the ablation notebooks. Timings are the median of
timed steps after warm-up (CUDA-synchronised on a GPU). ``compare_step_times`` interleaves two
models step by step (A B B A ...) so that drift of a shared machine hits both alike, and
``paired_speed_ratio`` turns the pairs into a speed ratio with a confidence interval.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Sequence

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

    def _run(self) -> None:
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

    def step(self) -> float:
        synchronize(self.device)
        start = time.perf_counter()
        self._run()
        synchronize(self.device)
        return time.perf_counter() - start


def measure_throughput(model: nn.Module, img_size: tuple[int, int] = (224, 224), batch_size: int = 16,
                       mode: str = "infer", device: str = "cpu", precision: str = "32", steps: int = 10,
                       warmup: int = 3, channels_last: bool = False) -> float:
    """Images per second of ``model`` at ``img_size`` (H, W): median over ``steps`` timed steps after ``warmup``."""
    runner = StepRunner(model, img_size, batch_size, mode, device, precision, channels_last)
    for _ in range(warmup):
        runner.step()
    times = [runner.step() for _ in range(steps)]
    return batch_size / statistics.median(times)


def compare_step_times(models: Sequence[nn.Module], img_size: tuple[int, int] = (224, 224), batch_size: int = 16,
                       mode: str = "infer", device: str = "cpu", precision: str = "32", steps: int = 10,
                       warmup: int = 3, channels_last: bool = False) -> list[list[float]]:
    """Wall times of ``steps`` steps per model, interleaved (A B, B A, ...) so machine drift hits all alike;
    the i-th times of two models ran back to back, so they pair up (see ``paired_speed_ratio``)."""
    runners = [StepRunner(m, img_size, batch_size, mode, device, precision, channels_last) for m in models]
    for _ in range(warmup):
        for r in runners:
            r.step()
    times: list[list[float]] = [[] for _ in runners]
    for i in range(steps):
        order = range(len(runners)) if i % 2 == 0 else reversed(range(len(runners)))  # A B, B A: no position bias
        for j in order:
            times[j].append(runners[j].step())
    return times


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


# --- memory ----------------------------------------------------------------------------------------

@dataclass
class PeakMemory:
    peak_mb: float  # peak memory of the whole process (CPU: RSS) or of CUDA allocations during the steps
    activations_mb: float  # peak minus the memory held before the first step (model, grads, optimizer state)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux /proc/self/clear_refs, 5); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_peak_memory_here(model: nn.Module, img_size: tuple[int, int] = (224, 224), batch_size: int = 16,
                             mode: str = "train", device: str = "cpu", precision: str = "32", steps: int = 2,
                             channels_last: bool = False) -> PeakMemory:
    """Peak memory of ``steps`` steps, measured in this process.

    On CPU, RSS also holds whatever this process touched before, so prefer ``measure_peak_memory``
    (a fresh subprocess). Before the timed steps, gradients and AdamW state are allocated, so
    ``activations_mb`` is what the forward/backward pass itself needs.
    """
    runner = StepRunner(model, img_size, batch_size, mode, device, precision, channels_last)
    if mode == "train":  # allocate grads and optimizer state up front: they are not activations
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        runner.optimizer.step()
    if device.startswith("cuda"):
        synchronize(device)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
        for _ in range(steps):
            runner.step()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        base = _rss_mb()
        _reset_peak_rss()
        for _ in range(steps):
            runner.step()
        peak = _peak_rss_mb()
    return PeakMemory(peak_mb=peak, activations_mb=peak - base)


def measure_peak_memory(model_name: str, img_size: tuple[int, int] = (224, 224), batch_size: int = 16,
                        mode: str = "train", device: str = "cpu", precision: str = "32", impl: str = "ours",
                        grad_checkpointing: bool = False, channels_last: bool = False, steps: int = 2,
                        timeout: float = 1800, keep_freed_memory: bool = False) -> PeakMemory:
    """Peak memory of a model built by name (``impl`` 'ours', 'timm' or 'torchvision'), in a fresh subprocess.

    A fresh process makes CPU peak RSS mean this model only; on CUDA it also isolates the caching allocator.
    """
    return measure_peak_memories(model_name, img_size, batch_size, (mode,), device, precision, impl,
                                 grad_checkpointing, channels_last, steps, timeout, keep_freed_memory)[mode]


def measure_peak_memories(model_name: str, img_size: tuple[int, int] = (224, 224), batch_size: int = 16,
                          modes: Sequence[str] = MODES, device: str = "cpu", precision: str = "32",
                          impl: str = "ours", grad_checkpointing: bool = False, channels_last: bool = False,
                          steps: int = 2, timeout: float = 1800, keep_freed_memory: bool = False) -> dict[str, PeakMemory]:
    """``measure_peak_memory`` for several modes in one subprocess (inference first: its peak is the lower).

    ``keep_freed_memory`` applies ``pvt_lightning.allocator.keep_freed_memory`` in the subprocess.

    The peak-RSS mark is reset between modes (Linux); where that is unsupported, only the first mode's
    CPU peak is exact and later ones are upper bounds of their own peak.
    """
    spec = dict(model_name=model_name, img_size=list(img_size), batch_size=batch_size,
                modes=sorted(modes, key=MODES.index), device=device, precision=precision, impl=impl,
                grad_checkpointing=grad_checkpointing, channels_last=channels_last, steps=steps,
                keep_freed_memory=keep_freed_memory)
    code = "import sys, json; from pvt_lightning.benchmark import _memory_worker; _memory_worker(json.loads(sys.argv[1]))"
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True,
                          timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"memory measurement of {impl} {model_name} failed:\n{proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {mode: PeakMemory(**values) for mode, values in result.items()}


def _memory_worker(spec: dict) -> None:
    if spec.get("keep_freed_memory"):
        from .allocator import keep_freed_memory

        keep_freed_memory()
    torch.manual_seed(0)
    model = build_model(spec["model_name"], spec["impl"]).to(spec["device"])
    if spec["grad_checkpointing"]:
        model.set_grad_checkpointing(True)
    if spec["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    result = {}
    for mode in spec["modes"]:
        mem = measure_peak_memory_here(model, tuple(spec["img_size"]), spec["batch_size"], mode, spec["device"],
                                       spec["precision"], spec["steps"], spec["channels_last"])
        result[mode] = {"peak_mb": mem.peak_mb, "activations_mb": mem.activations_mb}
    print(json.dumps(result))


# --- models ----------------------------------------------------------------------------------------

def build_model(name: str, impl: str = "ours", num_classes: int = 1000) -> nn.Module:
    """Our model, or the reference implementation of the same architecture (timm's ``pvt_v2_*`` or
    torchvision's ``resnet50``), randomly initialised."""
    from .models import canonical_name, create_model

    key = canonical_name(name)
    if impl == "ours":
        return create_model(key, num_classes=num_classes)
    if impl in ("timm", "torchvision", "reference"):
        if key == "resnet50":
            import torchvision

            return torchvision.models.resnet50(num_classes=num_classes)
        import timm

        return timm.create_model(f"pvt_v2_{key}", pretrained=False, num_classes=num_classes)
    raise ValueError(f"unknown implementation {impl!r}; choose ours, timm or torchvision")


def reference_with_same_weights(ours: nn.Module, name: str) -> nn.Module:
    """The reference implementation of ``name`` carrying exactly ``ours``' weights."""
    from .models import canonical_name

    key = canonical_name(name)
    ref = build_model(key, "timm" if key != "resnet50" else "torchvision", num_classes=ours.num_classes
                      if hasattr(ours, "num_classes") else 1000)
    state = ours.state_dict()
    if key != "resnet50":  # ours -> timm key layout (the inverse of checkpoints.timm_to_ours)
        import re

        state = {re.sub(r"^stages\.0\.patch_embed\.", "patch_embed.",
                        re.sub(r"^stages\.([123])\.patch_embed\.", r"stages.\1.downsample.", k)): v
                 for k, v in state.items()}
    ref.load_state_dict(state)
    return ref


# --- machine peak ------------------------------------------------------------------------------------

def matmul_peak_flops(device: str = "cpu", dtype: torch.dtype = torch.float32, max_n: int = 2048,
                      repeats: int = 5) -> float:
    """The machine's measured dense matmul rate in FLOP/s: best of ``repeats`` n x n x n products.

    n doubles from 256 while a product takes under 50 ms, up to ``max_n``, so a dtype the hardware
    runs slowly (bf16 on a CPU without bf16 units: about 1 GFLOP/s) still measures in seconds.
    """
    n = 256
    while True:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        torch.mm(a, b)  # warm-up
        best = float("inf")
        for _ in range(repeats):
            synchronize(device)
            start = time.perf_counter()
            torch.mm(a, b)
            synchronize(device)
            best = min(best, time.perf_counter() - start)
        if best >= 0.05 or n >= max_n:
            return 2 * n**3 / best
        n *= 2


def achieved_flops(gmacs_per_image: float, images_per_s: float, mode: str) -> float:
    """FLOP/s of a run: forward = 2 FLOPs per MAC; a training step counts 3x the forward (fwd + 2x bwd)."""
    return gmacs_per_image * 2e9 * images_per_s * (3 if mode == "train" else 1)


__all__ = [
    "MODES", "PRECISIONS", "PeakMemory", "SpeedRatio", "StepRunner", "achieved_flops", "autocast_context",
    "build_model", "compare_step_times", "compare_throughput", "matmul_peak_flops", "measure_peak_memories",
    "measure_peak_memory", "measure_peak_memory_here", "measure_throughput", "paired_speed_ratio",
    "reference_with_same_weights",
]
