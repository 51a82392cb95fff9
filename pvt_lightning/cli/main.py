"""``pvt-lightning SUBCOMMAND``: pick the subcommand, parse its options, run it, map errors to exit codes.

Without a subcommand the options are training options (``python experiments/run.py --variant b2_li`` is
``pvt-lightning train --variant b2_li``); the forms ``--evaluate CKPT`` and ``--predict DIR --checkpoint CKPT``
are the ``evaluate`` and ``predict`` subcommands. Exit statuses are those of ``pvt_lightning.errors``.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from typing import Sequence

from pvt_lightning.cli.config import parse_args
from pvt_lightning.errors import RunStopped, UserFacingError, exit_code
from pvt_lightning.training.allocator import keep_freed_memory


@dataclass(frozen=True)
class Subcommand:
    """One job of the command line; ``module`` defines ``CONFIG`` (its options dataclass) and ``run(config)``."""

    name: str
    module: str
    help: str


SUBCOMMANDS = {command.name: command for command in [
    Subcommand("train", "pvt_lightning.cli.train", "train a PVTv2 (b0..b5, b2_li) or ResNet-50 classifier on an "
               "ImageFolder dataset (the built-in demo dataset without --data)"),
    Subcommand("evaluate", "pvt_lightning.cli.evaluate", "per-class report, calibration and operating points of a "
               "checkpoint on one split of labelled data"),
    Subcommand("predict", "pvt_lightning.cli.predict", "predict every image under a folder with a checkpoint or an "
               "exported model, into a CSV or Parquet file"),
    Subcommand("export", "pvt_lightning.cli.export", "export a checkpoint or a variant to ONNX or torch.export "
               "(.pt2), checked against the model"),
    Subcommand("serve", "pvt_lightning.cli.serve", "serve a checkpoint or an exported model over HTTP (LitServe, "
               "batched): POST an image to /predict"),
    Subcommand("audit", "pvt_lightning.cli.audit", "find duplicate images (within and across splits) and suspect "
               "labels in a dataset, with a trained checkpoint"),
    Subcommand("shards", "pvt_lightning.cli.shards", "convert an image-folder or manifest dataset into LitData "
               "shards that --data DIR trains, evaluates and predicts from"),
    Subcommand("compare", "pvt_lightning.cli.compare", "compare runs side by side: a table (Markdown, CSV) and "
               "plots of their curves"),
    Subcommand("speed", "pvt_lightning.cli.speed", "re-measure the inference speed of a checkpoint (and its "
               "exported files) on this machine, recorded next to its run"),
]}
"""Every subcommand; its module is imported only when it runs, so ``--help`` stays fast and extras optional."""

LEGACY_FLAGS = {"--evaluate": ("evaluate", "--checkpoint"), "--predict": ("predict", "--input")}
"""``run.py --evaluate CKPT`` = ``evaluate --checkpoint CKPT``; ``run.py --predict DIR`` = ``predict --input DIR``."""


def route(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """(subcommand, its arguments); ``None`` asks for the overview (``pvt-lightning --help``)."""
    argv = list(argv)
    if argv and argv[0] in SUBCOMMANDS:
        return argv[0], argv[1:]
    for legacy, (name, new_flag) in LEGACY_FLAGS.items():
        for i, arg in enumerate(argv):
            if arg == legacy or arg.startswith(legacy + "="):
                argv[i] = new_flag + arg[len(legacy):]
                return name, argv
    if argv and argv[0] in ("-h", "--help"):
        return None, []
    return "train", argv


def overview() -> str:
    width = max(len(name) for name in SUBCOMMANDS)
    lines = [f"  {name:<{width}}  {command.help}" for name, command in SUBCOMMANDS.items()]
    return ("usage: pvt-lightning SUBCOMMAND [options]   (pvt-lightning SUBCOMMAND --help for its options)\n\n"
            "PVTv2 image classification with PyTorch Lightning.\n\nsubcommands:\n" + "\n".join(lines) + "\n\n"
            "Without a subcommand the options are train's: `pvt-lightning --variant b2_li` trains.\n")


def main(argv: Sequence[str] | None = None, default: str | None = None) -> int:
    """Run one subcommand; ``default`` is the subcommand when none is named (``experiments/run.py``: train)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if default and not (argv and argv[0] in SUBCOMMANDS) and not any(
            a.split("=")[0] in LEGACY_FLAGS for a in argv):
        argv = [default, *argv]
    name, args = route(argv)
    if name is None:
        print(overview(), end="")
        return 0
    command = SUBCOMMANDS[name]
    try:
        module = importlib.import_module(command.module)
        config = parse_args(module.CONFIG, args, prog=f"pvt-lightning {name}", description=command.help)
        if config is None:  # --print-config
            return 0
        keep_freed_memory()  # CPU steps stop page-faulting their activations back in (see allocator.py)
        return module.run(config)
    except UserFacingError as err:
        print(f"pvt-lightning: error: {err}", file=sys.stderr)
        return exit_code(err)
    except RunStopped as err:
        print(f"pvt-lightning: stopped: {err}", file=sys.stderr)
        return exit_code(err)


if __name__ == "__main__":
    sys.exit(main())
