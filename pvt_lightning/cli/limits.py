"""What values are sane: finite numbers within range, devices that exist, traced sizes that fit in memory.

jsonargparse's number types check signs (``PositiveFloat``...) but take ``inf``, ``1e400`` (= inf) and
``1e300``; each would surface later as a traceback or a NaN loss. ``check_numbers`` refuses every
non-finite float of a configuration and the absurd ranges of ``UPPER_BOUNDS``; ``check_devices`` compares
``--devices`` with what this machine has, before any run folder is claimed; ``check_export_memory`` refuses
an export size whose forward pass would need more memory than the machine has; ``check_exported_size`` an
input size a fixed-size exported file cannot take.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

from pvt_lightning.errors import UsageError

UPPER_BOUNDS = {
    "lr": (10.0, "a learning rate above 10 diverges at the first step"),
    "base_lr": (10.0, "a learning rate above 10 per 512 images diverges at the first step"),
    "weight_decay": (10.0, "AdamW weight decay is usually 0.01-0.1; above 10 it erases the weights"),
    "warmup_epochs": (100_000.0, "a warm-up longer than any run"),
    "focal_gamma": (100.0, "focal loss uses gamma 0-5; above 100 every image counts as easy"),
    "mixup": (1000.0, "MixUp alpha is usually 0.1-1"),
    "cutmix": (1000.0, "CutMix alpha is usually 1"),
    "head_lr_scale": (10_000.0, "the head would diverge"),
    "grad_clip": (1e9, "that clips nothing"),
    "checkpoint_every_minutes": (527_040.0, "that is more than a year"),
    "tolerance": (1e6, "that checks nothing"),
}
"""Largest sane value of a float option, and why; every float option must also be finite."""


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_numbers(config: Any) -> None:
    """Every float of ``config`` (a configuration dataclass) finite, and the options of ``UPPER_BOUNDS`` in range."""
    for spec in dataclasses.fields(config):
        value = getattr(config, spec.name)
        values = value if isinstance(value, (list, tuple)) else [value]
        for item in values:
            if isinstance(item, float) and not math.isfinite(item):
                raise UsageError(f"{flag(spec.name)} {item}: must be a finite number (as a flag, or as the key "
                                 f"'{spec.name.replace('_', '-')}' of a --config file)")
        bound = UPPER_BOUNDS.get(spec.name)
        if bound is not None and isinstance(value, (int, float)) and not isinstance(value, bool) and value > bound[0]:
            raise UsageError(f"{flag(spec.name)} {value:g}: at most {bound[0]:g} ({bound[1]})")


def usable_cpus() -> int:
    """CPU cores this process may run on (its affinity mask; os.cpu_count() where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def check_device_list(devices: int | str | list[int]) -> None:
    """``--devices`` as written: a list names each index once (checked when the options are parsed)."""
    if isinstance(devices, list) and len(set(devices)) != len(devices):
        raise UsageError(f"--devices {','.join(map(str, devices))}: a device is listed twice; list each index once")


def check_devices(devices: int | str | list[int], accelerator: str) -> None:
    """``--devices`` against this machine, when a job starts (a config file for a GPU cluster still parses on a
    laptop): GPU indices that exist, at most one CPU process per core. Counts are devices per node, so the check
    holds on every node of a multi-node run alike; mps/tpu are left to Lightning."""
    import torch

    check_device_list(devices)
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if on_gpu:
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if available == 0:
            raise UsageError(f"--accelerator {accelerator}: no CUDA device is visible here; use --accelerator cpu")
        wanted = devices if isinstance(devices, list) else None
        if wanted is not None and max(wanted) >= available:
            raise UsageError(f"--devices {','.join(map(str, devices))}: this machine has {available} CUDA "
                             f"device(s), indices 0-{available - 1}")
        if isinstance(devices, int) and devices > available:
            raise UsageError(f"--devices {devices}: this machine has {available} CUDA device(s); use at most "
                             f"{available} (or -1 for all)")
    elif accelerator in ("cpu", "auto"):
        if isinstance(devices, list):
            raise UsageError(f"--devices {','.join(map(str, devices))}: on the CPU --devices is a number of "
                             "processes, not a list of device indices")
        cores = usable_cpus()
        if isinstance(devices, int) and devices > cores:
            raise UsageError(f"--devices {devices}: on the CPU each device is a training process, and this machine "
                             f"has {cores} core(s) for this job; use at most {cores}")


def trace_memory_bytes(variant: str, img_size: tuple[int, int], batch: int, linear_sra: bool | None = None,
                       attention_matrix: bool = True) -> int:
    """About the memory one float32 forward pass needs at ``img_size``: the first stage's activations (stride 4,
    the widest token grid), plus for PVTv2 with spatial-reduction attention its attention matrix (queries x keys),
    which onnxruntime materialises (``attention_matrix``; torch's fused attention does not)."""
    from pvt_lightning.models.registry import PVT_V2_CONFIGS, variant_spec

    h, w = img_size
    tokens = math.ceil(h / 4) * math.ceil(w / 4)
    config = PVT_V2_CONFIGS.get(variant_spec(variant).name)
    if config is None:  # resnet50: 256 channels at stride 4, a few tensors alive at once
        return batch * tokens * 256 * 4 * 4
    activations = batch * tokens * config.embed_dims[0] * config.mlp_ratios[0] * 4 * 4
    linear = config.linear_sra if linear_sra is None else linear_sra
    keys = 49 if linear else max(1, tokens // (config.sr_ratios[0] ** 2))
    attention = batch * config.num_heads[0] * tokens * keys * 4 if attention_matrix else 0
    return int(activations + attention)


def physical_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def check_export_memory(config: Any) -> None:
    """``export --img-size`` against this machine's memory, before tracing: refused when one forward pass of the
    model (the checkpoint's or --variant's) would need more than half of it. Without --img-size the checkpoint's
    own size (it trained at it) or the default is traced."""
    from pvt_lightning.export.metadata import export_format
    from pvt_lightning.models.registry import variant_spec

    if config.img_size is None or config.output is None:
        return
    variant, linear_sra = config.variant, None
    if config.checkpoint is not None:
        from pvt_lightning.runs.checkpoint_info import inspect_checkpoint

        info = inspect_checkpoint(config.checkpoint)
        variant, linear_sra = info.variant, info.linear_sra
    try:
        variant = variant_spec(str(variant)).name
    except ValueError:  # no variant, or one this version does not know: the export itself says so
        return
    batch = config.batch_size if isinstance(config.batch_size, int) else 1
    onnx = export_format(config.output, config.format) == "onnx"  # onnxruntime runs the parity check
    needed = trace_memory_bytes(variant, tuple(config.img_size), batch, linear_sra, attention_matrix=onnx)
    total = physical_memory_bytes()
    if total is not None and needed > total // 2:
        h, w = config.img_size
        raise UsageError(f"--img-size {h} {w}: one forward pass of {variant} at {h}x{w} (batch {batch}) needs about "
                         f"{needed / 2**30:,.1f} GiB and this machine has {total / 2**30:,.1f} GiB; export at the size "
                         "you will run (with --dynamic the file takes other sizes too)")


def check_exported_size(model: Any, img_size: Any, path: Any) -> None:
    """UsageError when ``model`` (an exported file's classifier) was exported for one input size and ``--img-size``
    asks for another; checkpoints and --dynamic exports take any size."""
    metadata = getattr(model, "metadata", None)
    if metadata is None or metadata.dynamic_size or img_size is None:
        return
    if tuple(img_size) != tuple(metadata.img_size):
        h, w = metadata.img_size
        raise UsageError(f"--img-size {img_size[0]} {img_size[1]}: {path} was exported for {h}x{w} inputs only; "
                         f"leave out --img-size (or pass {h} {w}), or export again with --dynamic for other sizes")
