"""``--resume``: continue exactly the run a checkpoint belongs to, with its own saved configuration.

The run's settings come from ``hparams.yaml`` in the checkpoint's version folder (else from the
checkpoint's hyper-parameters), so no flag needs repeating. A flag that changes what is trained (data,
model, recipe values, loss, sampler, class weights, augmentation, batch size, input size...) and differs
from the run's value is refused; flags of ``EXTEND`` and ``RELOCATE`` only lengthen the run or move it to
other hardware, and are applied and recorded (banner, hparams.yaml, summary.json's ``parts``). A run that
already reached its end is left untouched. docs/resume.md says the same for users.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from pvt_lightning.cli.config import GivenOptions, flag, validate
from pvt_lightning.cli.config_files import read_options_file
from pvt_lightning.cli.options import TrainConfig
from pvt_lightning.errors import UsageError
from pvt_lightning.models.weights import read_state_dict_file
from pvt_lightning.runs.checkpoint_info import check_resumable_kind, describe_checkpoint, training_progress
from pvt_lightning.runs.rundir import read_summary, resume_checkpoint, version_dir_of

EXTEND = ("epochs", "max_steps", "max_time", "early_stopping")
"""Flags that change how long the run goes on; a larger value continues a finished run."""
RELOCATE = ("devices", "num_nodes", "strategy", "accelerator", "precision", "log_every_n_steps",
            "checkpoint_every_steps", "checkpoint_every_minutes", "augment_device", "verify_images", "bad_images",
            "compile", "grad_checkpointing", "deterministic", "positive_class", "threshold", "report_precision",
            "progress_bar", "inference_seconds")
"""Flags that change where and how fast the run goes, or what is logged or measured besides, not what is trained.
Any other option is taken to change what is trained: a new option is refused on resume until it is listed here.
--num-workers is not: the resumable training loader's saved position holds one state per loader worker."""
LOCATE = ("resume", "logdir", "name", "overwrite")
"""Flags that say which run to continue; not part of the run's settings."""
PATHS = ("data", "pretrained", "class_weights")
HPARAMS_FIELDS = ("variant", "img_size", "crop_pct", "lr", "weight_decay", "warmup_epochs", "drop_path",
                  "label_smoothing", "mixup", "cutmix", "linear_sra", "layer_decay", "head_lr_scale",
                  "freeze_backbone_epochs", "loss", "focal_gamma", "task", "asl_gamma_neg", "asl_gamma_pos", "asl_clip")
"""TrainConfig fields a checkpoint's hyper-parameters hold (used when its run folder has no hparams.yaml)."""


@dataclass
class ResumePlan:
    """What ``--resume`` continues: the checkpoint, the merged configuration, what changed, and how far it got."""

    checkpoint: Path
    config: TrainConfig
    settings_from: str
    changed: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    epochs_done: int | None = None
    global_step: int = 0
    class_weights: list[float] | None = None  # the checkpoint's, when there is no hparams.yaml to recompute them
    finished: str | None = None  # why there is nothing left to do, or None

    def describe(self) -> str:
        """The banner's resume line."""
        where = f"epoch {self.epochs_done}" if self.epochs_done is not None else "its saved epoch"
        changes = "; ".join(f"{flag(name)} {_show(old)} -> {_show(new)}" for name, (old, new) in self.changed.items())
        return (f"resuming {self.checkpoint} at {where}, global step {self.global_step}, with the run's settings from "
                f"{self.settings_from}" + (f"; changed: {changes}" if changes else ""))


