"""Reading weight files safely and loading them into our models from the official, timm, HF transformers
and our own key layouts.

Every file is read with ``torch.load(..., weights_only=True)`` (or safetensors): a checkpoint
that needs arbitrary unpickling is refused, so nothing in it can run. What kind of checkpoint a file
is, and whether a run may resume from it, is ``pvt_lightning.runs.checkpoint_info``'s job.
"""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn

from pvt_lightning.errors import CheckpointError

StateDict = dict[str, torch.Tensor]

_TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"  # pickled magic number


def sniff_format(path: Path) -> str:
    """'empty', 'torch' (torch.save's zip or legacy format), 'pickle' (another pickle), 'safetensors'
    (8-byte header length, then JSON) or 'other'."""
    with open(path, "rb") as file:
        head = file.read(16)
    if not head:
        return "empty"
    if head.startswith((b"PK\x03\x04", _TORCH_LEGACY_MAGIC)):
        return "torch"
    if head[:1] == b"\x80":
        return "pickle"
    if len(head) > 8 and head[8:9] == b"{":
        return "safetensors"
    return "other"


def _looks_like(path: Path) -> str:
    """A few words on what a file that is not a checkpoint seems to be."""
    with open(path, "rb") as file:
        head = file.read(256)
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"it starts with the bytes {head[:8]!r}"
    first_line = text.strip().splitlines()[0][:60] if text.strip() else ""
    return f"it is a text file starting {first_line!r}"


def read_state_dict_file(path: str | Path, map_location="cpu", mmap: bool = False) -> Mapping:
    """Read a checkpoint file without unpickling arbitrary objects; any failure is one CheckpointError.

    ``mmap``: map a zip-format PyTorch file instead of reading it (tensors are paged in when used);
    cheap for looking at a large checkpoint.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; pass the weights file in it (a .pth/.pt/.ckpt/.safetensors file)")
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path} (pass the path of a .pth/.pt/.ckpt/.safetensors file)")
    try:
        kind = sniff_format(path)
    except OSError as err:
        raise CheckpointError(f"cannot read weights file {path}: {err.strerror}") from None
    if kind == "empty":
        raise CheckpointError(f"weights file {path} is empty (0 bytes): an interrupted download or copy? "
                              "Copy or download it again")
    if path.suffix == ".safetensors" or kind == "safetensors":
        return _read_safetensors(path)
    if kind not in ("torch", "pickle"):
        raise CheckpointError(f"{path} is not a checkpoint: {_looks_like(path)}. Pass a PyTorch checkpoint "
                              "(.ckpt/.pth/.pt, written by torch.save) or a .safetensors weights file")
    try:
        return _torch_load(path, map_location, mmap)
    except pickle.UnpicklingError as err:
        # torch names a refused global two ways: "Unsupported global: GLOBAL m.f was not an allowed global" and
        # "Trying to load unsupported GLOBAL posix.system whose module posix is blocked": unsafe, not truncated.
        forbidden = re.search(r"[Uu]nsupported (?:global: )?GLOBAL (\S+)", str(err))
        if forbidden is None and kind == "torch":
            raise CheckpointError(f"cannot read weights file {path}: it is corrupt or truncated "
                                  f"({_last_line(err)}); copy or download it again") from None
        what = (f"it holds objects other than tensors and plain containers ({forbidden.group(1)})" if forbidden else
                f"it is a pickle not written by torch.save, which the weights-only loader cannot read "
                f"({_last_line(err)})")
        raise CheckpointError(
            f"refused to load {path}: {what}, and unpickling it fully could run arbitrary code. "
            f"If you trust the file, re-save only its state dict with "
            f"torch.save(obj['model'].state_dict(), 'weights.pth') and pass that."
        ) from None
    except (RuntimeError, EOFError, OSError, KeyError, ValueError, IndexError, TypeError, AttributeError) as err:
        raise CheckpointError(f"cannot read weights file {path}: it is corrupt or truncated ({_last_line(err)}); "
                              "copy or download it again") from None


def _torch_load(path: Path, map_location, mmap: bool):
    if mmap:
        try:
            return torch.load(path, map_location=map_location, weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap can only be used" not in str(err):  # a legacy (non-zip) file: read it whole
                raise
    return torch.load(path, map_location=map_location, weights_only=True)


def _read_safetensors(path: Path) -> StateDict:
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise CheckpointError(f"{path} is a safetensors file; install it with `pip install safetensors`") from err
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {path}: it is a corrupt or truncated safetensors file ({err}); "
                              "copy or download it again") from None


def _last_line(err: BaseException) -> str:
    """The informative part of torch's multi-paragraph load errors."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    text = lines[0] if lines else type(err).__name__
    if text.startswith("Weights only load failed") and len(lines) > 1:
        text = next((line for line in lines[1:] if not line.startswith(("Please", "Check", "Re-running"))), text)
    if text.startswith("PytorchStreamReader failed"):
        text = text.split(". This is an internal miniz error")[0]
    return text[:200]


