"""What a checkpoint file is (a training run's, another Lightning program's, plain weights) and whether a run
may ``--resume`` from it.

``inspect_checkpoint`` says up front what a file is (one message per kind of wrong file), read safely by
``models.weights``; ``check_resume_compatible`` whether a run may continue from it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from pvt_lightning.errors import CheckpointError
from pvt_lightning.models.registry import variant_label, variant_spec
from pvt_lightning.models.weights import StateDict, detect_layout, read_state_dict_file, sniff_format, unwrap_state_dict

TRAINING = "training"
"""A pvt-lightning training checkpoint (``last.ckpt``, ``best-*.ckpt``): weights, optimizer, loop state, hparams."""
LIGHTNING = "lightning"
"""A Lightning checkpoint written by another program: resumable state, but not our model's hyper-parameters."""
STATE_DICT = "state_dict"
"""Plain weights in a PyTorch file (official release, timm, HF, or ``torch.save(model.state_dict())``)."""
SAFETENSORS = "safetensors"
"""Plain weights in a .safetensors file."""


@dataclass(frozen=True)
class CheckpointInfo:
    """What a weights file holds, read up front by ``inspect_checkpoint``."""

    path: Path
    kind: str  # TRAINING, LIGHTNING, STATE_DICT or SAFETENSORS
    layout: str | None = None  # key layout of the weights: ours / official / timm / hf; None: not recognised
    num_tensors: int = 0
    variant: str | None = None  # TRAINING only, from the saved hyper-parameters
    linear_sra: bool | None = None
    img_size: tuple[int, int] | None = None
    class_names: tuple[str, ...] | None = None
    epoch: int | None = None
    global_step: int | None = None

    def describe(self) -> str:
        """A phrase naming the kind, e.g. 'a pvt-lightning training checkpoint (b0, 32x32, 3 classes, epoch 2)'."""
        layout = f" in the {self.layout} layout" if self.layout else ""
        if self.kind == TRAINING:
            size = "x".join(map(str, self.img_size)) if self.img_size else "?"
            classes = len(self.class_names) if self.class_names is not None else "?"
            return (f"a pvt-lightning training checkpoint ({_model_name(self.variant, self.linear_sra)}, {size}, "
                    f"{classes} classes, epoch {self.epoch})")
        if self.kind == LIGHTNING:
            return "a Lightning checkpoint from another program (no pvt-lightning hyper-parameters)"
        if self.kind == SAFETENSORS:
            return f"a safetensors weights file{layout} ({self.num_tensors} tensors)"
        return f"a plain state dict{layout} ({self.num_tensors} tensors)"


def inspect_checkpoint(path: str | Path) -> CheckpointInfo:
    """Say what ``path`` holds without building a model; a missing, empty, corrupt, truncated, unsafe
    or non-checkpoint file is a CheckpointError with one message for each of those cases."""
    path = Path(path).expanduser()
    return describe_checkpoint(read_state_dict_file(path, mmap=True), path)


def describe_checkpoint(obj, path: str | Path) -> CheckpointInfo:
    """``inspect_checkpoint`` for an already loaded file."""
    path = Path(path)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} is not a checkpoint: it holds a {type(obj).__name__}, not a dict of weights; "
                              "pass a .ckpt from a run's checkpoints/ folder or a weights file")
    hparams = obj.get("hyper_parameters")
    lightning = isinstance(obj.get("state_dict"), Mapping) and any(
        k in obj for k in ("hyper_parameters", "pytorch-lightning_version", "global_step", "loops"))
    state = unwrap_state_dict(obj, path)
    layout = _layout_or_none(state)
    kind = SAFETENSORS if path.suffix == ".safetensors" or _safe_sniff(path) == "safetensors" else STATE_DICT
    if not lightning:
        return CheckpointInfo(path, kind, layout, len(state))
    if not (isinstance(hparams, Mapping) and "variant" in hparams and "class_names" in hparams):
        return CheckpointInfo(path, LIGHTNING, layout, len(state), epoch=obj.get("epoch"),
                              global_step=obj.get("global_step"))
    img_size = hparams.get("img_size")
    return CheckpointInfo(
        path, TRAINING, layout, len(state), variant=str(hparams["variant"]), linear_sra=hparams.get("linear_sra"),
        img_size=tuple(int(v) for v in img_size) if img_size is not None else None,
        class_names=tuple(str(c) for c in hparams["class_names"]), epoch=obj.get("epoch"),
        global_step=obj.get("global_step"))


