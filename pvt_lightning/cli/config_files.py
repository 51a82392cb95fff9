"""Reading ``--config`` files safely, before jsonargparse sees them: size, encoding, YAML and alias-expansion limits.

A YAML file of nested anchors and aliases (a "billion laughs" file) is a few hundred bytes that expand
to billions of values: PyYAML builds it as shared references in no time, but every walk over the
result (jsonargparse checking each value) takes forever. ``read_config_file`` composes the file,
counts the nodes it would have once every alias is expanded (linear time, by memoising each node's
count) and refuses it past ``MAX_EXPANDED_NODES``; it also refuses a missing file, a folder, an empty,
huge, binary or malformed file, and a file whose top level is not ``option: value`` pairs, each with
one line naming the file. ``given_options`` says which options the command line and its files set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import yaml

from pvt_lightning.errors import UsageError

MAX_CONFIG_BYTES = 1 << 20
"""A configuration file holds a few dozen options; 1 MiB is far beyond any real one."""
MAX_EXPANDED_NODES = 100_000
"""YAML nodes a file may have once its aliases are expanded (a full configuration has about 200)."""


def config_file_arguments(argv: Sequence[str]) -> list[str]:
    """The values of every ``--config FILE`` / ``--config=FILE`` in ``argv``, in order."""
    files = []
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            files.append(argv[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
    return files


def read_config_file(name: str) -> dict[str, Any]:
    """The ``option: value`` pairs of one ``--config`` file, or a UsageError saying in one line what is wrong."""
    return read_options_file(Path(name).expanduser(), f"--config {name}")


def read_options_file(path: Path, where: str) -> dict[str, Any]:
    """The ``option: value`` pairs of a YAML file (``where`` names it in messages), read within the limits above."""
    if not path.exists():
        raise UsageError(f"{where}: no such file")
    if path.is_dir():
        raise UsageError(f"{where} is a folder; give a YAML file of option: value lines (see --print-config)")
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise UsageError(f"{where} is {size:,} bytes; a configuration file is a few dozen option: value lines "
                             f"(at most {MAX_CONFIG_BYTES:,} bytes)")
        data = path.read_bytes()
    except OSError as err:
        raise UsageError(f"{where}: cannot read it ({err.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UsageError(f"{where} is not a text file (byte {err.start} is not UTF-8); give a YAML file of "
                         "option: value lines") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as err:
        raise UsageError(f"{where} is not valid YAML: {_one_line(err)}") from None
    if node is None:
        raise UsageError(f"{where} is empty; write option: value lines (pvt-lightning ... --print-config shows them)")
    expanded = expanded_nodes(node, where)
    if expanded > MAX_EXPANDED_NODES:
        raise UsageError(f"{where}: its YAML aliases expand to {expanded:,} values (more than "
                         f"{MAX_EXPANDED_NODES:,}); refused, a configuration file needs no nested anchors")
    try:
        content = yaml.safe_load(text)
    except yaml.YAMLError as err:  # e.g. a tag SafeLoader cannot construct
        raise UsageError(f"{where} is not valid YAML: {_one_line(err)}") from None
    if not isinstance(content, dict):
        raise UsageError(f"{where} holds a {type(content).__name__}, not option: value lines")
    return content


def expanded_nodes(root: yaml.Node, where: str) -> int:
    """How many nodes ``root`` has once every alias is expanded: each node is counted once and its count reused
    (aliases make the node graph a DAG), so this takes linear time however large the expansion."""
    counts: dict[int, int] = {}
    in_progress: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if key in counts:
            continue
        children = _children(node)
        if children_done:
            counts[key] = 1 + sum(counts[id(child)] for child in children)
            in_progress.discard(key)
            continue
        if key in in_progress:
            raise UsageError(f"{where}: a YAML anchor refers to itself; refused")
        in_progress.add(key)
        stack.append((node, True))
        for child in children:
            if id(child) in in_progress:
                raise UsageError(f"{where}: a YAML anchor refers to itself; refused")
            stack.append((child, False))
    return counts[id(root)]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _one_line(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else problem


def given_options(argv: Sequence[str], fields: Sequence[str],
                  list_fields: Sequence[str] = ()) -> tuple[set[str], set[str]]:
    """(options set by flags on the command line, options set by ``--config`` files), as field names; every
    file is checked by ``read_config_file`` first, and a single value where ``list_fields`` take a list (which
    jsonargparse reports without naming the key) is refused. A flag counts whether written ``--name value``,
    ``--name=value`` or ``--no-name``."""
    known = set(fields)
    flags = set()
    for arg in argv:
        if not arg.startswith("--") or arg.startswith("--config"):
            continue
        name = arg[2:].split("=", 1)[0].replace("-", "_")
        if name not in known and name.startswith("no_") and name[3:] in known:
            name = name[3:]
        if name in known:
            flags.add(name)
    from_files = set()
    for file in config_file_arguments(argv):
        for key, value in read_config_file(file).items():
            name = str(key).replace("-", "_")
            if name in list_fields and value is not None and not isinstance(value, list):
                raise UsageError(f"--{name.replace('_', '-')} {value}: in --config {file} give a list, e.g. "
                                 f"{key}: [{value}]")
            from_files |= {name} & known
    return flags, from_files