def unwrap_state_dict(obj: Mapping, path: str | Path | None = None) -> StateDict:
    """Find the tensors in a checkpoint: flat, or under ``model`` / ``state_dict`` (Lightning, official training)."""
    where = f"{path} " if path is not None else "checkpoint "
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{where}is not a checkpoint: it holds a {type(obj).__name__}, not a dict of weights")
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise CheckpointError(f"{where}holds no weights (expected a dict of tensors, or one under "
                              "'model'/'state_dict'); is it a checkpoint at all?")
    # Lightning (ImageClassifier.model), torch.compile and DDP wrappers prefix every key.
    for prefix in ("model.", "_orig_mod.", "module."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


# --- key layouts -> ours -------------------------------------------------------------------------
# ours:     stages.{s}.patch_embed.*, stages.{s}.blocks.{j}.{norm1,attn.*,norm2,mlp.{fc1,dwconv,fc2}}.*,
#           stages.{s}.norm.*, head.*                                     (s = 0..3)

def _rename(state: StateDict, rules: list[tuple[str, str | Callable]]) -> StateDict:
    out = {}
    for key, value in state.items():
        for pattern, repl in rules:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def _stage(offset: int) -> Callable[[re.Match], str]:
    return lambda m: f"stages.{int(m.group(1)) + offset}."


def official_to_ours(state: StateDict) -> StateDict:
    """whai362/PVT release: patch_embed{i}, block{i}.{j}, norm{i} (i = 1..4), mlp.dwconv.dwconv."""
    return _rename(state, [
        (r"^patch_embed(\d)\.", lambda m: f"stages.{int(m.group(1)) - 1}.patch_embed."),
        (r"^block(\d)\.(\d+)\.", lambda m: f"stages.{int(m.group(1)) - 1}.blocks.{m.group(2)}."),
        (r"^norm(\d)\.", lambda m: f"stages.{int(m.group(1)) - 1}.norm."),
        (r"\.mlp\.dwconv\.dwconv\.", ".mlp.dwconv."),
    ])


def timm_to_ours(state: StateDict) -> StateDict:
    """timm: patch_embed (stage 0), stages.{1,2,3}.downsample, stages.{s}.blocks / .norm."""
    return _rename(state, [
        (r"^patch_embed\.", "stages.0.patch_embed."),
        (r"^stages\.(\d)\.downsample\.", lambda m: f"stages.{m.group(1)}.patch_embed."),
    ])


def hf_to_ours(state: StateDict) -> StateDict:
    """HF transformers PvtV2: split key/value re-fused into kv; descriptive names mapped back."""
    state = {k.removeprefix("pvt_v2."): v for k, v in state.items()}
    fused: StateDict = {}
    for key in list(state):
        if ".attention.key." in key:
            value_key = key.replace(".attention.key.", ".attention.value.")
            fused[key.replace(".attention.key.", ".attention.kv.")] = torch.cat([state.pop(key), state.pop(value_key)])
    state.update(fused)
    return _rename(state, [
        (r"^encoder\.layers\.(\d)\.", _stage(0)),
        (r"\.patch_embedding\.layer_norm\.", ".patch_embed.norm."),
        (r"\.patch_embedding\.", ".patch_embed."),
        (r"\.layer_norm_1\.", ".norm1."),
        (r"\.layer_norm_2\.", ".norm2."),
        (r"\.attention\.query\.", ".attn.q."),
        (r"\.attention\.spatial_reduction\.", ".attn.sr."),
        (r"\.attention\.layer_norm\.", ".attn.norm."),
        (r"\.attention\.", ".attn."),
        (r"\.mlp\.dense1\.", ".mlp.fc1."),
        (r"\.mlp\.dense2\.", ".mlp.fc2."),
        (r"\.mlp\.dwconv\.dwconv\.", ".mlp.dwconv."),
        (r"^(stages\.\d)\.layer_norm\.", r"\1.norm."),
        (r"^classifier\.", "head."),
    ])


def detect_layout(state: StateDict) -> str:
    """Name the key layout of a PVTv2 state dict: 'ours', 'official', 'timm' or 'hf'."""
    if "stages.0.patch_embed.proj.weight" in state:
        return "ours"
    if "patch_embed1.proj.weight" in state:
        return "official"
    if "patch_embed.proj.weight" in state:
        return "timm"
    if any(k.startswith(("pvt_v2.encoder.", "encoder.layers.")) for k in state):
        return "hf"
    sample = ", ".join(list(state)[:3])
    raise CheckpointError(
        f"unrecognised PVTv2 checkpoint layout (first keys: {sample}); expected the official release, timm, "
        f"HF transformers or a pvt-lightning checkpoint"
    )


CONVERTERS = {"ours": dict, "official": official_to_ours, "timm": timm_to_ours, "hf": hf_to_ours}


def to_our_layout(state: StateDict) -> StateDict:
    return CONVERTERS[detect_layout(state)](state)


def head_prefix(model: nn.Module) -> str:
    """State-dict prefix of the model's classifier (``get_classifier()``): 'head.' for PVTv2, 'fc.' for resnet50."""
    head = model.get_classifier()
    return next(name for name, module in model.named_modules() if module is head) + "."


WEIGHTS_IN_FOLDER = ("model.safetensors", "pytorch_model.bin")
"""A folder passed as weights (a Hugging Face or timm hub download) is read through the first of these it holds."""


def weights_file(path: str | Path) -> Path:
    """``path`` itself, or for a folder its ``model.safetensors`` / ``pytorch_model.bin``."""
    path = Path(path).expanduser()
    if not path.is_dir():
        return path
    for name in WEIGHTS_IN_FOLDER:
        if (path / name).is_file():
            return path / name
    raise CheckpointError(f"{path} is a folder without {' or '.join(WEIGHTS_IN_FOLDER)}; pass the weights file "
                          "itself (.pth/.pt/.ckpt/.safetensors)")


def load_pretrained(model: nn.Module, path: str | Path) -> list[str]:
    """Load weights from ``path`` (a file, or a folder holding ``WEIGHTS_IN_FOLDER``) into ``model`` in place;
    returns the head keys it dropped.

    A classifier head whose shape differs from the model's (fine-tuning on your own classes)
    is left freshly initialised, with one warning; any other mismatch is a CheckpointError.
    """
    path = weights_file(path)
    state = unwrap_state_dict(read_state_dict_file(path), path)
    if hasattr(model, "stages"):
        state = to_our_layout(state)
    own = model.state_dict()
    head = head_prefix(model)
    dropped_head = [k for k in state if k.startswith(head) and _is_other_class_count(state[k], own.get(k))]
    for key in dropped_head:
        state.pop(key)
    if dropped_head:
        warnings.warn(
            f"{Path(path).name}: classifier head does not match this model's {getattr(model, 'num_classes', '?')} "
            f"classes; re-initialised it (dropped {', '.join(dropped_head)})",
            stacklevel=2,
        )
    missing = [k for k in own if k not in state and not (dropped_head and k.startswith(head))]
    unexpected = [k for k in state if k not in own]
    misshaped = [f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                 for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or misshaped:
        raise CheckpointError(
            f"{path} does not fit this model (is it the same variant and linear_sra setting?):"
            + _listing("missing", missing) + _listing("unexpected", unexpected) + _listing("mis-shaped", misshaped)
        )
    model.load_state_dict(state, strict=False)
    return dropped_head


def _is_other_class_count(saved: torch.Tensor, own: torch.Tensor | None) -> bool:
    """A head tensor for another number of classes (same feature width), or a model without a head."""
    return own is None or (saved.shape != own.shape and saved.shape[1:] == own.shape[1:])


def _listing(what: str, keys: list[str], limit: int = 8) -> str:
    if not keys:
        return ""
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"\n  {len(keys)} {what} key(s): " + ", ".join(keys[:limit]) + more