def _safe_sniff(path: Path) -> str:
    try:
        return sniff_format(path)
    except OSError:
        return "other"


def _layout_or_none(state: StateDict) -> str | None:
    try:
        return detect_layout(state)
    except CheckpointError:
        return None


def _model_name(variant: str | None, linear_sra: bool | None) -> str:
    """The variant as it runs (``variant_label``), '?' if unknown, as recorded if this version does not know it."""
    if variant is None:
        return "?"
    try:
        return variant_label(variant, linear_sra)
    except ValueError:
        return variant


def _architecture(variant: str, linear_sra: bool | None):
    """What decides whether weights fit: the variant's architecture with its linear-SRA override applied."""
    spec = variant_spec(variant)
    if spec.family == "pvt_v2" and linear_sra is not None:
        return dataclasses.replace(spec.arch, linear_sra=bool(linear_sra))
    return spec.arch


def check_resumable_kind(info: CheckpointInfo) -> None:
    """CheckpointError unless ``info`` is a pvt-lightning training checkpoint (the only kind a run continues)."""
    if info.kind != TRAINING:
        raise CheckpointError(
            f"cannot --resume {info.path}: it is {info.describe()}, not a pvt-lightning training checkpoint, so it "
            f"holds no optimizer state or epoch to continue from. To start a new run from its weights, pass "
            f"--pretrained {info.path} instead of --resume")


def training_progress(checkpoint: Mapping) -> tuple[int | None, int]:
    """(epochs whose training part had finished, global step) of a loaded Lightning checkpoint. Lightning saves
    last.ckpt at the end of an epoch before it marks the epoch completed, so "processed" counts it; a checkpoint
    from mid-epoch counts only the epochs before. None: a checkpoint without loop state."""
    step = int(checkpoint.get("global_step") or 0)
    try:
        progress = checkpoint["loops"]["fit_loop"]["epoch_progress"]["current"]
        return int(progress["processed"]), step
    except (KeyError, TypeError, ValueError):
        return None, step


def check_resume_compatible(info: CheckpointInfo, variant: str, img_size: Sequence[int],
                            class_names: Sequence[str], linear_sra: bool | None = None) -> None:
    """CheckpointError unless a run of ``variant`` at ``img_size`` on ``class_names`` can continue from ``info``.

    --resume restores a run exactly (weights, optimizer, schedule, epoch); a file of another kind,
    model, input size or class list cannot be continued, and the message says how to fine-tune from
    its weights with --pretrained instead.
    """
    path = info.path
    check_resumable_kind(info)
    try:
        same_model = _architecture(info.variant, info.linear_sra) == _architecture(variant, linear_sra)
    except ValueError:  # a variant this version does not know
        same_model = False
    if not same_model:
        their = _model_name(info.variant, info.linear_sra)
        raise CheckpointError(
            f"cannot --resume {path}: it is a {their} checkpoint and this run builds "
            f"{_model_name(variant, linear_sra)}. Run with --variant {info.variant}"
            f"{'' if info.linear_sra is None else (' --linear-sra' if info.linear_sra else ' --no-linear-sra')} "
            f"to continue it (its weights do not fit another model, so --pretrained cannot use them either)")
    run_size, run_classes = tuple(int(v) for v in img_size), tuple(class_names)
    differences = []
    if info.img_size is not None and info.img_size != run_size:
        differences.append(f"input size {_hw(info.img_size)} (this run: {_hw(run_size)})")
    if info.class_names != run_classes:
        differences.append(f"classes {_classes(info.class_names)} (this run: {_classes(run_classes)})")
    if differences:
        head = ("; the classifier head is re-initialised because the number of classes differs"
                if info.class_names is not None and len(info.class_names) != len(run_classes) else "")
        raise CheckpointError(
            f"cannot --resume {path}: it was trained with {' and '.join(differences)}. --resume continues a run "
            f"exactly as it was; to fine-tune from its weights with this run's settings, pass --pretrained {path} "
            f"instead (a new run{head})")


def _hw(size: Sequence[int]) -> str:
    return "x".join(str(v) for v in size)


def _classes(names: Sequence[str] | None, limit: int = 6) -> str:
    if names is None:
        return "unknown"
    shown = ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")
    return f"[{shown}]"