def plan_resume(config: TrainConfig, given: GivenOptions, default_img_size) -> ResumePlan | None:
    """The plan for ``config.resume`` (None without it). ``default_img_size``: the size the run name defaults to."""
    if config.resume is None:
        return None
    if "resume" in given.files and "resume" not in given.flags:
        raise UsageError("'resume' in a --config file: give --resume on the command line to continue a run (a "
                         "--config file reruns a configuration; hparams.yaml of older versions held resume: remove "
                         "the key)")
    lookup = config if config.img_size or config.name else dataclasses.replace(config, img_size=default_img_size)
    checkpoint = resume_checkpoint(lookup)
    raw = read_state_dict_file(checkpoint, mmap=True)
    check_resumable_kind(describe_checkpoint(raw, checkpoint))
    saved, settings_from, class_weights = saved_settings(checkpoint, raw)
    values, changed = merge(config, given, saved, checkpoint)
    # The weights come from the checkpoint: the --pretrained file the run started from may have moved since.
    merged = TrainConfig(**{**values, "resume": str(checkpoint), "pretrained": None})
    validate(merged)
    merged = dataclasses.replace(merged, pretrained=values.get("pretrained"))
    epochs_done, step = training_progress(raw)
    plan = ResumePlan(checkpoint, merged, settings_from, changed, epochs_done, step, class_weights)
    plan.finished = finished_reason(plan, raw)
    return plan


def saved_settings(checkpoint: Path, raw: Mapping) -> tuple[dict[str, Any], str, list[float] | None]:
    """(field: value of the run, where they came from, the checkpoint's class weights when read from it)."""
    fields = {spec.name for spec in dataclasses.fields(TrainConfig)}
    run_dir = version_dir_of(checkpoint)
    hparams_file = run_dir / "hparams.yaml" if run_dir is not None else None
    if hparams_file is not None and hparams_file.is_file():
        options = read_options_file(hparams_file, f"{hparams_file} (the run's saved configuration)")
        saved = {str(key).replace("-", "_"): value for key, value in options.items()}
        return {k: v for k, v in saved.items() if k in fields and k not in LOCATE}, str(hparams_file), None
    hparams = raw.get("hyper_parameters") or {}
    saved = {name: hparams[name] for name in HPARAMS_FIELDS if name in hparams}
    weights = hparams.get("class_weights")
    return saved, "the checkpoint's hyper-parameters (no hparams.yaml next to it)", weights


def merge(config: TrainConfig, given: GivenOptions, saved: dict[str, Any],
          checkpoint: Path) -> tuple[dict[str, Any], dict[str, tuple[Any, Any]]]:
    """The run's values, with the flags given applied where allowed; UsageError naming every refused flag."""
    values = {**dataclasses.asdict(config), **saved}
    changed, refused = {}, []
    for name in sorted(given.all):
        new, old = getattr(config, name), saved.get(name)
        if name in LOCATE or new is None or (name == "recipe" and new == "auto"):
            values[name] = new if name in LOCATE else values[name]
            continue
        if name not in saved or same(name, new, old):
            values[name] = new
        elif name in EXTEND or name in RELOCATE or (name == "data" and _moved(old, new)):
            values[name] = new
            changed[name] = (old, new)
        else:
            refused.append(f"{flag(name)} {_show(new)} (the run: {_show(old)})")
    if refused:
        raise UsageError(
            f"cannot --resume {checkpoint}: {'; '.join(refused)}. --resume continues the run exactly as it was "
            "trained, with its saved settings (leave these flags out; --epochs, --max-steps, --devices and the "
            f"like may change). To train with other settings, start a new run from its weights with --pretrained "
            f"{checkpoint}")
    if values.get("data") and not Path(values["data"]).expanduser().exists():
        raise UsageError(f"cannot --resume {checkpoint}: the run's data folder {values['data']} no longer exists; "
                         "pass --data with where it is now")
    return values, changed


def same(name: str, new: Any, old: Any) -> bool:
    """Whether a given value equals the run's: paths resolved, floats to rounding, lists item by item."""
    if name in PATHS and isinstance(new, str) and isinstance(old, str):
        return new == old or Path(new).expanduser().resolve() == Path(old).expanduser().resolve()
    if isinstance(new, (list, tuple)) and isinstance(old, (list, tuple)):
        return len(new) == len(old) and all(same(name, a, b) for a, b in zip(new, old))
    if isinstance(new, float) or isinstance(old, float):
        try:
            return math.isclose(float(new), float(old), rel_tol=1e-9, abs_tol=1e-12)
        except (TypeError, ValueError):
            return False
    return str(new) == str(old) if {type(new), type(old)} <= {str, int} else new == old


