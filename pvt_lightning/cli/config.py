"""Parsing a subcommand's options: flags and ``--config`` YAML files -> its checked configuration dataclass.

jsonargparse reads flags and ``--config FILE`` (repeatable, later files win, flags win over files) into
the subcommand's dataclass (``cli/options.py``) and checks every value against the field's type, so a
value from a file gets the same checks as a flag. Checks a type cannot express are in ``validate``.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union, get_args, get_origin, get_type_hints

from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser
from jsonargparse.typing import PositiveInt

from pvt_lightning.cli.config_files import given_options
from pvt_lightning.cli.limits import check_device_list, check_numbers
from pvt_lightning.cli.options import GROUPS, STRATEGIES, option
from pvt_lightning.errors import UsageError
from pvt_lightning.models import MIN_INPUT_SIZE, canonical_name
from pvt_lightning.models.registry import is_pvt_v2

__all__ = ["GivenOptions", "build_parser", "explain", "flag", "given_of", "option", "parse_args", "parse_devices", "plain",
           "to_yaml", "validate"]


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser(schema: type, prog: str = "pvt-lightning", description: str | None = None) -> ArgumentParser:
    """One flag per field of ``schema`` (a subcommand's configuration dataclass), in help sections by group."""
    # print_config=None: our --print-config (resolved, validated values) is the only one in --help
    parser = ArgumentParser(prog=prog, exit_on_error=False, description=description, print_config=None)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file of option: value (repeatable, later "
                        "files win, flags win over files)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved configuration as YAML "
                        "and exit; feed it back with --config to rerun it")
    used = [spec.metadata["group"] for spec in dataclasses.fields(schema)]
    groups = {key: parser.add_argument_group(GROUPS.get(key, key)) for key in dict.fromkeys(used)}
    hints = get_type_hints(schema)
    for spec in dataclasses.fields(schema):
        meta = dict(spec.metadata)
        group = groups[meta.pop("group")]
        kwargs: dict[str, Any] = {"default": spec.default, "help": meta.pop("help"), **meta}
        if hints[spec.name] in (bool, Optional[bool]):
            kwargs["action"] = ActionYesNo(no_prefix="no-")
        else:
            kwargs["type"] = hints[spec.name]
            if "nargs" in kwargs:  # --img-size H W: jsonargparse types each of the N values
                kwargs["type"] = Optional[_item_type(hints[spec.name])]
        group.add_argument(flag(spec.name), dest=spec.name, **kwargs)
    return parser


def _item_type(hint: Any) -> Any:
    """The element type of a list option (``Optional[list[PositiveInt]]`` -> ``PositiveInt``)."""
    args = [a for a in getattr(hint, "__args__", ()) if a is not type(None)]
    if getattr(hint, "__origin__", None) is list:
        return args[0]
    return _item_type(args[0]) if len(args) == 1 else PositiveInt


def parse_args(schema: type, argv: Sequence[str], prog: str = "pvt-lightning", description: str | None = None):
    """Flags and YAML files -> a validated ``schema`` instance; ``None`` after ``--print-config`` printed it."""
    parser = build_parser(schema, prog, description)
    argv = list(argv)
    fields = [spec.name for spec in dataclasses.fields(schema)]
    hints = get_type_hints(schema)
    lists = [name for name in fields if _list_only(hints[name])]
    flags, from_files = given_options(argv, fields, lists)  # every --config file checked before jsonargparse reads it
    try:
        namespace = parser.parse_args(argv)
    except argparse.ArgumentError as err:
        raise UsageError(explain(err, argv, schema)) from None
    config = schema(**{name: plain(namespace[name]) for name in fields})
    validate(config)
    config.given = GivenOptions(frozenset(flags), frozenset(from_files - flags))  # not a field: never a flag or key
    if namespace["print_config"]:
        print(to_yaml(config), end="")
        return None
    return config


def _list_only(hint: Any) -> bool:
    """Whether an option takes a list and nothing else (None aside): list[...] or Optional[list[...]]."""
    args = [a for a in get_args(hint) if a is not type(None)] if get_origin(hint) is Union else [hint]
    return bool(args) and all(get_origin(a) is list for a in args)


@dataclasses.dataclass(frozen=True)
class GivenOptions:
    """Which options the user set (field names): on the command line, and only in ``--config`` files."""

    flags: frozenset[str] = frozenset()
    files: frozenset[str] = frozenset()

    @property
    def all(self) -> frozenset[str]:
        return self.flags | self.files


def given_of(config: Any) -> GivenOptions:
    """The options ``parse_args`` saw set; for a configuration built in code, those that differ from the defaults."""
    given = getattr(config, "given", None)
    if isinstance(given, GivenOptions):
        return given
    changed = {spec.name for spec in dataclasses.fields(config) if getattr(config, spec.name) != spec.default}
    return GivenOptions(frozenset(changed))


def plain(value: Any) -> Any:
    """jsonargparse's restricted numbers (PositiveInt...) as plain int/float, so YAML and pickling see builtins."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def to_yaml(config: Any) -> str:
    """A configuration dataclass as YAML that ``--config`` reads back to the same values."""
    import yaml

    return yaml.safe_dump({key.replace("_", "-"): plain(value) for key, value in dataclasses.asdict(config).items()},
                          sort_keys=False)


_KEY = re.compile(r'Parser key "([\w.]+)"')


def explain(err: argparse.ArgumentError, argv: Sequence[str] = (), schema: type | None = None) -> str:
    """One line from jsonargparse's message: the flag, the value given and what is allowed."""
    text = str(err)
    key = _KEY.search(text)
    if not key:
        return text.splitlines()[0] if text else "invalid arguments (see --help)"
    name = key.group(1)
    given = re.search(r"(?:Got value|Given value): (.*)", text)
    reasons = [line.strip()[2:] for line in text.splitlines() if line.strip().startswith("- ")]
    reasons = [r for r in reasons if "NoneType" not in r] or [line.strip() for line in text.splitlines()[1:2]]
    allowed = "; ".join(reason.replace("Not of type ", "") for reason in reasons)
    value = given.group(1).strip() if given else _flag_value(argv, flag(name))
    choices = _choices(schema, name) if schema is not None else ""
    return (f"{flag(name)} {value}: not allowed ({allowed})" + (f"; choose one of: {choices}" if choices else "")
            + f". Fix the flag or the key '{name.replace('_', '-')}' in your --config file.")


def _flag_value(argv: Sequence[str], option_name: str) -> str:
    """The value given to ``option_name`` on the command line (the last one wins), or "?" if it came from a file."""
    value = "?"
    for i, arg in enumerate(argv):
        if arg == option_name and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(option_name + "="):
            value = arg.split("=", 1)[1]
    return value


def _choices(schema: type, name: str) -> str:
    hint = get_type_hints(schema).get(name)
    args = getattr(hint, "__args__", ())
    literals = [a for a in args if getattr(a, "__origin__", None) is Literal]
    if getattr(hint, "__origin__", None) is Literal:
        literals = [hint]
    return ", ".join(str(v) for lit in literals for v in lit.__args__)


def validate(config: Any) -> None:
    """Checks that a type alone cannot express, for whichever of these options ``config`` has."""
    if getattr(config, "variant", None) is not None:  # export: None with --checkpoint
        try:
            config.variant = canonical_name(str(config.variant))
        except ValueError as err:
            raise UsageError(f"--variant: {err}") from None
    check_numbers(config)
    size = getattr(config, "img_size", None)
    if size is not None and len(size) != 2:
        raise UsageError(f"--img-size {' '.join(map(str, size)) or '[]'}: give two numbers, height and width (in a "
                         "--config file: img-size: [H, W])")
    if size is not None and min(size) < MIN_INPUT_SIZE:
        raise UsageError(f"--img-size {size[0]} {size[1]}: each side must be at least {MIN_INPUT_SIZE} pixels")
    if hasattr(config, "precision"):
        config.precision = str(config.precision)
    for ok, message in _checks(config):
        if not ok:
            raise UsageError(message)
    if hasattr(config, "devices"):
        check_device_list(parse_devices(config.devices))  # against this machine: when the job starts
    _check_paths(config)


def _checks(config: Any) -> list[tuple[bool, str]]:
    """(holds, message) for every cross-field rule that applies to ``config``'s options."""
    get = lambda name, default=None: getattr(config, name, default)  # noqa: E731
    crop = get("crop_pct")
    strategy, monitor = get("strategy", "auto"), get("monitor", "val/")
    return [
        (crop is None or 0 < crop <= 1, f"--crop-pct {crop}: must be in (0, 1]"),
        (get("max_steps", -1) >= -1, "--max-steps must be -1 (no limit) or a number of steps"),
        (get("max_time") is None or re.fullmatch(r"\d+:\d{1,2}:\d{1,2}:\d{1,2}", get("max_time")),
         f"--max-time {get('max_time')}: use DD:HH:MM:SS, e.g. 00:12:00:00 for 12 hours"),
        (strategy in STRATEGIES or strategy.startswith(("ddp", "fsdp", "deepspeed")),
         f"--strategy {strategy}: not a Lightning strategy; choose one of: {', '.join(STRATEGIES)}"),
        (monitor.startswith("val/"), f"--monitor {monitor}: choose a validation metric such as val/acc, val/f1, "
                                     "val/loss or val/recall/<class>"),
        *_report_precision_checks(config),
        (get("variant") is None or is_pvt_v2(config.variant) or not get("linear_sra"),
         "--linear-sra applies to PVTv2 variants, not resnet50"),
        (get("target_precision") is None or get("target_recall") is None,
         "--target-precision and --target-recall choose the same thresholds two ways: give one of them"),
        (not (get("operating_point") and (get("calibrate") or get("target_precision") is not None
                                          or get("target_recall") is not None)),
         "--operating-point brings its own temperature and thresholds: leave out --calibrate, --target-precision "
         "and --target-recall, or leave out --operating-point to choose new ones"),
    ]


def _report_precision_checks(config: Any) -> list[tuple[bool, str]]:
    """--report-precision: values with at most two decimals (tags name P with two), none repeated; a --monitor
    val/recall@precisionP must name one of them."""
    from pvt_lightning.tags import parse_recall_at_precision, precision_label
    from pvt_lightning.training.recall_at_precision import DEFAULT_PRECISIONS, check_precisions

    if not hasattr(config, "report_precision"):
        return []
    values = config.report_precision or DEFAULT_PRECISIONS
    try:
        check_precisions(values)
        problem = None
    except ValueError as err:
        problem = str(err)
    monitored = parse_recall_at_precision(getattr(config, "monitor", "") or "")
    labels = {precision_label(float(p)) for p in values}
    return [
        (problem is None, f"--report-precision {' '.join(f'{float(p):g}' for p in values)}: {problem}"),
        (monitored is None or precision_label(monitored[0]) in labels,
         f"--monitor {getattr(config, 'monitor', '')}: precision {monitored and precision_label(monitored[0])} is not "
         f"reported; add it to --report-precision (now {', '.join(sorted(labels))})"),
    ]


_PATH_OPTIONS = ("data", "classes", "pretrained", "checkpoint", "input", "operating_point")


def _check_paths(config: Any) -> None:
    for name in _PATH_OPTIONS:
        value = getattr(config, name, None)
        if value is not None and not Path(value).expanduser().exists():
            raise UsageError(f"{flag(name)} {value}: no such file or folder")
    weights = getattr(config, "class_weights", "none")
    if weights not in ("none", "balanced") and not Path(weights).expanduser().is_file():
        raise UsageError(f"--class-weights {weights}: choose none, balanced or an existing JSON file "
                         "of {\"class name\": weight}")
    resume = getattr(config, "resume", None)
    if resume not in (None, "last") and not Path(resume).expanduser().is_file():
        raise UsageError(f"--resume {resume}: no such checkpoint file (or use --resume last with --name)")


def require(config: Any, *names: str, command: str) -> None:
    """Options a subcommand cannot run without (kept optional in the dataclass so YAML files may give them)."""
    missing = [flag(name) for name in names if getattr(config, name, None) is None]
    if missing:
        raise UsageError(f"{command} needs {' and '.join(missing)} (see pvt-lightning {command} --help)")


def parse_devices(devices: int | str | list[int]) -> int | str | list[int]:
    """``--devices`` as Lightning takes it: a count, -1, "auto" or a list of indices."""
    if isinstance(devices, list):
        return devices
    text = str(devices).strip()
    if text == "auto":
        return "auto"
    if re.fullmatch(r"-?\d+", text):
        if int(text) >= 1 or int(text) == -1:
            return int(text)
    elif re.fullmatch(r"\d+(,\d+)*,?", text):
        return [int(i) for i in text.split(",") if i]
    raise UsageError(f"--devices {devices}: use a count (1, 2...), -1 for all, a list such as 0,1,2,3, or auto "
                     "(0 devices would train on nothing)")
