"""Peak memory of a model's steps: CPU peak RSS or CUDA peak allocation, above what the process held before.

On CPU, RSS also holds whatever the process touched earlier, so ``measure_peak_memories`` runs the
steps in a fresh subprocess (which also isolates CUDA's caching allocator).
"""

from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from tools.bench.timing import MODES, StepRunner, synchronize


@dataclass
class PeakMemory:
    peak_mb: float  # peak memory of the whole process (CPU: RSS) or of CUDA allocations during the steps
    activations_mb: float  # peak minus the memory held before the first step (model, grads, optimizer state)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux /proc/self/clear_refs, 5); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def release_memory() -> None:
    """Free what can be freed: Python garbage, CUDA's cache, and (glibc) heap pages back to the OS."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure_peak_memory_here(model: nn.Module, img_size: tuple[int, int] = (224, 224), batch_size: int = 16,
                             mode: str = "train", device: str = "cpu", precision: str = "32", steps: int = 2,
                             channels_last: bool = False) -> PeakMemory:
    """Peak memory of ``steps`` steps, measured in this process.

    Gradients and AdamW state are allocated before the measured steps, so ``activations_mb`` is what
    the forward/backward pass itself needs. On CPU prefer ``measure_peak_memories`` (a fresh process).
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
        base = rss_mb()
        reset_peak_rss()
        for _ in range(steps):
            runner.step()
        peak = peak_rss_mb()
    return PeakMemory(peak_mb=peak, activations_mb=peak - base)


def measure_peak_memory(model_name: str, img_size: tuple[int, int] = (224, 224), batch_size: int = 16,
                        mode: str = "train", **kwargs) -> PeakMemory:
    """``measure_peak_memories`` for one mode."""
    return measure_peak_memories(model_name, img_size, batch_size, (mode,), **kwargs)[mode]


def measure_peak_memories(model_name: str, img_size: tuple[int, int] = (224, 224), batch_size: int = 16,
                          modes: Sequence[str] = MODES, device: str = "cpu", precision: str = "32",
                          impl: str = "ours", grad_checkpointing: bool = False, channels_last: bool = False,
                          steps: int = 2, timeout: float = 1800, keep_freed_memory: bool = False,
                          compile_regions: bool = False) -> dict[str, PeakMemory]:
    """Peak memory per mode of a model built by name (``impl`` 'ours' or 'reference'), in a fresh subprocess.

    Inference runs first (its peak is the lower); the peak-RSS mark is reset between modes (Linux),
    where that is unsupported later modes' CPU peaks are upper bounds. ``keep_freed_memory`` applies
    ``pvt_lightning.training.allocator.keep_freed_memory`` in the subprocess, as training runs do. ``compile_regions``
    compiles the model per block (``pvt_lightning.training.compile``) and runs one unmeasured step per mode first.
    """
    spec = dict(model_name=model_name, img_size=list(img_size), batch_size=batch_size,
                modes=sorted(modes, key=MODES.index), device=device, precision=precision, impl=impl,
                grad_checkpointing=grad_checkpointing, channels_last=channels_last, steps=steps,
                keep_freed_memory=keep_freed_memory, compile_regions=compile_regions)
    result = run_worker("tools.bench.memory", spec, timeout, f"memory measurement of {impl} {model_name}")
    return {mode: PeakMemory(**values) for mode, values in result.items()}


def child_env() -> dict[str, str]:
    """This environment, with this checkout first on the path and no run version inherited from a caller."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("PVT_LIGHTNING_RUN_VERSION", None)
    env.setdefault("MPLBACKEND", "Agg")
    return env


def run_worker(module: str, spec: dict, timeout: float, what: str):
    """Run ``module.memory_worker(spec)`` in a fresh interpreter; returns the JSON it prints last."""
    code = f"import sys, json; from {module} import memory_worker; memory_worker(json.loads(sys.argv[1]))"
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True,
                          timeout=timeout, env=child_env())
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def memory_worker(spec: dict) -> None:
    """Subprocess side of ``measure_peak_memories``: prints {mode: {peak_mb, activations_mb}} as JSON."""
    from tools.bench.reference import build_model

    if spec.get("keep_freed_memory"):
        from pvt_lightning.training.allocator import keep_freed_memory

        keep_freed_memory()
    torch.manual_seed(0)
    model = build_model(spec["model_name"], spec["impl"]).to(spec["device"])
    if spec["grad_checkpointing"]:
        model.set_grad_checkpointing(True)
    if spec["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    if spec.get("compile_regions"):
        from pvt_lightning.training.compile import compile_regions

        compile_regions(model)
    result = {}
    for mode in spec["modes"]:
        if spec.get("compile_regions"):  # compiling is not part of the step's memory
            measure_peak_memory_here(model, tuple(spec["img_size"]), spec["batch_size"], mode, spec["device"],
                                     spec["precision"], 1, spec["channels_last"])
        mem = measure_peak_memory_here(model, tuple(spec["img_size"]), spec["batch_size"], mode, spec["device"],
                                       spec["precision"], spec["steps"], spec["channels_last"])
        result[mode] = {"peak_mb": mem.peak_mb, "activations_mb": mem.activations_mb}
    print(json.dumps(result))