def _moved(old: Any, new: Any) -> bool:
    """--data may point elsewhere when the run's folder is gone (moved); the class check still applies."""
    return isinstance(old, str) and not Path(old).expanduser().exists() and Path(new).expanduser().exists()


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return "none" if value is None else str(value)


def finished_reason(plan: ResumePlan, raw: Mapping) -> str | None:
    """Why the run has nothing left to do under the merged limits, or None."""
    config, done, step = plan.config, plan.epochs_done, plan.global_step
    run_dir = version_dir_of(plan.checkpoint)
    summary = read_summary(run_dir) if run_dir is not None else None
    ended_here = summary is not None and summary.get("global_step") == step
    if done is not None and done >= config.epochs:
        return f"it has trained {done} of --epochs {config.epochs}"
    if config.max_steps > 0 and step >= config.max_steps:
        return f"it is at global step {step} of --max-steps {config.max_steps}"
    if config.max_time and _elapsed_s(raw) >= _seconds(config.max_time):
        return f"it has trained for --max-time {config.max_time} already"
    if ended_here and not any(name in plan.changed for name in EXTEND):
        return "it finished (its summary.json was written at this checkpoint) and no flag extends it"
    return None


def finished_message(plan: ResumePlan) -> str:
    run = version_dir_of(plan.checkpoint) or plan.checkpoint
    return (f"Nothing to do: {run} is complete ({plan.finished}); its files are left as they were. To train "
            f"longer, resume with a larger --epochs (now {plan.config.epochs}) or --max-steps.")


def _elapsed_s(raw: Mapping) -> float:
    """Training time Lightning's Timer saved in the checkpoint (0 without one)."""
    for key, state in (raw.get("callbacks") or {}).items():
        if str(key).startswith("Timer") and isinstance(state, Mapping):
            return float((state.get("time_elapsed") or {}).get("train", 0.0))
    return 0.0


def _seconds(max_time: str) -> float:
    days, hours, minutes, seconds = (int(part) for part in max_time.split(":"))
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def summary_parts(plan: ResumePlan | None, previous: dict | None, summary: dict, wall_time_s: float) -> list[dict]:
    """summary.json's ``parts``: each stretch of the run (the first, then one per resume) with its end epoch, global
    step, wall time, the checkpoint it resumed from and the flags it changed."""
    part = {"epochs": summary.get("epochs"), "global_step": summary.get("global_step"),
            "wall_time_s": round(wall_time_s, 1), "resumed_from": None, "changed": {}}
    if plan is None:
        return [part]
    earlier = previous.get("parts") if isinstance(previous, dict) else None
    if not isinstance(earlier, list) or not earlier:
        earlier = [{"epochs": previous.get("epochs"), "global_step": previous.get("global_step"),
                    "wall_time_s": previous.get("wall_time_s"), "resumed_from": None, "changed": {}}
                   if isinstance(previous, dict) else
                   {"epochs": plan.epochs_done, "global_step": plan.global_step, "wall_time_s": None,
                    "resumed_from": None, "changed": {}, "note": "stopped before writing its summary"}]
    part.update(resumed_from=str(plan.checkpoint), start_epoch=plan.epochs_done, start_step=plan.global_step,
                changed={flag(name): {"from": old, "to": new} for name, (old, new) in plan.changed.items()})
    return [*earlier, part]


def total_wall_time(parts: list[dict]) -> float:
    """The run's wall time: the sum over its parts whose time is known."""
    return round(sum(p["wall_time_s"] for p in parts if isinstance(p.get("wall_time_s"), (int, float))), 1)
