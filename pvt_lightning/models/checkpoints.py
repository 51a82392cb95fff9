"""Loading weights into our models from the official, timm, HF transformers and our own layouts.

Every file is read with ``torch.load(..., weights_only=True)`` (or safetensors): a checkpoint
that needs arbitrary unpickling is refused, so nothing in it can run.
"""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn

StateDict = dict[str, torch.Tensor]


class CheckpointError(ValueError):
    """A weights file that cannot be used: unreadable, unsafe, or not matching the model."""


def read_state_dict_file(path: str | Path, map_location="cpu") -> Mapping:
    """Read a checkpoint file without unpickling arbitrary objects; any failure is a CheckpointError."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path} (pass the path of a .pth/.pt/.ckpt/.safetensors file)")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise CheckpointError(f"{path} is a safetensors file; install it with `pip install safetensors`") from err
        return load_file(str(path))
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        forbidden = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        raise CheckpointError(
            f"refused to load {path}: it holds objects other than tensors and plain containers"
            f"{f' ({forbidden.group(1)})' if forbidden else ''}, and unpickling them could run arbitrary code. "
            f"If you trust the file, re-save only its state dict with "
            f"torch.save(obj['model'].state_dict(), 'weights.pth') and pass that."
        ) from None
    except (RuntimeError, EOFError, OSError, KeyError, ValueError) as err:
        raise CheckpointError(f"cannot read weights file {path}: {err}. Is it a complete PyTorch checkpoint?") from None


def unwrap_state_dict(obj: Mapping) -> StateDict:
    """Find the tensors in a checkpoint: flat, or under ``model`` / ``state_dict`` (Lightning, official training)."""
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError("checkpoint holds no state dict (expected a dict of tensors, or one under 'model'/'state_dict')")
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
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
    return "fc." if hasattr(model, "fc") and not hasattr(model, "stages") else "head."


def load_pretrained(model: nn.Module, path: str | Path) -> list[str]:
    """Load weights from ``path`` into ``model`` in place; returns the head keys it dropped.

    A classifier head whose shape differs from the model's (fine-tuning on your own classes)
    is left freshly initialised, with one warning; any other mismatch is a CheckpointError.
    """
    state = unwrap_state_dict(read_state_dict_file(path))
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
